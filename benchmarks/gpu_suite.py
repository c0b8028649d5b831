"""The GPU suite: B1's `gpu` profile (the papers' scale) on one lent GPU, most valuable runs first, resumable.

B1 as the FLASC paper sizes it: 20 Newsgroups, MiniLM + LoRA r=16, 100 clients with a Dirichlet(0.1) label
split, 10 a round, one local epoch, 128 tokens, 200 rounds; the same client optimiser as the cpu profile
(SGD-momentum, cosine decay over rounds) and the same method rows (``b1_cpu.runs_for("gpu")``). Evaluation
every 10 rounds on a fixed 2,000-post subset of the test split, the last round on all 7,532 posts.

A lent GPU machine is bare: it has the repository and at most 64 MiB beside it, a python with torch,
transformers and peft but not pydantic, and no network. So the suite has three steps:

    python benchmarks/gpu_suite.py prepare        # here: .gpu/ = MiniLM as fp16, 20NG pre-stripped, wheels
    # there (one device call; .gpu carried):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl && \\
      PYTHONPATH=/tmp/site:src python3 benchmarks/gpu_suite.py run --out $OUT --budget-s 660
    python benchmarks/gpu_suite.py collect DIR    # here: DIR/gpu_results.json -> results/runs/b1_gpu/*.json

``run`` trains several runs at once on the one GPU (a MiniLM step leaves most of an H100/H200 idle), starts
no run it cannot finish before ``--budget-s`` by the pace of the runs before it, stops the ones still going
at the budget (each keeps its last per-round checkpoint) and packs them into ``unfinished.tar.gz`` beside the
results; ``run --resume-from`` on that file continues them on the next machine. Finished runs come back
as compact results in ``gpu_results.json``; ``collect`` files them under ``results/runs/b1_gpu/`` (skipping
any already filed), and a later ``run`` skips every run filed there.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(1, str(REPO / "src"))  # a bare GPU machine has the repository, not an installed fedzip
PREPARED = REPO / ".gpu"  # ignored by git; carried to the GPU machine
BENCH = "b1_gpu"
PROFILE = ["rounds=200", "eval.every=10", "eval.max_examples=2000", "train.optimizer=sgd", "train.momentum=0.9",
           "train.lr_schedule=cosine", "train.lr=0.5", "train.device=cuda"]
WHEELS = ["pydantic==2.14.4", "pydantic_core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5",
          "zstandard==0.25.0"]
# Most valuable first: the reference's seeds, the communication method it is most often compared with,
# then each other family's first seed, then their further seeds.
PRIORITY = [("fedit", 0), ("flasc_1_16", 0), ("fedit", 1), ("flasc_1_16", 1), ("fedit", 2), ("flasc_1_16", 2),
            ("hafl", 0), ("cgfedllm_linear16", 0), ("ffa_lora", 0), ("hetlora", 0), ("flexlora", 0)]
PRIORITY += [(label, s) for s in (1, 2) for label in ("hafl", "cgfedllm_linear16", "ffa_lora", "hetlora", "flexlora")]


def say(line: str) -> None:
    sys.stdout.write(f"[{time.strftime('%H:%M:%S')}] {line}\n")
    sys.stdout.flush()


# -- prepare (on a development machine) -------------------------------------------------------------
def prepare(data_root: Path) -> None:
    """Write .gpu/: what a bare GPU machine needs beside the repository, within the 64 MiB it may carry."""
    from safetensors.torch import load_file, save_file

    from fedzip.data.sources import newsgroups
    from fedzip.models.load import resolve

    if PREPARED.exists():
        shutil.rmtree(PREPARED)
    model_dir = PREPARED / "minilm"
    model_dir.mkdir(parents=True)
    source = Path(resolve("minilm"))
    for f in source.iterdir():  # config and tokenizer as they are; the weights as fp16 (loaded back in fp32)
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("pytorch_model.bin",):
            shutil.copy2(f, model_dir / f.name)
    weights = load_file(str(source / "model.safetensors"))
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in weights.items()},
              str(model_dir / "model.safetensors"), metadata={"format": "pt"})

    # 20 Newsgroups with headers, footers and quotes already removed (the suite runs with data.remove=[]),
    # and each post cut at 4,000 characters: far beyond its first 128 tokens, so training sees the same text.
    folder = PREPARED / "data" / "20newsgroups"
    folder.mkdir(parents=True)
    train, test = newsgroups(data_root, ["headers", "footers", "quotes"])
    for name, split in (("train", train), ("test", test)):
        with gzip.open(folder / f"{name}.jsonl.gz", "wt", encoding="utf-8") as f:
            for i, (text, label) in enumerate(zip(split.texts, split.labels, strict=True)):
                f.write(json.dumps({"id": i, "text": text[:4000], "label": label,
                                    "label_name": split.label_names[label]}) + "\n")

    wheels = PREPARED / "wheels"
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform",
           "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "-d", str(wheels), *WHEELS]
    if subprocess.call(cmd) != 0:
        raise SystemExit("error: could not download the wheels the GPU machine lacks: " + ", ".join(WHEELS))
    size = sum(f.stat().st_size for f in PREPARED.rglob("*") if f.is_file())
    say(f"prepared {PREPARED.relative_to(REPO)}: {size / 2**20:.1f} MiB (the repository's tracked files travel too)")


# -- run (on the GPU machine) -----------------------------------------------------------------------
def run_command(label: str, overrides: list[str], seed: int, out: Path, threads: int, resume: bool) -> list[str]:
    model = PREPARED / "minilm" if (PREPARED / "minilm").exists() else "minilm"
    cmd = [sys.executable, "-m", "fedzip.cli", "run", str(REPO / "configs" / "b1_fedit.yaml"), "--out", str(out),
           "--quiet", "--set", f"train.threads={threads}", "--set", f"model.name={model}"]
    if (PREPARED / "data").exists():
        cmd += ["--set", "data.remove=[]"]  # the prepared copy is stripped already
    for o in [*PROFILE, *overrides, f"seed={seed}"]:
        cmd += ["--set", o]
    return cmd + (["--resume"] if resume else [])


def run_suite(out: Path, budget_s: float, parallel: int, done: set[str], only: set[str], seeds: set[int],
              resume_from: Path | None, quick: bool, work: Path) -> None:
    from b1_cpu import runs_for

    from fedzip.report.compact import compact_run

    t0 = time.time()
    overrides = {label: ov for label, ov, _ in runs_for("gpu")}
    if quick:  # two rounds: CG-FedLLM's TGAP phase shrinks to one
        overrides = {k: [o.replace("tgap_rounds: 40", "tgap_rounds: 1") for o in v] for k, v in overrides.items()}
    work.mkdir(parents=True, exist_ok=True)
    if resume_from:
        with tarfile.open(resume_from) as tar:
            tar.extractall(work, filter="data")
    queue = [(label, s) for label, s in PRIORITY if f"{label}-s{s}" not in done and (not only or label in only)
             and (not seeds or s in seeds)]
    # unfinished runs from an earlier machine first: they have the least left to do
    queue.sort(key=lambda t: not (work / f"{t[0]}-s{t[1]}" / "checkpoints" / "state.json").exists())
    extra = ["rounds=2", "num_clients=10", "clients_per_round=2", "train.max_steps=2", "eval.every=2",
             "eval.max_examples=64", "data.max_test_examples=128"] if quick else []
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=os.pathsep.join(
        [str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    if (PREPARED / "data").exists():
        env["FEDZIP_DATA"] = str(PREPARED / "data")
    threads = max(1, (os.cpu_count() or 2) // parallel)
    running: dict[str, tuple[subprocess.Popen, float, bool]] = {}
    finished, results, paces = [], [], []
    (out / "gpu_results.json").write_text("[]\n")
    while queue or running:
        for name, (proc, started, resumed) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            if proc.returncode == 0:
                if not resumed:  # a resumed run's time says nothing about a whole run's
                    paces.append(time.time() - started)
                label = name.rsplit("-s", 1)[0]
                results.append(compact_run(work / name, label) | {"benchmark": BENCH, "profile": "gpu",
                                                                  **({"quick": True} if quick else {})})
                finished.append(name)
                (out / "gpu_results.json").write_text(json.dumps(results, separators=(",", ":")) + "\n")
                say(f"{name} finished in {time.time() - started:.0f} s")
            else:
                say(f"{name} failed (exit {proc.returncode}); its log's end:")
                say((work / f"{name}.log").read_text()[-2000:])
        left = budget_s - (time.time() - t0)
        pace = max(paces) if paces else None
        while queue and len(running) < parallel and (pace is None or pace < left or quick):
            label, seed = queue.pop(0)
            name = f"{label}-s{seed}"
            resume = (work / name / "checkpoints" / "state.json").exists()
            if (work / name).exists() and not resume:
                shutil.rmtree(work / name)  # an earlier start that never checkpointed
            log = open(work / f"{name}.log", "a")
            proc = subprocess.Popen(run_command(label, overrides[label] + extra, seed, work / name, threads, resume),
                                    stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
            running[name] = (proc, time.time(), resume)
            say(f"{name} {'resumed' if resume else 'started'} ({len(running)} running, {left:.0f} s of budget left)")
        if not running and queue and pace is not None and pace >= left:
            say(f"not starting {len(queue)} more run(s): each takes about {pace:.0f} s, {left:.0f} s are left")
            break
        if running and time.time() - t0 > budget_s:
            say(f"budget spent: stopping {', '.join(running)} (each keeps its last round's checkpoint)")
            for proc, *_ in running.values():
                os.killpg(proc.pid, signal.SIGTERM)
            for proc, *_ in running.values():
                proc.wait()
            break
        time.sleep(2)
    pack_unfinished(work, out, set(finished) | done)
    say(f"{len(finished)} run(s) finished: {', '.join(finished) or 'none'}; results in {out / 'gpu_results.json'}")


def pack_unfinished(work: Path, out: Path, finished: set[str]) -> None:
    """Every started, unfinished run (config, metrics, ledger, checkpoint) in one file for the next machine."""
    keep = [d for d in work.iterdir() if d.is_dir() and d.name not in finished
            and (d / "checkpoints" / "state.json").exists() and not (d / "summary.json").exists()]
    if not keep:
        return
    with tarfile.open(out / "unfinished.tar.gz", "w:gz") as tar:
        for d in keep:
            tar.add(d, arcname=d.name)
    say(f"unfinished: {', '.join(d.name for d in keep)} -> {out / 'unfinished.tar.gz'}")


# -- collect (back on a development machine) ----------------------------------------------------------
def collect(folder: Path) -> None:
    from fedzip.report.compact import FORMAT

    target = REPO / "benchmarks" / "results" / "runs" / BENCH
    results = json.loads((folder / "gpu_results.json").read_text())
    for r in results:
        if r.get("format") != FORMAT:
            raise SystemExit(f"error: {folder / 'gpu_results.json'} holds something other than compact results")
        if r.get("quick"):
            raise SystemExit(f"error: {folder / 'gpu_results.json'} comes from run --quick (a check of the suite), "
                             "not the gpu profile; nothing filed")
        target.mkdir(parents=True, exist_ok=True)
        path = target / f"{r['label']}-s{r['seed']}.json"
        if path.exists():
            say(f"{path.name}: already filed, kept")
            continue
        path.write_text(json.dumps(r, separators=(",", ":")) + "\n")
        say(f"filed {path.relative_to(REPO)}")
    if (folder / "unfinished.tar.gz").exists():
        keep = REPO / "benchmarks" / "results" / "runs" / f"{BENCH}-unfinished.tar.gz"
        shutil.copy2(folder / "unfinished.tar.gz", keep)
        say(f"unfinished runs kept in {keep.relative_to(REPO)}: pass it to run --resume-from on the next GPU")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare", help="write .gpu/ for a bare GPU machine")
    p.add_argument("--data", default=os.environ.get("FEDZIP_DATA", str(REPO.parent / "shared" / "data")))
    r = sub.add_parser("run", help="run the gpu profiles on this machine's GPU")
    r.add_argument("--out", required=True, help="folder for gpu_results.json and unfinished.tar.gz")
    r.add_argument("--budget-s", type=float, default=660, help="stop by then (default 660 s: 11 minutes)")
    r.add_argument("--parallel", type=int, default=8, help="runs at once on the GPU (default 8)")
    r.add_argument("--only", default="", help="comma-separated labels")
    r.add_argument("--seeds", default="", help="comma-separated seeds (default: 0, 1, 2)")
    r.add_argument("--resume-from", type=Path, help="unfinished.tar.gz from an earlier machine")
    r.add_argument("--quick", action="store_true", help="2 tiny rounds per run: check the suite itself, anywhere")
    r.add_argument("--cpu", action="store_true", help="with --quick: on the CPU (tests the suite without a GPU)")
    r.add_argument("--work", type=Path, default=REPO / "benchmarks" / "runs" / BENCH / "gpu",
                   help="folder for the run directories (default benchmarks/runs/b1_gpu/gpu)")
    c = sub.add_parser("collect", help="file a GPU machine's results under results/runs/b1_gpu")
    c.add_argument("folder", type=Path)
    args = ap.parse_args()
    if args.step == "prepare":
        prepare(Path(args.data))
    elif args.step == "collect":
        collect(args.folder)
    else:
        import torch

        if args.cpu:
            if not args.quick:
                ap.error("--cpu only with --quick: the gpu profile needs a GPU")
            PROFILE[PROFILE.index("train.device=cuda")] = "train.device=cpu"
        elif not torch.cuda.is_available():
            raise SystemExit("error: no CUDA device here; the gpu profile needs one (try run --quick --cpu)")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        done = {p.stem for p in (REPO / "benchmarks" / "results" / "runs" / BENCH).glob("*.json")}
        seeds = {int(x) for x in args.seeds.split(",") if x.strip().isdigit()}
        run_suite(out, args.budget_s, args.parallel, done, {x for x in args.only.split(",") if x}, seeds,
                  args.resume_from, args.quick, args.work)


if __name__ == "__main__":
    main()
