"""B2 under protocol v2: FedBiOT with its emulator pre-aligned to the quality gate, against FedOT,
offsite-tuning and FedIT on the full model, three seeds each.

B2's task and model (SmolLM2-135M-Instruct, GSM8K, 3 iid clients, LoRA r=8, AdamW 3e-4) for 12 rounds of 8
local steps, evaluated every 2 rounds on a fixed 50-question subset of a fixed 100-question test set (loss:
the metric; greedy exact match on 16 questions of a 135M model is 0 for every method, so it is left out).
The reference is FedIT on the full model. For the FedBiOT rows the server pre-aligns the emulator until it is
within ``MARGIN`` nats of the full model on held-out public data, or for ``BUDGET`` steps; each run's
``method_facts.prealignment`` says which, with the curve of the public loss.

Rows: FedBiOT with the authors' GSM8K alignment (LM loss alone, drop 0.2, proximal term without gradient) at
an alignment rate of 1e-3 on all ~950 public examples (the authors' 3e-4 does not meet the gate in their 500
steps: ``b2_emulator.py``), FedBiOT with our alignment loss (hidden-state match + KL) on the same emulator,
FedOT and offsite-tuning (drop 0.5, adapter = first 2 + last 2 layers).
AdapFu is the run's loss (the adapter in the full model); AdapEmu is ``emu_loss`` (the adapter on the
emulator, what clients trained).

    python benchmarks/b2_aligned.py --commit      # every row x seeds 0,1,2 not done yet
    python benchmarks/b2_aligned.py --board       # rebuild results/b2_aligned.{md,json}

A FedBiOT run pre-aligns for up to BUDGET steps first: 8-10 s a step on one CPU core, well under a
second on a GPU (``--set train.device=auto`` is in the profile, so a lent GPU is used).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, say  # noqa: E402
from seeded import SeededBenchmark, figure_lines, paired_values, verdict  # noqa: E402

from fedzip.report.leaderboard import build_leaderboard, leaderboard_markdown, mean_std, mean_std_text  # noqa: E402

BENCH = "b2_aligned"
CONFIG = "b2_fedbiot"
PROFILE = ["rounds=12", "eval.every=2", "eval.max_examples=50", "data.max_test_examples=100",
           "eval.exact_match_examples=0", "train.max_steps=8", "train.device=auto"]
# Pre-alignment: at most BUDGET server steps (the authors' GSM8K set-up: 100 rounds x 5), stopped once within
# MARGIN nats. The entries are cached per seed (prealign_cache): b2_emulator.py's measurement of a construction
# is this benchmark's seed-0 pre-alignment of it, and an interrupted one continues.
BUDGET, MARGIN = 500, 0.5
# The rate is 1e-3 on every public example, not the authors' 3e-4: at 3e-4 (and 256 examples) their alignment
# levels off 0.56 nats above the full model after 500 steps, at 1e-3 on all ~950 it meets the gate at 300
# (b2_emulator.py, seed 0), just: 2.35, 2.36, 2.34 at steps 250, 275, 300 against a gate of 2.35.
GATE = (f"prealign_steps: {BUDGET}, prealign_margin: {MARGIN}, prealign_check_every: 25, align_steps: 5, "
        "align_batch: 4, align_lr: 0.001, public_max_examples: null")
OURS = "drop: 0.2, keep_bottom: 0"  # the authors' construction, so that the row differs from theirs in the loss alone
AUTHORS = "drop: 0.2, align_l2_weight: 0, align_lambda: 0, align_lm_weight: 1, prox_gradient: false"

ROWS = [
    ("fedit_full_model", ["method=fedit", "method_options={}"], "FedIT: LoRA on the full model (reference)"),
    ("fedbiot", ["method=fedbiot", f"method_options={{adapter_layers: 2, {OURS}, {GATE}}}"],
     f"FedBiOT ({OURS}), our alignment loss, pre-aligned to the gate"),
    ("fedbiot_authors", ["method=fedbiot", f"method_options={{adapter_layers: 2, {AUTHORS}, {GATE}}}"],
     "FedBiOT as the authors' GSM8K code aligns (LM loss alone, drop 0.2, proximal term without gradient), at "
     "align lr 1e-3 on every public example, pre-aligned to the gate"),
    ("fedot", ["method=fedot", "method_options={drop: 0.5}"], "FedOT: adapter first 2 + last 2, emulator not aligned"),
    ("offsite_tuning", ["method=offsite_tuning", "method_options={drop: 0.5}"], "offsite-tuning: FedOT with one client"),
]
BENCHMARK = SeededBenchmark(BENCH, CONFIG, PROFILE, ROWS)
# Runs that shared the 2 cores with more than the other benchmark run (the test suite): their loss and bytes
# are unaffected, their step times inflated.
SHARED_CORES = [("fedbiot_authors", 2), ("fedot", 2)]


def last(record: dict, key: str) -> float | None:
    """The metric at the run's last evaluation on the fixed subset (the whole test set is only 100)."""
    values = [p[key] for p in record["curve"] if key in p]
    return values[-1] if values else None


def prealignments(records: list[dict], label: str) -> list[dict]:
    """The pre-alignment report of each finished run of ``label``."""
    return [r["method_facts"]["prealignment"] for r in records
            if r["label"] == label and r.get("method_facts", {}).get("prealignment")]


def gate_met(records: list[dict], label: str) -> tuple[int, int]:
    """(runs whose emulator met the gate, runs) for a FedBiOT row."""
    reports = prealignments(records, label)
    return sum(bool(p.get("prealign_gate_met")) for p in reports), len(reports)


def emulator_lines(records: list[dict]) -> list[str]:
    """Per FedBiOT row: the pre-alignment's gate (steps, public loss of full model and emulator, met?)."""
    lines = ["| row | seeds | steps run | public loss: full model | emulator before | emulator after | gate met |",
             "|---|---|---|---|---|---|---|"]
    for label in ("fedbiot", "fedbiot_authors"):
        reports = prealignments(records, label)
        if not reports:
            continue
        cell = lambda k: mean_std([p[k] for p in reports])  # noqa: E731
        met, _ = gate_met(records, label)
        lines.append(f"| {label} | {len(reports)} | {mean_std_text(cell('prealign_steps_run'), '.0f')} | "
                     f"{mean_std_text(cell('public_loss_full'), '.2f')} | "
                     f"{mean_std_text(cell('public_loss_emulator_before'), '.2f')} | "
                     f"{mean_std_text(cell('public_loss_emulator_after'), '.2f')} | {met}/{len(reports)} |")
    return lines


def adapters_lines(records: list[dict]) -> list[str]:
    """AdapFu and AdapEmu loss at the last evaluation, mean ± std over seeds, with client cost."""
    lines = ["| row | seeds | AdapFu loss | AdapEmu loss | client s/step | MB up, whole run | MB down, whole run |",
             "|---|---|---|---|---|---|---|"]
    for label, _, _ in ROWS:
        runs = [r for r in records if r["label"] == label]
        if not runs:
            continue
        fu = mean_std([last(r, "loss") for r in runs if last(r, "loss") is not None])
        emu = mean_std([last(r, "emu_loss") for r in runs if last(r, "emu_loss") is not None])
        step = mean_std([r["client_step_s"] for r in runs if r.get("client_step_s")])
        up = sum(r["bytes_up_total"] for r in runs) / len(runs) / 1e6
        down = sum(r["bytes_down_total"] for r in runs) / len(runs) / 1e6
        cells = " | ".join(mean_std_text(v) for v in (fu, emu, step))
        lines.append(f"| {label} | {len(runs)} | {cells} | {up:.1f} | {down:.1f} |")
    return lines


def paired_last(records: list[dict], row: str, baseline: str, key: str) -> list[float]:
    """Per seed both rows have: the baseline's loss at its last evaluation minus the row's (positive: the
    row's loss is lower, it is ahead)."""
    return [vb - va for va, vb in paired_values(records, row, baseline, lambda r: last(r, key))]


def claims(records: list[dict]) -> list[str]:
    """The paper's claim, FedBiOT beats FedOT and offsite-tuning, judged seed by seed on AdapFu (the adapter
    plugged into the full model: what the federation delivers) and, beside it, AdapEmu."""
    lines = ["## What the paper claims", "",
             "FedBiOT's loss against each baseline's, seed by seed at the last evaluation (the baseline's minus "
             "FedBiOT's, in nats: positive means FedBiOT is ahead). A claim **holds** when FedBiOT is ahead on every "
             "one of at least 3 seeds and **does not hold** when it is not ahead on the mean. The comparison is "
             "meaningful only where the emulator passed its gate (the table above).", ""]
    for row in ("fedbiot", "fedbiot_authors"):
        met, runs = gate_met(records, row)
        gate = f" (gate met on {met} of {runs} seed(s))" if runs else ""
        for baseline in ("fedot", "offsite_tuning"):
            fu = verdict(paired_last(records, row, baseline, "loss"), unit="nats", fmt="+.3f")
            emu = verdict(paired_last(records, row, baseline, "emu_loss"), unit="nats", fmt="+.3f")
            lines.append(f"- `{row}` beats `{baseline}`{gate}: AdapFu {fu}; AdapEmu {emu}.")
    return lines + [""]


def write_board() -> None:
    records = BENCHMARK.records()
    lines = ["# B2 under protocol v2: FedBiOT with an aligned emulator, FedOT, offsite-tuning, FedIT", "",
             "Rebuilt by `python benchmarks/b2_aligned.py --board`; protocol [PROTOCOL.md](../PROTOCOL.md). "
             "SmolLM2-135M-Instruct on GSM8K, 3 iid clients, 12 rounds of 8 local steps; loss (nats, lower is "
             "better) on a fixed 50-question subset. Mean ± std over seeds.", ""]
    if not records:
        lines += ["No run has finished yet.", ""]
    else:
        lines += ["## The emulator's pre-alignment", "", *emulator_lines(records), "",
                  "## The adapter in the full model (AdapFu) and on the emulator (AdapEmu)", "",
                  *adapters_lines(records), "", *claims(records)]
        if any(r["label"] == "fedit_full_model" for r in records):
            board = build_leaderboard(records, reference="fedit_full_model")
            for row in board["rows"]:
                row["what"] = BENCHMARK.what.get(row["label"], "")
            (RESULTS / "b2_aligned.json").write_text(json.dumps(board, indent=1) + "\n")
            lines += ["## Against FedIT on the full model (loss target: its smoothed final + 0.01)", "",
                      *leaderboard_markdown(board), "",
                      *figure_lines(board, records, "b2_aligned.png", "B2: AdapFu loss, mean over seeds, band = 1 std",
                                    "AdapFu loss")]
    lines += [f"- `{label}`: {what}" for label, _, what in ROWS] + [""]
    shared = [f"{label} s{seed}" for label, seed in SHARED_CORES
              if any(r["label"] == label and r["seed"] == seed for r in records)]
    if shared:
        lines += [f"**Timing caveat.** Besides the one other benchmark run, these runs shared the 2 cores with test "
                  f"runs for part of their run: {', '.join(shared)}. Their loss and bytes are unaffected; their client "
                  "step times are inflated.", ""]
    (RESULTS / "b2_aligned.md").write_text("\n".join(lines))
    say("\n".join(lines))


def main() -> None:
    BENCHMARK.main(__doc__.split("\n")[0], write_board)


if __name__ == "__main__":
    main()
