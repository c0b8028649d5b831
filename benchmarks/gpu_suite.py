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
any already filed), and a later ``run`` skips every run filed there. ``progress.json`` beside them says, for
every run started, how many rounds it did in how many seconds: the pace of a run that did not finish.

``--suite b6_causal`` runs B6's causal-LM rows instead (``b6_frontier.py``: FedIT against FedKSeed on
SmolLM2-135M), filed under ``results/runs/b6_frontier_causal/``. SmolLM2's smallest faithful form, its Q4_1
GGUF (98 MB), does not fit what one call carries, so ``prepare --suite b6_causal`` writes it in two halves:
``.gpu_causal/`` (wheels with ``gguf``, the Alpaca demo set and the first half) and ``.gpu_causal_2/`` (the
second half). A machine keeps ignored files between calls while it is warm (30 s after a call), so:

    python benchmarks/gpu_suite.py prepare --suite b6_causal
    # call 1 (carry .gpu_causal), short:  ls .gpu_causal && nvidia-smi -L
    # call 2 at once (carry .gpu_causal_2):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu_causal/wheels/*.whl && \\
      PYTHONPATH=/tmp/site:src python3 benchmarks/gpu_suite.py run --suite b6_causal --out $OUT --budget-s 540 \\
      --parallel 6
    python benchmarks/gpu_suite.py collect DIR

``run`` joins the halves (checked against the whole file's SHA-256) before it starts a run, and says which
half is missing if one is. A FedKSeed run that does not finish does not come back (its checkpoint holds the
whole model, over the 16 MiB a returned file may have): the next machine starts it again, and
``progress.json`` says how far it got.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(1, str(REPO / "src"))  # a bare GPU machine has the repository, not an installed fedzip
PREPARED = REPO / ".gpu"  # ignored by git; carried to the GPU machine
CAUSAL_PREPARED = (REPO / ".gpu_causal", REPO / ".gpu_causal_2")  # carried by two calls, one each
CARRY_LIMIT = 64 * 2**20  # what one device call may carry, the repository's tracked files included
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
QUICK = ["rounds=2", "num_clients=10", "clients_per_round=2", "train.max_steps=2", "eval.every=2",
         "eval.max_examples=64", "data.max_test_examples=128"]


@dataclass
class Suite:
    """What one ``--suite`` runs: a config, a profile every row shares, the rows, in which order."""
    bench: str  # results/runs/<bench>/
    config: str
    profile: list[str]
    rows: dict[str, tuple[list[str], str]]  # label -> (overrides, what the row is)
    priority: list[tuple[str, int]]
    quick: list[str]  # run --quick: a few tiny rounds that check the suite itself
    # on the GPU machine: the overrides that point the runs at the prepared copies (where they exist) and the
    # data root they read
    prepared: Callable[[], tuple[list[str], Path | None]]


def suite_named(name: str) -> Suite:
    if name == "b1":
        from b1_cpu import runs_for

        return Suite(BENCH, "b1_fedit", PROFILE, {label: (ov, what) for label, ov, what in runs_for("gpu")}, PRIORITY,
                     QUICK, prepared_b1)
    from b6_frontier import CAUSAL, CAUSAL_PROFILE, CAUSAL_ROWS

    return Suite(CAUSAL.name, CAUSAL.config, list(CAUSAL_PROFILE), {label: (ov, what) for label, ov, what in CAUSAL_ROWS},
                 [(label, s) for s in (0, 1, 2) for label, _, _ in CAUSAL_ROWS],
                 [*QUICK, "num_clients=4", "data.max_length=32", "data.max_test_examples=8", "train.batch_size=2"],
                 prepared_causal)


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

    download_wheels(PREPARED / "wheels", WHEELS)
    say(f"prepared {PREPARED.relative_to(REPO)}: {folder_bytes(PREPARED) / 2**20:.1f} MiB (the repository's tracked "
        "files travel too)")


def download_wheels(folder: Path, wheels: list[str]) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform",
           "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "-d", str(folder), *wheels]
    if subprocess.call(cmd) != 0:
        raise SystemExit("error: could not download the wheels the GPU machine lacks: " + ", ".join(wheels))


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def prepare_causal(data_root: Path) -> None:
    """Write .gpu_causal/ and .gpu_causal_2/: the wheels, the Alpaca demo set and SmolLM2's GGUF in two halves,
    each call's share within what a call carries beside the repository."""
    from fedzip.data.sources import DEFAULT_ALPACA
    from fedzip.errors import ModelError
    from fedzip.models.load import SMOLLM_GGUF, file_sha256, smollm_gguf

    try:
        gguf = smollm_gguf()
    except ModelError as exc:
        raise SystemExit(f"error: {exc}") from None
    for folder in CAUSAL_PREPARED:
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir()
    first, second = CAUSAL_PREPARED
    download_wheels(first / "wheels", [*WHEELS, "gguf==0.19.0"])  # gguf: transformers reads GGUF with it
    alpaca = data_root / DEFAULT_ALPACA
    if not alpaca.is_file():
        raise SystemExit(f"error: {alpaca} not found: give --data the data root that holds {DEFAULT_ALPACA}")
    (first / "data" / DEFAULT_ALPACA).parent.mkdir(parents=True)
    shutil.copy2(alpaca, first / "data" / DEFAULT_ALPACA)
    whole = gguf.read_bytes()
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    repo = sum((REPO / f).stat().st_size for f in tracked.decode().split("\0") if f and (REPO / f).is_file())
    room = CARRY_LIMIT - repo - 2 * 2**20  # 2 MiB to spare for what the repository gains before the calls
    cut = room - folder_bytes(first)
    if cut <= 0 or len(whole) - cut > room:
        raise SystemExit(f"error: {gguf.name} ({len(whole) / 2**20:.1f} MiB) does not fit two calls beside a "
                         f"repository of {repo / 2**20:.1f} MiB")
    (first / "model.part1").write_bytes(whole[:cut])
    (second / "model.part2").write_bytes(whole[cut:])
    (first / "model.json").write_text(json.dumps({"file": SMOLLM_GGUF, "bytes": len(whole),
                                                  "sha256": file_sha256(gguf)}) + "\n")
    for folder in CAUSAL_PREPARED:
        say(f"prepared {folder.relative_to(REPO)}: {folder_bytes(folder) / 2**20:.1f} MiB, "
            f"{(folder_bytes(folder) + repo) / 2**20:.1f} MiB with the repository (a call carries {CARRY_LIMIT // 2**20})")


def joined_model() -> Path:
    """The GGUF file the two halves make, joined once on the GPU machine and checked against its hash."""
    from fedzip.models.load import file_sha256

    first, second = CAUSAL_PREPARED
    if not (first / "model.json").is_file():
        raise SystemExit(f"error: {first.name}/ is missing: run prepare --suite b6_causal here, then carry "
                         f"{first.name} in a first call")
    facts = json.loads((first / "model.json").read_text())
    model = first / facts["file"]
    if not model.is_file():
        missing = [str(p.relative_to(REPO)) for p in (first / "model.part1", second / "model.part2") if not p.is_file()]
        if missing:
            raise SystemExit(f"error: {', '.join(missing)} missing: the first call carries {first.name}, the next "
                             f"(within 30 s, while the machine is warm) {second.name}")
        partial = model.with_suffix(".partial")
        with open(partial, "wb") as out:
            for part in (first / "model.part1", second / "model.part2"):
                out.write(part.read_bytes())
        partial.replace(model)
    if file_sha256(model) != facts["sha256"]:
        model.unlink()
        raise SystemExit(f"error: the joined {facts['file']} does not match its SHA-256: prepare both halves again")
    return model


# -- run (on the GPU machine) -----------------------------------------------------------------------
def run_command(suite: Suite, label: str, seed: int, out: Path, threads: int, resume: bool, extra: list[str],
                prepared: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "fedzip.cli", "run", str(REPO / "configs" / f"{suite.config}.yaml"), "--out", str(out),
           "--quiet", "--set", f"train.threads={threads}"]
    for o in [*suite.profile, *suite.rows[label][0], *extra, f"seed={seed}", *prepared]:
        cmd += ["--set", o]
    return cmd + (["--resume"] if resume else [])


def prepared_b1() -> tuple[list[str], Path | None]:
    """.gpu/'s MiniLM and its 20 Newsgroups, already stripped (so nothing is removed again)."""
    data = PREPARED / "data"
    return ([f"model.name={PREPARED / 'minilm'}"] if (PREPARED / "minilm").exists() else []) + (
        ["data.remove=[]"] if data.exists() else []), data if data.exists() else None


def prepared_causal() -> tuple[list[str], Path | None]:
    """SmolLM2 joined from its two halves (converted to safetensors once here, not by each run) and the data."""
    from fedzip.models.load import resolve

    first = CAUSAL_PREPARED[0]
    overrides = []
    if (first / "model.json").exists():
        model = str(joined_model())
        resolve(model)
        overrides.append(f"model.name={model}")
    return overrides, first / "data" if (first / "data").exists() else None


def run_suite(suite: Suite, out: Path, budget_s: float, parallel: int, done: set[str], only: set[str],
              seeds: set[int], resume_from: Path | None, quick: bool, work: Path) -> None:
    from fedzip.report.compact import compact_run

    t0 = time.time()
    prepared, data = suite.prepared()
    if quick:  # two rounds: CG-FedLLM's TGAP phase shrinks to one
        suite.rows = {k: ([o.replace("tgap_rounds: 40", "tgap_rounds: 1") for o in v], what)
                      for k, (v, what) in suite.rows.items()}
    work.mkdir(parents=True, exist_ok=True)
    if resume_from:
        with tarfile.open(resume_from) as tar:
            tar.extractall(work, filter="data")
    queue = [(label, s) for label, s in suite.priority if f"{label}-s{s}" not in done and (not only or label in only)
             and (not seeds or s in seeds)]
    # unfinished runs from an earlier machine first: they have the least left to do
    queue.sort(key=lambda t: not (work / f"{t[0]}-s{t[1]}" / "checkpoints" / "state.json").exists())
    extra = suite.quick if quick else []
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=os.pathsep.join(
        [str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    if data:
        env["FEDZIP_DATA"] = str(data)
    threads = max(1, (os.cpu_count() or 2) // parallel)
    running: dict[str, tuple[subprocess.Popen, float, bool]] = {}
    finished, results, paces = [], [], []
    start_times: dict[str, float] = {}  # every run started here, and when each ended, for progress.json
    end_times: dict[str, float] = {}
    (out / "gpu_results.json").write_text("[]\n")
    while queue or running:
        for name, (proc, started, resumed) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            end_times[name] = time.time()
            if proc.returncode == 0:
                if not resumed:  # a resumed run's time says nothing about a whole run's
                    paces.append(time.time() - started)
                label = name.rsplit("-s", 1)[0]
                results.append(compact_run(work / name, label) | {
                    "what": suite.rows[label][1], "benchmark": suite.bench, "profile": "gpu",
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
            proc = subprocess.Popen(run_command(suite, label, seed, work / name, threads, resume, extra, prepared),
                                    stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
            running[name] = (proc, time.time(), resume)
            start_times[name] = time.time()
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
    write_progress(work, out, start_times, end_times)
    pack_unfinished(work, out, set(finished) | done)
    say(f"{len(finished)} run(s) finished: {', '.join(finished) or 'none'}; results in {out / 'gpu_results.json'}")


def write_progress(work: Path, out: Path, start_times: dict[str, float], end_times: dict[str, float]) -> None:
    """progress.json: for each run started on this machine, the rounds it did and in how many seconds."""
    progress = {}
    for name, t in start_times.items():
        metrics = work / name / "metrics.jsonl"
        rounds = [json.loads(line).get("round") for line in metrics.read_text().splitlines()] if metrics.exists() else []
        progress[name] = {"rounds_done": max([r for r in rounds if isinstance(r, int)], default=0),
                          "seconds": round(end_times.get(name, time.time()) - t, 1),
                          "finished": (work / name / "summary.json").exists()}
    (out / "progress.json").write_text(json.dumps(progress, indent=1) + "\n")


def pack_unfinished(work: Path, out: Path, finished: set[str], limit: int = 12 * 2**20) -> None:
    """Every started, unfinished run (config, metrics, ledger, checkpoint) in one file for the next machine,
    but for runs too large to come back (a call returns files of 16 MiB at most): the next machine starts those
    again."""
    keep = [d for d in work.iterdir() if d.is_dir() and d.name not in finished
            and (d / "checkpoints" / "state.json").exists() and not (d / "summary.json").exists()]
    too_large = [d for d in keep if folder_bytes(d) > limit]
    if too_large:
        say(f"not packed, over {limit // 2**20} MiB: {', '.join(d.name for d in too_large)} (they start again)")
    keep = [d for d in keep if d not in too_large]
    if not keep:
        return
    with tarfile.open(out / "unfinished.tar.gz", "w:gz") as tar:
        for d in keep:
            tar.add(d, arcname=d.name)
    say(f"unfinished: {', '.join(d.name for d in keep)} -> {out / 'unfinished.tar.gz'}")


# -- collect (back on a development machine) ----------------------------------------------------------
SUITES = ("b1", "b6_causal")


def collect(folder: Path) -> None:
    from fedzip.report.compact import FORMAT

    benches = {suite_named(name).bench for name in SUITES}
    results = json.loads((folder / "gpu_results.json").read_text())
    for r in results:
        if r.get("format") != FORMAT or r.get("benchmark") not in benches:
            raise SystemExit(f"error: {folder / 'gpu_results.json'} holds something other than compact results "
                             f"of {' or '.join(sorted(benches))}")
        if r.get("quick"):
            raise SystemExit(f"error: {folder / 'gpu_results.json'} comes from run --quick (a check of the suite), "
                             "not the gpu profile; nothing filed")
        target = REPO / "benchmarks" / "results" / "runs" / r["benchmark"]
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
    p = sub.add_parser("prepare", help="write .gpu/ (or .gpu_causal/ and .gpu_causal_2/) for a bare GPU machine")
    p.add_argument("--data", default=os.environ.get("FEDZIP_DATA", str(REPO.parent / "shared" / "data")))
    r = sub.add_parser("run", help="run the gpu profiles on this machine's GPU")
    r.add_argument("--out", required=True, help="folder for gpu_results.json, progress.json and unfinished.tar.gz")
    r.add_argument("--budget-s", type=float, default=660, help="stop by then (default 660 s: 11 minutes)")
    r.add_argument("--parallel", type=int, default=8, help="runs at once on the GPU (default 8)")
    r.add_argument("--only", default="", help="comma-separated labels")
    r.add_argument("--seeds", default="", help="comma-separated seeds (default: 0, 1, 2)")
    r.add_argument("--resume-from", type=Path, help="unfinished.tar.gz from an earlier machine")
    r.add_argument("--quick", action="store_true", help="2 tiny rounds per run: check the suite itself, anywhere")
    r.add_argument("--cpu", action="store_true", help="with --quick: on the CPU (tests the suite without a GPU)")
    r.add_argument("--work", type=Path, help="folder for the run directories (default benchmarks/runs/<bench>/gpu)")
    for sp in (p, r):
        sp.add_argument("--suite", choices=SUITES, default="b1",
                        help="b1: B1's gpu profile (default); b6_causal: B6's causal-LM rows (FedIT, FedKSeed)")
    c = sub.add_parser("collect", help="file a GPU machine's results under results/runs/<bench>")
    c.add_argument("folder", type=Path)
    args = ap.parse_args()
    if args.step == "prepare":
        (prepare if args.suite == "b1" else prepare_causal)(Path(args.data))
    elif args.step == "collect":
        collect(args.folder)
    else:
        import torch

        suite = suite_named(args.suite)
        if args.cpu:
            if not args.quick:
                ap.error("--cpu only with --quick: the gpu profile needs a GPU")
            suite.profile[suite.profile.index("train.device=cuda")] = "train.device=cpu"
        elif not torch.cuda.is_available():
            raise SystemExit("error: no CUDA device here; the gpu profile needs one (try run --quick --cpu)")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        done = {p.stem for p in (REPO / "benchmarks" / "results" / "runs" / suite.bench).glob("*.json")}
        seeds = {int(x) for x in args.seeds.split(",") if x.strip().isdigit()}
        run_suite(suite, out, args.budget_s, args.parallel, done, {x for x in args.only.split(",") if x}, seeds,
                  args.resume_from, args.quick, args.work or REPO / "benchmarks" / "runs" / suite.bench / "gpu")


if __name__ == "__main__":
    main()
