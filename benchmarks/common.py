"""Shared benchmark harness: run a matrix of fedzip configs in parallel subprocesses, collect results.

Each run is an ordinary ``fedzip run`` into ``benchmarks/runs/<bench>/<profile>/<label>`` (not committed);
results (JSON, markdown table, plots) go to ``benchmarks/results/``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), {gpu}, torch {torch.__version__}"


def say(line: str) -> None:
    sys.stdout.write(line + "\n")  # one write, so lines from parallel runs do not interleave
    sys.stdout.flush()


def run_one(label: str, config: str, overrides: list[str], out: Path, threads: int, stop_after: int | None = None) -> Path:
    """``fedzip run`` into ``out`` (resumed when a checkpoint is there); ``stop_after`` ends it after that round."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("FEDZIP_DATA", str((ROOT.parent.parent / "shared" / "data").resolve()))
    if out.exists() and (out / "summary.json").exists():
        say(f"[{label}] already done: {out}")
        return out
    cmd = [sys.executable, "-m", "fedzip.cli", "run", config, "--out", str(out), "--quiet",
           "--set", f"train.threads={threads}", *[a for o in overrides for a in ("--set", o)]]
    if stop_after is not None:
        cmd += ["--stop-after", str(stop_after)]
    resume = (out / "checkpoints" / "state.json").exists()
    if resume:
        cmd.append("--resume")  # an interrupted benchmark continues where it stopped
    elif out.exists():  # stopped before its first checkpoint: nothing to resume (fedzip run would write <out>-2)
        shutil.rmtree(out)
    t0 = time.time()
    say(f"[{label}] start: {' '.join(cmd[3:])}")
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a" if resume else "w") as fh:  # a resumed run keeps the log of its first part
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT.parent)
    if rc != 0:
        raise RuntimeError(f"[{label}] failed with exit {rc}; see {log}")
    say(f"[{label}] done in {time.time() - t0:.0f}s")
    return out


def _run_dir(bench: str, profile: str, label: str, home: list[str]) -> Path:
    other_bench, _, other_label = (home[0] if home else f"{bench}/{label}").partition("/")
    return ROOT / "runs" / other_bench / profile / other_label


def bench_threads(jobs: int) -> int:
    """Torch threads for each of ``jobs`` parallel runs: ``FEDZIP_BENCH_THREADS`` if set (1 when two trainers
    share 2 cores: they run faster so), else the cores shared out."""
    return int(os.environ.get("FEDZIP_BENCH_THREADS", 0)) or max(1, (os.cpu_count() or 2) // jobs)


def run_matrix(bench: str, profile: str, runs: list[tuple], jobs: int) -> dict[str, Path]:
    """Run (label, config, overrides[, home]) in ``jobs`` parallel subprocesses; return each label's run dir.

    ``home`` ("<bench>/<label>") names the same run in another benchmark (identical config and overrides):
    its directory is reused, so a shared reference such as FedIT is trained once for every benchmark."""
    threads = bench_threads(jobs)
    dirs = {label: _run_dir(bench, profile, label, home) for label, _, _, *home in runs}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run_one, label, cfg, ov, dirs[label], threads) for label, cfg, ov, *_ in runs]
        for f in futures:
            f.result()
    return dirs


def collect(run_dir: Path, profile: str, label: str) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    curve, cum_up, cum_down = [], 0, 0
    for r in rows:
        cum_up += r["bytes_up"]
        cum_down += r["bytes_down"]
        point = {"round": r["round"], "bytes_up": r["bytes_up"], "bytes_down": r["bytes_down"],
                 "cum_bytes_up": cum_up, "cum_bytes_down": cum_down, "round_s": round(r["round_s"], 3),
                 "compute_s": round(r["compute_s"], 3), "train_loss": r.get("train_loss")}
        for k in ("accuracy", "macro_f1", "loss", "perplexity", "ceval_accuracy", "exact_match", "emu_loss",
                  "emu_exact_match", "eval_examples"):
            if k in r:
                point[k] = r[k]
        curve.append(point)
    # Where the run trained (it may have run on another machine, e.g. a GPU, and been collected here).
    where = summary.get("device", "cpu")
    ran_on = (f"{summary['cpu_count']} CPU cores, {where}, torch {summary['torch']}" if where != "cpu" else machine())
    return {"label": label, "method": summary["method"], "profile": profile, "machine": ran_on,
            "final_metrics": summary["final_metrics"], "bytes_up_total": summary["bytes_up_total"],
            "bytes_down_total": summary["bytes_down_total"], "wall_seconds": round(summary["wall_seconds"], 1),
            "time_split_s": {k: round(v, 2) for k, v in summary["time_split_s"].items()},
            "rounds": summary["rounds_completed"], "curve": curve}


def merge_results(path: Path, new_runs: list[dict]) -> dict:
    """New results replace earlier results of the same (profile, label); all others are kept."""
    old = json.loads(path.read_text()) if path.exists() else {"runs": []}
    fresh = {(r["profile"], r["label"]) for r in new_runs}
    runs = [r for r in old["runs"] if (r["profile"], r["label"]) not in fresh] + new_runs
    data = {"benchmark": path.stem, "runs": runs}
    path.write_text(json.dumps(data, indent=1) + "\n")
    return data


def plot_accuracy(runs: list[dict], path: Path, title: str, axes: tuple[str, ...] = ("round", "mb")) -> None:
    """Accuracy against rounds and/or cumulative MB (up + down), one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One colour per run: tab10 repeats after ten runs, so later runs change line style and marker.
    colours = plt.get_cmap("tab10").colors
    styles = [("-", "o"), ("--", "s"), (":", "^")]
    fig, subplots = plt.subplots(1, len(axes), figsize=(5.5 * len(axes) + 2.0, 4.2), dpi=110, squeeze=False)
    for ax, kind in zip(subplots[0], axes):
        for i, r in enumerate(runs):
            pts = [p for p in r["curve"] if "accuracy" in p]
            xs = ([p["round"] for p in pts] if kind == "round"
                  else [(p["cum_bytes_up"] + p["cum_bytes_down"]) / 1e6 for p in pts])
            line, marker = styles[(i // len(colours)) % len(styles)]
            ax.plot(xs, [p["accuracy"] for p in pts], linestyle=line, marker=marker, ms=3,
                    color=colours[i % len(colours)], label=r["label"])
        ax.set_xlabel("round" if kind == "round" else "cumulative MB (up + down)")
        if kind == "mb":
            ax.set_xscale("log")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    # The legend sits beside the plots so that it never hides a line.
    handles, labels = subplots[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center right")
    fig.suptitle(f"{title} ({runs[0]['machine']})", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1 - 1.9 / fig.get_figwidth(), 1))
    fig.savefig(path)
    plt.close(fig)


def accuracy_figure(runs: list[dict], name: str, title: str, axes: tuple[str, ...] = ("round", "mb"),
                    alt: str = "accuracy") -> list[str]:
    """Plot ``results/<name>.png`` and return the markdown lines that show it (path and link agree)."""
    plot_accuracy(runs, RESULTS / f"{name}.png", title, axes)
    return [f"![{alt}]({name}.png)", ""]


def profile_sections(runs: list[dict], columns: list[str]):
    """Yield (profile, its runs, markdown heading + table header) for each profile present, longest first."""
    for profile in ("long", "full", "medium", "smoke"):
        sel = [r for r in runs if r["profile"] == profile]
        if sel:
            yield profile, sel, [f"## Profile `{profile}` ({sel[0]['machine']})", "",
                                 "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def run_profile(bench: str, config: str, profiles: dict[str, list[str]], runs_for,
                default: str = "smoke") -> tuple[str, list, dict]:
    """Parse ``--profile``/``--jobs``/``--only``, run ``runs_for(profile)`` (label, overrides[, home]) on ``config``.

    Returns the profile, the (label, config, overrides[, home]) runs that have finished (the ones asked
    for with ``--only``, plus any finished earlier) and each one's run directory."""
    import argparse

    ap = argparse.ArgumentParser(description=f"benchmark {bench}")
    ap.add_argument("--profile", choices=sorted(profiles), default=default)
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (threads split between them)")
    ap.add_argument("--only", default="", help="comma-separated labels to run (default: all); "
                    "the tables then show these plus any runs already finished")
    args = ap.parse_args()
    matrix = [(label, config, profiles[args.profile] + ov, *home) for label, ov, *home in runs_for(args.profile)]
    only = {x for x in args.only.split(",") if x}
    unknown = only - {r[0] for r in matrix}
    if unknown:
        ap.error(f"unknown run label(s): {', '.join(sorted(unknown))}; known: {', '.join(r[0] for r in matrix)}")
    run_matrix(bench, args.profile, [r for r in matrix if not only or r[0] in only], args.jobs)
    dirs = {label: _run_dir(bench, args.profile, label, home) for label, _, _, *home in matrix}
    done = [r for r in matrix if (dirs[r[0]] / "summary.json").exists()]
    return args.profile, done, dirs
