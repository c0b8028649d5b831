"""The compression seeds run as their papers run them, judged under protocol v2: FLASC and CG-FedLLM on B1-cpu.

Every row shares the cpu profile of ``b1_cpu.py`` (client SGD-momentum 0.9 with a cosine decay, 150 rounds,
20 clients, Dirichlet 1.0) and three seeds; the servers average as FedAvg. The FLASC authors' code steps its
server with AdamW (lr 1e-3) for every method; here FLASC and its reference FedIT share plain FedAvg, so the
byte ratio between them measures the codec alone. The server-AdamW pairing is not run.

* **FLASC** runs the paper's set-up: LoRA on every attention and MLP projection (``all-linear``, so the head is
  1.1% of the entries rather than 3.4%) with the head outside the download mask (the paper's
  heterogeneous-client code), at densities 1/4 and 1/16 both ways, with fp32 values and with int8 + zstd.
  Its reference is FedIT with the same LoRA (``fedit_al``); the client learning rate of all these rows is
  chosen on ``fedit_al`` seed 0 by ``--lr-pilot`` among the rates stable on every seed tried, then fixed.
* **CG-FedLLM** trains its autoencoder to the quality gate (early stopping on held-out TGAP maps; the run
  stops if the gate fails) and is set against FedIT and against top-k on the uplink at the same ratio
  (``topk_up_1_16``). Its reference is B1-cpu's FedIT (``results/runs/b1_cpu/fedit-s*.json``, the same profile).
* ``--gate-study`` runs only the TGAP phase (``fedzip run --stop-after``) of the linear 1/16 and the paper's conv
  1/64 autoencoders, with one map per client and round (the paper's temporal ensemble) and with three
  snapshots each, and tabulates the gate: the autoencoder's held-out cosine against the zero output, a random
  projection with a least-squares decoder, block PCA and top-k at the same size.

    python benchmarks/b1_compression.py --lr-pilot           # fedit_al seed 0 at three learning rates
    python benchmarks/b1_compression.py --gate-study         # four TGAP-only runs
    python benchmarks/b1_compression.py --commit             # every row x seeds 0,1,2 not done yet
    python benchmarks/b1_compression.py --budget-pilot       # FLASC int8 1/16, the rounds 1/10 of FedIT's bytes buy
    python benchmarks/b1_compression.py --board              # rebuild results/b1_compression.{md,json,png}

Compact results go to ``results/runs/b1_compression/``, the pilot's and the study's to
``results/pilots/b1_all_linear_lr/`` (+ ``b1_all_linear_lr.json``) and ``results/b1_compression_gate.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from b1_cpu import BENCHMARK as B1_CPU  # noqa: E402
from b1_cpu import CONFIG, FEDAVG_SERVER, PROFILE  # noqa: E402
from b1_cpu import write_board as write_leaderboard  # noqa: E402
from common import RESULTS, ROOT, run_one, say  # noqa: E402
from seeded import SeededBenchmark, commit_file, figure_lines, ratio_verdict  # noqa: E402

from fedzip.report.leaderboard import build_leaderboard, leaderboard_markdown, mean_std  # noqa: E402
from fedzip.report.targets import cumulative_bytes, fixed_subset_curve, smoothed  # noqa: E402

BENCH = "b1_compression"
# The client learning rate with all-linear LoRA (three times the trainable entries of q/k/v LoRA, for
# which b1_cpu's 0.5 was chosen) is chosen on fedit_al seed 0 by --lr-pilot: the best smoothed final
# accuracy of LR_GRID, read from the pilot's result. The FLASC rows wait for it.
LR_GRID = (0.2, 0.5, 1.0)
PILOT = RESULTS / "pilots" / "b1_all_linear_lr.json"


def chosen_lr() -> float | None:
    """The best smoothed final accuracy of the pilot among the rates that stayed stable on every seed tried
    (the pilot's ``unstable``: lr 0.5 won on seed 0 and then diverged on seed 1 in the rows, round ~20)."""
    if not PILOT.exists():
        return None
    pilot = json.loads(PILOT.read_text())
    unstable = set(pilot.get("unstable", []))
    results = [r for r in pilot["results"] if r["smoothed_final_accuracy"] is not None and r["lr"] not in unstable]
    return max(results, key=lambda r: r["smoothed_final_accuracy"])["lr"] if results else None


ALL_LINEAR = ["lora.target_modules=all-linear"]
INT8 = ["wire.up=int8+zstd", "wire.down=int8+zstd"]
TGAP = 30  # a fifth of the rounds, as b1_cpu's CG-FedLLM row
TGAP_SNAPSHOTS = 1  # maps per client and TGAP round: the gate study found three no better (held-out cosine 0.674 vs 0.678)
CG_LINEAR16 = f"autoencoder: linear, linear_ratio: 16, tgap_rounds: {TGAP}, ae_lr: 0.003, ae_epochs: 400, ae_patience: 30"


# (label, seed) of runs whose measured compute is inflated: other work shared the cores for part of the run
SHARED_CORES = [("fedit_al", 0), ("fedit_al", 1), ("fedit_al", 2), ("flasc_al_1_4", 0), ("flasc_al_1_16", 0),
                ("flasc_al_1_4_int8", 0), ("flasc_al_1_16_int8", 0), ("cgfedllm_linear16_gated", 0), ("topk_up_1_16", 0),
                ("flasc_al_1_4", 1), ("flasc_al_1_16", 1), ("flasc_al_1_4_int8", 1)]
FLASC_ROWS = {"fedit_al", "flasc_al_1_4", "flasc_al_1_16", "flasc_al_1_4_int8", "flasc_al_1_16_int8"}
CG_ROWS = {"cgfedllm_linear16_gated", "topk_up_1_16"}


def flasc(density: float) -> list[str]:
    return ["method=flasc", f"method_options={{{FEDAVG_SERVER}, d_dl: {density}, d_ul: {density}, "
                            "dense_head_download: true}"]


def rows(lr: float | None) -> list[tuple[str, list[str], str]]:
    """Every row; without the pilot's learning rate (None), only the CG-FedLLM rows (q/k/v, b1_cpu's lr)."""
    al = [*ALL_LINEAR, f"train.lr={lr}"]
    every = [
        ("fedit_al", al, "FedIT, LoRA r=16 on every linear layer (reference of the FLASC rows)"),
        ("flasc_al_1_4", al + flasc(0.25), "FLASC 1/4 both ways, all-linear LoRA, head downloaded whole, fp32"),
        ("flasc_al_1_16", al + flasc(0.0625), "FLASC 1/16 both ways, all-linear LoRA, head downloaded whole, fp32"),
        ("flasc_al_1_4_int8", al + flasc(0.25) + INT8, "the same at 1/4, values int8 + zstd both ways"),
        ("flasc_al_1_16_int8", al + flasc(0.0625) + INT8, "the same at 1/16, values int8 + zstd both ways"),
        ("cgfedllm_linear16_gated", ["method=cgfedllm", f"method_options={{{CG_LINEAR16}, "
                                                        f"tgap_snapshots: {TGAP_SNAPSHOTS}}}"],
         f"CG-FedLLM: {TGAP} TGAP rounds, linear 1/16 autoencoder trained to the quality gate (q/k/v LoRA)"),
        ("topk_up_1_16", ["method=flasc", f"method_options={{{FEDAVG_SERVER}, d_ul: 0.0625}}"],
         "top-k 1/16 on the uplink only, dense download (q/k/v LoRA): CG-FedLLM's uplink ratio without a codec"),
    ]
    return every if lr is not None else [r for r in every if r[0] in CG_ROWS]


BENCHMARK = SeededBenchmark(BENCH, CONFIG, PROFILE, rows(chosen_lr()), references=["fedit_al"])


# --- the all-linear learning-rate pilot ------------------------------------------------------------
def lr_pilot(commit: bool, _seeds: list[int]) -> None:
    """FedIT with all-linear LoRA, seed 0 (whatever --seeds says), at each rate of LR_GRID; the best smoothed final
    accuracy wins."""
    pilot = SeededBenchmark("b1_all_linear_lr", CONFIG, PROFILE,
                            [(f"fedit_al_lr{lr:g}", [*ALL_LINEAR, f"train.lr={lr}"], f"FedIT all-linear, lr {lr:g}")
                             for lr in LR_GRID], results_dir=RESULTS / "pilots" / "b1_all_linear_lr")
    failed = pilot.run([0], set(), jobs=2, commit=commit)
    results = []
    for r in pilot.records():
        curve = smoothed(fixed_subset_curve(r["curve"], "accuracy"))
        results.append({"label": r["label"], "lr": float(r["label"].rsplit("lr", 1)[1]),
                        "smoothed_final_accuracy": curve[-1][1] if curve else None,
                        "final_accuracy": r["final_metrics"].get("accuracy")})
    PILOT.parent.mkdir(parents=True, exist_ok=True)
    PILOT.write_text(json.dumps({"grid": list(LR_GRID), "seed": 0, "results": results}, indent=1) + "\n")
    for r in results:
        say(f"{r['label']}: smoothed final accuracy {r['smoothed_final_accuracy']}")
    say(f"the FLASC rows will train at lr {chosen_lr()}")
    if commit:
        commit_file(PILOT, "b1_compression: all-linear learning-rate pilot")
    if failed:
        raise SystemExit(f"error: {len(failed)} pilot run(s) failed: {', '.join(failed)}")


# --- the gate study ----------------------------------------------------------------------------------
GATE_STUDY = [
    ("linear16_snap1", f"{CG_LINEAR16}, tgap_snapshots: 1"),
    ("linear16_snap3", f"{CG_LINEAR16}, tgap_snapshots: 3"),
    ("conv64_snap1", f"autoencoder: conv, tgap_rounds: {TGAP}, ae_epochs: 150, ae_patience: 20, tgap_snapshots: 1"),
    ("conv64_snap3", f"autoencoder: conv, tgap_rounds: {TGAP}, ae_epochs: 150, ae_patience: 20, tgap_snapshots: 3"),
]


def gate_study(commit: bool, _seeds: list[int]) -> None:
    """Seed 0, TGAP only (the run stops after round TGAP, where the gate is decided); ``ae_gate: warn`` keeps every result."""
    path = RESULTS / "b1_compression_gate.json"
    done = json.loads(path.read_text())["runs"] if path.exists() else {}
    for label, options in GATE_STUDY:
        if label in done:
            continue
        out = ROOT / "runs" / BENCH / "gate" / label
        overrides = [*PROFILE, "method=cgfedllm", f"method_options={{{options}, ae_gate: warn}}", "seed=0"]
        if not (out / "autoencoder_gate.json").exists():
            run_one(label, f"configs/{CONFIG}.yaml", overrides, out, threads=2, stop_after=TGAP)
        gate = json.loads((out / "autoencoder_gate.json").read_text())
        done[label] = {k: v for k, v in gate.items() if not k.endswith("_loss")} | {"options": options}
        path.write_text(json.dumps({"seed": 0, "tgap_rounds": TGAP, "profile": PROFILE, "runs": done}, indent=1) + "\n")
        if commit:
            commit_file(path, f"b1_compression: gate study, {label}")


def gate_table(study: dict) -> list[str]:
    lines = ["| autoencoder | maps train / held out | epochs (best) | autoencoder | zero | random projection | "
             "block PCA | top-k | passes |", "|---|---|---|---|---|---|---|---|---|"]
    for label, g in study["runs"].items():
        c = g["cosine"]
        lines.append(f"| {label} | {g['training_maps']} / {g['heldout_maps']} | {g['epochs_run']} ({g['best_epoch']}) | "
                     f"{c['autoencoder']:.3f} | 0 | {c['random_projection']:.3f} | {c['block_pca']:.3f} | "
                     f"{c['topk']:.3f} | {'yes' if g['passed'] else 'no'} |")
    return lines


# --- FLASC given the rounds its byte budget buys -------------------------------------------------------
BUDGET_ROW, BUDGET_CLAIM, BUDGET_GOAL = "flasc_al_1_16_int8", 10, 25  # the claims the 150-round rows cannot decide
BUDGET_DIR = RESULTS / "pilots" / "b1_flasc_budget"


def budget_rounds() -> int | None:
    """Rounds of BUDGET_ROW that fit in 1/BUDGET_CLAIM of fedit_al's bytes to target, seed 0.

    A FLASC run spends the same bytes every round, so "FedIT's accuracy with 10x fewer bytes" is a question
    about a run of that many rounds. At fp32 (1/4 and 1/16) and at int8 1/4 the budget is under the 150
    rounds the rows run, so those rows decide it; int8 at 1/16 is the one whose budget buys more. Every seed
    runs seed 0's length (one schedule for all) and is judged against its own FedIT run, as any row."""
    ref = [r for r in BENCHMARK.records({"fedit_al"}) if r["seed"] == 0]
    row = [r for r in BENCHMARK.records({BUDGET_ROW}) if r["seed"] == 0]
    if not ref or not row:
        return None
    board = build_leaderboard(ref + row, reference="fedit_al")
    judged = board["rows"][0]["per_seed"][0]
    budget = (judged["bytes_up_to_target"] + judged["bytes_down_to_target"]) / BUDGET_CLAIM
    per_round = (row[0]["bytes_up_total"] + row[0]["bytes_down_total"]) / len(row[0]["curve"])
    return int(budget // per_round)


def budget_benchmark(rounds: int) -> SeededBenchmark:
    overrides = next(ov for label, ov, _ in rows(chosen_lr()) if label == BUDGET_ROW)
    profile = [o for o in PROFILE if not o.startswith("rounds=")] + [f"rounds={rounds}"]
    return SeededBenchmark("b1_flasc_budget", CONFIG, profile,
                           [(f"{BUDGET_ROW}_r{rounds}", overrides, f"{BUDGET_ROW} for {rounds} rounds, what "
                             f"1/{BUDGET_CLAIM} of fedit_al's bytes to target pays for (cosine over {rounds})")],
                           results_dir=BUDGET_DIR)


def budget_pilot(commit: bool, seeds: list[int]) -> None:
    """BUDGET_ROW for as many rounds as seed 0's budget buys (the cosine decay stretched to match), each seed."""
    rounds = budget_rounds()
    if rounds is None:
        raise SystemExit(f"error: the budget runs need fedit_al and {BUDGET_ROW} seed 0 first")
    say(f"{BUDGET_ROW}: {rounds} rounds fit in 1/{BUDGET_CLAIM} of fedit_al's bytes to target (seed 0)")
    failed = budget_benchmark(rounds).run(seeds, set(), jobs=min(2, len(seeds)), commit=commit)
    if failed:
        raise SystemExit(f"error: {len(failed)} budget run(s) failed: {', '.join(failed)}")


def budget_lines() -> list[str]:
    """Each budget run against its seed's fedit_al target: reached at which round, with how many times fewer bytes."""
    rounds = budget_rounds()
    records = budget_benchmark(rounds).records() if rounds else []
    refs = {r["seed"]: r for r in BENCHMARK.records({"fedit_al"})}
    records = [r for r in records if r["seed"] in refs]
    if not records:
        return []
    board = build_leaderboard([refs[r["seed"]] for r in records] + records, reference="fedit_al")
    judged = {j["seed"]: j for j in board["rows"][1]["per_seed"]}
    lines = ["## FLASC for the rounds its byte budget buys", "",
             f"`python benchmarks/b1_compression.py --budget-pilot`: {BUDGET_ROW} for {rounds} rounds, what "
             f"1/{BUDGET_CLAIM} of fedit_al's bytes to its target pays for on seed 0 (the cosine decay stretched over "
             f"{rounds} rounds; every seed runs that length and is judged against its own fedit_al run).", "",
             "| seed | fedit_al's target | reached at round | MB up + down to target | bytes vs fedit_al | "
             "smoothed final | MB up + down, whole run |", "|---|---|---|---|---|---|---|"]
    for run in sorted(records, key=lambda r: r["seed"]):
        j = judged[run["seed"]]
        final = smoothed(fixed_subset_curve(run["curve"], "accuracy"))[-1][1]
        total = (run["bytes_up_total"] + run["bytes_down_total"]) / 1e6
        if j["round_to_target"]:
            to_target = (j["bytes_up_to_target"] + j["bytes_down_to_target"]) / 1e6
            lines.append(f"| {run['seed']} | {j['target']:.3f} | {j['round_to_target']} | {to_target:.1f} | "
                         f"{j['bytes_ratio']:.1f}x | {final:.3f} | {total:.1f} |")
        else:
            lines.append(f"| {run['seed']} | {j['target']:.3f} | not reached | - | - | {final:.3f} | {total:.1f} |")
    row = board["rows"][1]
    lines += ["", f"- The paper's >= {BUDGET_CLAIM}x: {ratio_verdict(row, BUDGET_CLAIM)}.",
              f"- Our goal >= {BUDGET_GOAL}x (int8 + zstd): {ratio_verdict(row, BUDGET_GOAL)}.", ""]
    return lines


# --- the results page --------------------------------------------------------------------------------
def smoothed_at_bytes(record: dict, budget: int) -> float | None:
    """Smoothed accuracy at the last evaluation reached with at most ``budget`` bytes (up + down)."""
    best = None
    for rnd, value in smoothed(fixed_subset_curve(record["curve"], "accuracy")):
        if sum(cumulative_bytes(record["curve"], rnd)) <= budget:
            best = value
    return best


def cg_verdict(records: list[dict], board: dict, label: str = "cgfedllm_linear16_gated") -> str:
    """CG-FedLLM's claims in one line: FedIT's accuracy with its uplink cut, and ahead at equal bytes."""
    by = {(r["label"], r["seed"]): r for r in records}
    seeds = sorted(s for lab, s in by if lab == label)
    row = next(r for r in board["rows"] if r["label"] == label)
    ahead = {other: 0 for other in ("fedit", "topk_up_1_16")}
    compared = dict.fromkeys(ahead, 0)
    for s in seeds:
        mine = by[(label, s)]
        budget = mine["bytes_up_total"] + mine["bytes_down_total"]
        own = smoothed(fixed_subset_curve(mine["curve"], "accuracy"))[-1][1]
        for other in ahead:
            value = smoothed_at_bytes(by[(other, s)], budget) if (other, s) in by else None
            if value is not None:
                compared[other] += 1
                ahead[other] += own > value
    gates = [by[(label, s)].get("autoencoder_gate", {}).get("passed") for s in seeds]
    return (f"Over {len(seeds)} seed(s): the autoencoder passes its gate on {sum(bool(g) for g in gates)}; CG-FedLLM "
            f"reaches FedIT's target on {row['reached']}; at its own whole-run bytes it is ahead of FedIT on "
            f"{ahead['fedit']} of {compared['fedit']} seeds and of uplink top-k on {ahead['topk_up_1_16']} of "
            f"{compared['topk_up_1_16']}.")


def equal_bytes_table(records: list[dict], labels: list[str], others: list[str]) -> list[str]:
    """Accuracy of each row of ``others`` with the bytes each row of ``labels`` spent on its whole run, seed by
    seed: whether a method is ahead per byte even where it does not reach the reference's target."""
    by = {(r["label"], r["seed"]): r for r in records}
    lines = ["| row | seed | MB (whole run, up + down) | its smoothed accuracy | " +
             " | ".join(f"{o} at the same MB" for o in others) + " |", "|---|---|---|---|" + "---|" * len(others)]
    for label in labels:
        for (lab, seed), r in sorted(by.items()):
            if lab != label:
                continue
            budget = r["bytes_up_total"] + r["bytes_down_total"]
            own = smoothed(fixed_subset_curve(r["curve"], "accuracy"))[-1][1]
            cells = []
            for o in others:
                value = smoothed_at_bytes(by[(o, seed)], budget) if (o, seed) in by else None
                cells.append("-" if (o, seed) not in by else "(its first evaluation needs more)" if value is None
                             else f"{value:.3f}")
            lines.append(f"| {label} | {seed} | {budget / 1e6:.1f} | {own:.3f} | " + " | ".join(cells) + " |")
    return lines


def at_equal_bytes(records: list[dict], label: str, other: str) -> tuple[dict | None, dict | None]:
    """Mean ± std over seeds of ``label``'s smoothed final accuracy and of ``other``'s at the same whole-run bytes
    (seeds where ``other`` has no evaluation that cheap count as missing, not as zero)."""
    by = {(r["label"], r["seed"]): r for r in records}
    own, theirs = [], []
    for (lab, seed), r in sorted(by.items()):
        if lab != label:
            continue
        own.append(smoothed(fixed_subset_curve(r["curve"], "accuracy"))[-1][1])
        if (other, seed) in by:
            theirs.append(smoothed_at_bytes(by[(other, seed)], r["bytes_up_total"] + r["bytes_down_total"]))
    return mean_std(own), mean_std(theirs)


def summary_lines(records: list[dict], board: dict, reference: str, also: list[str] = ()) -> list[str]:
    """One line a row: seeds that reach the reference's target, and accuracy at the row's own bytes."""
    lines = []
    for row in board["rows"][1:]:
        label = row["label"]
        own, ref = at_equal_bytes(records, label, reference)
        if own is None:
            continue
        parts = [f"`{label}` ({len(row['seeds'])} seed(s)) reaches {reference}'s target on {row['reached']}; it "
                 f"ends at {own['mean']:.3f} ± {own['std']:.3f} smoothed"]
        if ref is not None:
            parts.append(f"where {reference} with the same bytes stands at {ref['mean']:.3f} ± {ref['std']:.3f}"
                         + (f" ({ref['n']} of {own['n']} seeds evaluated that early)" if ref["n"] < own["n"] else ""))
        else:
            parts.append(f"with fewer bytes than {reference}'s first evaluation")
        for other in (o for o in also if o != label):
            _, o = at_equal_bytes(records, label, other)
            if o is not None:
                parts.append(f"{other} {o['mean']:.3f} ± {o['std']:.3f}")
        lines.append("- " + ", ".join(parts) + ".")
    ref = board["rows"][0]["smoothed_final_accuracy"]
    return [f"- `{reference}` itself ends at {ref['mean']:.3f} ± {ref['std']:.3f}.", *lines]


def rounds_in_budget(board: dict, row: dict, ratio: float, rounds: int = 150) -> float:
    """The rounds 1/``ratio`` of the reference's mean bytes to target (up + down) pay for at ``row``'s bytes a
    round (its whole run's over ``rounds``)."""
    ref = board["rows"][0]
    to_target = ref["mb_up_to_target"]["mean"] + ref["mb_down_to_target"]["mean"]
    per_round = (row["mb_up_total"]["mean"] + row["mb_down_total"]["mean"]) / rounds
    return to_target / ratio / per_round


def flasc_verdicts(board: dict) -> list[str]:
    lines = ["### Verdicts", "", "| row | bytes vs fedit_al | rounds a 10x budget buys | the paper's >= 10x | "
             "our goal >= 25x (int8 + zstd) |", "|---|---|---|---|---|"]
    for row in board["rows"][1:]:
        r = row["bytes_ratio_vs_reference"]
        ratio = f"{r['mean']:.1f}x ± {r['std']:.1f} ({row['reached']} reached)" if r else f"- ({row['reached']} reached)"
        goal = ratio_verdict(row, 25) if row["label"].endswith("_int8") else "-"
        lines.append(f"| {row['label']} | {ratio} | {rounds_in_budget(board, row, 10):.0f} | {ratio_verdict(row, 10)} | "
                     f"{goal} |")
    return lines + ["", f"Within the profile's 150 rounds. A row whose 10x budget ends by round 150 and that has not "
                    "reached the target by then cannot reach it within that budget at any run length: its 10x verdict "
                    f"is final. {BUDGET_ROW} given the rounds its byte budget buys: "
                    "[below](#flasc-for-the-rounds-its-byte-budget-buys).", ""]


def write_board() -> None:
    own = BENCHMARK.records()
    what = {label: what for label, _, what in rows(chosen_lr() or 0.0)}  # every row's description
    what["fedit"] = "FedIT, LoRA r=16 on q/k/v (b1_cpu's reference)"
    flasc_records = [r for r in own if r["label"] in FLASC_ROWS]
    cg_records = [r for r in own if r["label"] in CG_ROWS] + B1_CPU.records({"fedit"})
    lines = ["# B1-cpu: FLASC and CG-FedLLM as their papers run them", "",
             "Rebuilt by `python benchmarks/b1_compression.py --board` from the compact results in "
             "[runs/b1_compression/](runs/b1_compression/); the protocol is [PROTOCOL.md](../PROTOCOL.md), the "
             "profile b1_cpu's (client SGD-momentum, cosine decay, 150 rounds, 3 seeds).", "",
             "The AdamW variant (clients on AdamW at lr 5e-3, 10-200 rounds, one seed) is the earlier protocol's: "
             "[b1_flasc.md](b1_flasc.md) and [b1_cgfedllm.md](b1_cgfedllm.md). Adam moves nearly every entry by "
             "about its learning rate each step, so its deltas are flat and top-k or a learned codec keeps little "
             "of them; the rows here use the papers' client SGD-momentum instead.", "",
             "Every server here is plain FedAvg. The FLASC authors' code steps the server with AdamW (lr 1e-3) for "
             "every method; sharing FedAvg between FLASC and FedIT makes their byte ratio measure the codec alone. "
             "The server-AdamW pairing has not been run.", ""]
    boards = {}
    for name, records, reference in (("flasc", flasc_records, "fedit_al"), ("cgfedllm", cg_records, "fedit")):
        lines += [f"## {'FLASC, all-linear LoRA' if name == 'flasc' else 'CG-FedLLM, q/k/v LoRA'}", ""]
        if not any(r["label"] == reference for r in records):
            lines += [f"No {reference} result yet." + ("" if chosen_lr() or name != "flasc" else
                      " These rows wait for the learning-rate pilot (`--lr-pilot`)."), ""]
            continue
        board = build_leaderboard(records, reference=reference)
        for row in board["rows"]:
            row["what"] = what.get(row["label"], "")
        boards[name] = board
        lines += [*leaderboard_markdown(board), "", *[f"- `{r['label']}`: {r['what']}" for r in board["rows"]], ""]
        lines += ["**In short** (mean ± std over seeds, smoothed accuracy on the fixed subset):", "",
                  *summary_lines(records, board, reference, [] if name == "flasc" else ["topk_up_1_16"]), ""]
        if name == "flasc":
            lines += flasc_verdicts(board)
            lines += ["### Accuracy at equal total bytes", "", "Smoothed accuracy (fixed subset) of each FLASC run at "
                      "the end, beside fedit_al's at the same number of bytes (up + down), seed by seed:", "",
                      *equal_bytes_table(records, [r["label"] for r in board["rows"][1:]], ["fedit_al"]), ""]
    if any(r["label"] == "cgfedllm_linear16_gated" for r in cg_records):
        lines += ["### Accuracy at equal total bytes", "", "Smoothed accuracy (fixed subset) of FedIT and of uplink "
                  "top-k at the whole-run bytes of CG-FedLLM, seed by seed:", "",
                  *equal_bytes_table(cg_records, ["cgfedllm_linear16_gated"], ["fedit", "topk_up_1_16"]), ""]
        if "cgfedllm" in boards:
            lines += ["**Verdict.** " + cg_verdict(cg_records, boards["cgfedllm"]), ""]
        gates = [r for r in cg_records if r.get("autoencoder_gate")]
        if gates:
            lines += ["### The quality gate of each CG-FedLLM run", "", "| seed | autoencoder | random projection | "
                      "block PCA | top-k | passes |", "|---|---|---|---|---|---|"]
            lines += [f"| {r['seed']} | {g['cosine']['autoencoder']:.3f} | {g['cosine']['random_projection']:.3f} | "
                      f"{g['cosine']['block_pca']:.3f} | {g['cosine']['topk']:.3f} | {'yes' if g['passed'] else 'no'} |"
                      for r in gates for g in [r["autoencoder_gate"]]]
            lines.append("")
    shared = [f"{label} s{seed}" for label, seed in SHARED_CORES if any(r["label"] == label and r["seed"] == seed
                                                                        for r in own)]
    if shared:
        lines += ["**Timing caveat.** These runs shared the 2 cores with other work (tests, pilots) for part of their "
                  f"run: {', '.join(shared)}. Their accuracy and bytes are unaffected; their measured client compute, "
                  "and so the hours to target, is inflated.", ""]
    lines += budget_lines()
    study_path = RESULTS / "b1_compression_gate.json"
    if study_path.exists():
        lines += ["## Gate study: TGAP only, seed 0", "", "Held-out cosine (mean over the most recent 20% of the "
                  "recorded maps) of each codec at the autoencoder's latent size; `python benchmarks/b1_compression.py "
                  "--gate-study`.", "", *gate_table(json.loads(study_path.read_text())), ""]
    (RESULTS / "b1_compression.json").write_text(json.dumps(boards, indent=1) + "\n")
    for name, records in (("flasc", flasc_records), ("cgfedllm", cg_records)):
        if name in boards:
            lines += figure_lines(boards[name], records, f"b1_compression_{name}.png",
                                  f"B1 cpu profile, {name}: smoothed accuracy, mean over seeds, band = 1 std", name)
    (RESULTS / "b1_compression.md").write_text("\n".join(lines))
    say("\n".join(lines))
    write_leaderboard()  # its CG-FedLLM rows and FLASC table are rows of the leaderboard


def main() -> None:
    BENCHMARK.main(__doc__.split("\n")[0], write_board, modes={
        "--lr-pilot": (f"FedIT all-linear, seed 0, at lr {', '.join(map(str, LR_GRID))}", lr_pilot),
        "--gate-study": ("CG-FedLLM's TGAP phase only, four autoencoder set-ups, and the gate's numbers", gate_study),
        "--budget-pilot": (f"{BUDGET_ROW} for the rounds 1/{BUDGET_CLAIM} of fedit_al's bytes buy (seed 0's), --seeds",
                           budget_pilot)})


if __name__ == "__main__":
    main()
