"""A finished run's compact result: everything a verdict needs, in one small JSON file.

A run directory holds checkpoints, client state and the exported adapter; none of that is needed to
judge the run against others. The compact result keeps the curve (every round's bytes, compute and
evaluations), the run's time over each link profile, its client memory and step time, and the config
it ran with, so benchmarks can commit one small file per finished run and build verdicts across days
and machines without the run directories.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from fedzip.errors import RunDirError
from fedzip.report.links import LINKS, cumulative_seconds
from fedzip.rundir import RunDir

FORMAT = "fedzip-compact-run/1"
_CURVE_KEYS = ("accuracy", "macro_f1", "loss", "perplexity", "ceval_accuracy", "exact_match", "eval_examples",
               "train_loss", "emu_loss", "emu_exact_match", "fixed_subset", "personal_accuracy", "personal_accuracy_min",
               "personal_accuracy_max", "personal_loss", "accuracy_of",
               "epsilon",  # client-level DP: the accountant's epsilon after each round
               "dp_clip")  # adaptive clipping: the round's bound
# the model each rank tier of a heterogeneous-rank method receives (``degradation_every``): tier4_accuracy, ...
_TIER_KEY = re.compile(r"^tier\d+_(accuracy|loss)$")


def seedless_label(name: str) -> str:
    """A run directory's name without its ``-s<seed>`` suffix: the label its seeds share."""
    return re.sub(r"-s\d+$", "", name)


def compact_run(run_dir: Path, label: str | None = None) -> dict:
    """The compact result of the finished run in ``run_dir`` (one error line if it has not finished)."""
    run = RunDir(run_dir)
    run_dir = run.path
    if not run.finished():
        raise RunDirError(f"{run_dir}: not a finished run (no summary.json)")
    summary = run.read_summary()
    config = yaml.safe_load(run.config.read_text())
    rows = run.rows()
    ledger = run.ledger_rows()
    # A DP run keeps each client's compute, memory and steps in the server's own file (fedzip.privacy): they
    # enter link times, memory and step time here, never the curve, whose keys are all released ones.
    server_rows = run.server_rows()

    curve = []
    for r in rows:
        point = {"round": r["round"], "bytes_up": r["bytes_up"], "bytes_down": r["bytes_down"],
                 "compute_s": round(r.get("compute_s", 0.0), 3), "client_steps": r.get("client_steps")}
        point |= {k: r[k] for k in ("cohort_size", "replied") if k in r}
        point |= {k: r[k] for k in _CURVE_KEYS if r.get(k) is not None}
        point |= {k: v for k, v in r.items() if _TIER_KEY.match(k) and v is not None}
        curve.append(point)
    # Wall time over each link profile, cumulative by round (see fedzip.report.links).
    link_seconds = {name: [round(s, 3) for _, s in sorted(cumulative_seconds(server_rows, ledger, link).items())]
                    for name, link in LINKS.items()}

    steps = sum(r.get("client_steps") or 0 for r in server_rows)
    compute = sum(r.get("compute_s", 0.0) for r in server_rows if r.get("client_steps"))
    memory = [m for r in server_rows for m in (r.get("client_memory") or {}).values()]
    peak_rss = max((m["peak_rss_bytes"] for m in memory if "peak_rss_bytes" in m), default=None)
    peak_cuda = max((m["cuda_peak_bytes"] for m in memory if "cuda_peak_bytes" in m), default=None)
    where = summary.get("device", "cpu")
    extras = {}
    if run.method_facts.exists():  # the method's set-up facts (ranks, map size, latent size, ...)
        extras["method_facts"] = json.loads(run.method_facts.read_text())
    if run.autoencoder_gate.exists():  # CG-FedLLM's quality gate, without its loss curves
        gate = json.loads(run.autoencoder_gate.read_text())
        extras["autoencoder_gate"] = {k: v for k, v in gate.items() if not k.endswith("_loss")}
    return extras | {
        "format": FORMAT, "label": label or seedless_label(run_dir.name), "method": summary["method"],
        "seed": summary["seed"], "config": config,
        "machine": f"{summary.get('cpu_count')} CPU cores, {where}, torch {summary.get('torch')}, "
                   f"{summary.get('torch_threads')} thread(s)",
        "device": where, "wall_seconds": round(summary["wall_seconds"], 1),
        "time_split_s": {k: round(v, 2) for k, v in summary["time_split_s"].items()},
        "final_metrics": summary["final_metrics"], "rounds": summary["rounds_completed"],
        "bytes_up_total": summary["bytes_up_total"], "bytes_down_total": summary["bytes_down_total"],
        **({"bytes_eval_total": summary["bytes_eval_total"]} if "bytes_eval_total" in summary else {}),
        "wire_format": summary.get("wire_format", "FZP1"),  # runs from before the key all sent FZP1
        # the code that produced the run (None: a run from before it was recorded); "+dirty": uncommitted changes
        "code_commit": code_commit(summary.get("code")),
        "client_step_s": round(compute / steps, 4) if steps else None,
        "client_peak_rss_bytes": peak_rss, "client_cuda_peak_bytes": peak_cuda,
        "curve": curve, "link_seconds": link_seconds, "warnings": summary.get("warnings", []),
    }


def code_commit(code: dict | None) -> str | None:
    if not code or not code.get("commit"):
        return None
    return code["commit"] + ("+dirty" if code.get("dirty") else "")


def load_compact(path: Path) -> dict:
    data = json.loads(Path(path).read_text())
    if data.get("format") != FORMAT:
        raise RunDirError(f"{path}: not a compact run result ({FORMAT})")
    return data
