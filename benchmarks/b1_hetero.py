"""HAFL against HetLoRA and FlexLoRA with controls, on B1-cpu: is it the components it picks, or the step size?

With tiers 4/8/16, zero-padding dilutes the components few clients hold, and in a round in which no sampled
client holds component i it sets A_i and B_i to zero, where gradient descent can never move them again (each
factor's gradient is proportional to the other). With 4 of 20 clients a round HetLoRA's components 8-15 die
within the first rounds, 4-7 later or not at all (round 59 on seed 0, never on seed 1): it shrinks towards
rank-4 LoRA, while HAFL's adaptive aggregation behaves like rank 16. The controls tell the causes apart, on b1_cpu's profile
(Dirichlet 1.0, client SGD-momentum with a cosine decay, 150 rounds) and seeds:

* ``fedit_r4``: FedIT at rank 4 (the same LoRA scale alpha / r = 1), beside b1_cpu's FedIT at rank 16;
* ``hafl_step3``: HAFL (freeze, adaptive) whose server steps a third of the way to the aggregate;
* ``hafl_random``: HAFL (freeze, adaptive) training r_k components drawn blindly instead of by importance;
* ``hafl_zeropad``: HAFL (freeze) with zero-padding aggregation.

The paper's second claim is that low-rank clients lose nothing when the global model reaches them: under
HAFL's freezing every tier holds all R components, so its tier models are the global model by construction,
while truncation (HAFL's scheme 1, HetLoRA's first r_k, FlexLoRA's SVD) hands a rank-4 client a cut model.
``hafl_truncate``, ``hetlora`` and ``flexlora`` therefore run here with each tier's received model evaluated
every 30 rounds on the evaluation subset (``degradation_every``).

``flexlora_sqrt`` is FlexLoRA refactored with sqrt(Sigma) on each factor, as fedzip did before and b1_cpu's
flexlora row ran, against FlexLoRA's own B = U Sigma, A = V^T: the same product, a different start for training.

HAFL and FedIT r16 come from b1_cpu's compact results (the same profile and seeds).

    python benchmarks/b1_hetero.py --commit        # every row x seeds 0,1,2 not done yet
    python benchmarks/b1_hetero.py --board         # rebuild results/b1_hetero.{md,json,png}
    python benchmarks/b1_hetero.py --spectrum      # live components of the run directories on this machine
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from b1_cpu import BENCHMARK as B1_CPU  # noqa: E402
from b1_cpu import CONFIG, HAFL_TIERS, PROFILE  # noqa: E402
from common import RESULTS, ROOT, say  # noqa: E402
from seeded import SeededBenchmark, by_seed, figure_lines, paired_values, verdict  # noqa: E402

from fedzip.report.leaderboard import build_leaderboard, leaderboard_markdown, mean_std, mean_std_text  # noqa: E402
from fedzip.report.targets import fixed_subset_curve, smoothed  # noqa: E402

BENCH = "b1_hetero"
HAFL = "aggregation: adaptive"
TIER_EVAL = "degradation_every: 30, degradation_examples: 800"  # each tier's received model, on the eval subset


def hafl(extra: str) -> list[str]:
    return ["method=hafl", f"method_options={{{HAFL}, {HAFL_TIERS}, {extra}}}"]


ROWS = [
    ("fedit_r4", ["lora.rank=4", "lora.alpha=4"], "FedIT at rank 4, LoRA scale 1 as every row"),
    ("hafl_step3", hafl("server_lr: 0.3333"), "HAFL (freeze, adaptive), server step 1/3 towards the aggregate"),
    ("hetlora", ["method=hetlora", f"method_options={{aggregation: zero_pad, {HAFL_TIERS}, {TIER_EVAL}}}"],
     "HetLoRA: client ranks 4/8/16, the first r_k components, zero-padding aggregation"),
    ("hafl_truncate", ["method=hafl_truncate", f"method_options={{{HAFL}, {HAFL_TIERS}, {TIER_EVAL}}}"],
     "HAFL scheme 1 (truncation): the server sends the top-r_k components by global importance, adaptive"),
    ("hafl_random", hafl("selection: random"), "HAFL (freeze, adaptive), r_k components drawn at random"),
    ("hafl_zeropad", ["method=hafl", f"method_options={{aggregation: zero_pad, {HAFL_TIERS}}}"],
     "HAFL (freeze) with HetLoRA's zero-padding aggregation"),
    ("flexlora", ["method=flexlora", f"method_options={{{HAFL_TIERS}, {TIER_EVAL}}}"],
     "FlexLoRA: client ranks 4/8/16, SVD redistribution of the full-rank product, B = U Sigma, A = V^T"),
    ("flexlora_sqrt", ["method=flexlora", f"method_options={{{HAFL_TIERS}, {TIER_EVAL}, factor_split: sqrt}}"],
     "FlexLoRA with sqrt(Sigma) on each factor instead of B = U Sigma, A = V^T (a control)"),
    # A = V^T has unit rows, 3x the squared row norm of LoRA's initial A (1/3): the same client lr takes about
    # 3x larger steps on the product B A, so this control gives FlexLoRA's own split a step like the others'
    ("flexlora_lr02", ["method=flexlora", f"method_options={{{HAFL_TIERS}, {TIER_EVAL}}}", "train.lr=0.2"],
     "FlexLoRA (B = U Sigma, A = V^T) with client lr 0.2 instead of the profile's 0.5 (a control)"),
]
BORROWED = ["fedit", "hafl"]  # from b1_cpu
# b1_cpu's runs of these (row here: b1_cpu's row) are this benchmark's without the tier evaluations, which do
# not touch training (seed 0: the same accuracy at every evaluation): they stand in for the seeds not run here.
STAND_INS = {"hetlora": "hetlora", "flexlora_sqrt": "flexlora_sqrt"}
BENCHMARK = SeededBenchmark(BENCH, CONFIG, PROFILE, ROWS, references=[])


CHECKPOINTS = (30, 60, 150)  # early, middle and final rounds of the 150-round profile
# tier models are cut; HAFL's freezing hands out all R
TRUNCATING = ["hetlora", "hafl_truncate", "flexlora", "flexlora_sqrt", "flexlora_lr02"]


def smoothed_at(record: dict, rnd: int) -> float | None:
    """Smoothed accuracy on the fixed evaluation subset at the last evaluation up to round ``rnd``."""
    points = [v for r, v in smoothed(fixed_subset_curve(record["curve"], "accuracy")) if r <= rnd]
    return points[-1] if points else None


def paired_points(records: list[dict], a: str, b: str, rnd: int) -> list[float]:
    """Per seed both rows have: a's smoothed accuracy at ``rnd`` minus b's, in points."""
    return [100 * (va - vb) for va, vb in paired_values(records, a, b, lambda r: smoothed_at(r, rnd))]


def peaks(records: list[dict], label: str) -> dict[int, tuple[float, int, float]]:
    """Per seed: the best accuracy on the fixed subset, its round, and the last one (a diverged run's story)."""
    out = {}
    for seed, rec in sorted(by_seed(records, label).items()):
        curve = fixed_subset_curve(rec["curve"], "accuracy")
        if curve:
            rnd, best = max(curve, key=lambda p: p[1])
            out[seed] = (best, rnd, curve[-1][1])
    return out


def tier_gaps(records: list[dict], label: str, tier: int) -> list[float]:
    """Per seed, in points: the final global model's accuracy on the fixed subset minus what a rank-``tier``
    client receives of it (both measured after the last round's aggregation, on the same examples)."""
    gaps = []
    for rec in by_seed(records, label).values():
        last = rec["curve"][-1]
        full, cut = (last.get("fixed_subset") or last).get("accuracy"), last.get(f"tier{tier}_accuracy")
        if full is not None and cut is not None:
            gaps.append(100 * (full - cut))
    return gaps


def claims(records: list[dict]) -> list[str]:
    labels = {r["label"] for r in records}
    table = ["| row | seeds | " + " | ".join(f"smoothed accuracy, round {c}" for c in CHECKPOINTS) + " |",
             "|---|---|" + "---|" * len(CHECKPOINTS)]
    for label in ["fedit", "fedit_r4", "hafl", *[lab for lab, _, _ in ROWS if lab != "fedit_r4"]]:
        recs = list(by_seed(records, label).values())
        if not recs:
            continue
        cells = [mean_std_text(mean_std([v for r in recs if (v := smoothed_at(r, c)) is not None]))
                 for c in CHECKPOINTS]
        table.append(f"| {label} | {len(recs)} | " + " | ".join(cells) + " |")
    lines = ["## What the paper claims, and the controls", "",
             "Smoothed accuracy (trailing mean of 3 evaluations on the fixed 800-example subset), mean ± std over "
             "seeds:", "", *table, "",
             "Each line compares two rows seed by seed (their difference in points, mean ± std). A claim **holds** "
             "when the row is ahead on every one of at least 3 seeds and **does not hold** when it is not ahead on "
             "the mean.", ""]
    early, final = CHECKPOINTS[0], CHECKPOINTS[-1]
    for other in ("hetlora", "flexlora", "flexlora_sqrt", "flexlora_lr02", "hafl_zeropad"):
        if other in labels:
            lines.append(f"- HAFL ahead of {other} at round {early} (faster convergence): "
                         f"{verdict(paired_points(records, 'hafl', other, early))}; at round {final} (final): "
                         f"{verdict(paired_points(records, 'hafl', other, final))}.")
    lines.append(f"- **Controls.** Rank 16 in disguise? HAFL ahead of FedIT r16 at round {early}: "
                 f"{verdict(paired_points(records, 'hafl', 'fedit', early))}; ahead of FedIT r4: "
                 f"{verdict(paired_points(records, 'hafl', 'fedit_r4', early))}.")
    if "hafl_step3" in labels:
        lines.append(f"- HAFL with a server step of 1/3 still ahead of HetLoRA at round {early}: "
                     f"{verdict(paired_points(records, 'hafl_step3', 'hetlora', early))}; at round {final}: "
                     f"{verdict(paired_points(records, 'hafl_step3', 'hetlora', final))}. This control was meant to "
                     "match zero-padding's shrinkage, but zero-padding does not shrink every component: components "
                     "0-3, which every client holds, get the plain average, and the components above them are "
                     "diluted, then zeroed (below). A 1/3 step on every component is far harsher, so a loss here does "
                     "not say HAFL's lead is its step size; FedIT at rank 4 and 16 is the control that separates rank "
                     "from the choice of components.")
    if "flexlora_sqrt" in labels:
        lines.append(f"- FlexLoRA's own split (B = U Sigma, A = V^T) ahead of sqrt(Sigma) on each factor at round "
                     f"{early}: {verdict(paired_points(records, 'flexlora', 'flexlora_sqrt', early))}; at round "
                     f"{final}: {verdict(paired_points(records, 'flexlora', 'flexlora_sqrt', final))}. Both hand out "
                     "the same product; under the sqrt split a direction with a small singular value has both factors "
                     "small, near the A = B = 0 saddle, while FlexLoRA's A = V^T has unit rows: three times the "
                     "squared row norm of LoRA's initial A, so the profile's client lr (0.5, tuned on FedIT) takes "
                     "about three times larger steps on B A. Its runs: "
                     + "; ".join(f"seed {seed}: best {best:.3f} at round {rnd}, final {final:.3f}"
                                 for seed, (best, rnd, final) in peaks(records, "flexlora").items())
                     + (". The same split at client lr 0.2 (flexlora_lr02): "
                        + "; ".join(f"seed {seed}: best {best:.3f} at round {rnd}, final {final:.3f}"
                                    for seed, (best, rnd, final) in peaks(records, "flexlora_lr02").items())
                        if "flexlora_lr02" in labels else "") + ".")
    if "hafl_random" in labels:
        lines.append(f"- Importance-based selection ahead of random components at round {early}: "
                     f"{verdict(paired_points(records, 'hafl', 'hafl_random', early))}; at round {final}: "
                     f"{verdict(paired_points(records, 'hafl', 'hafl_random', final))}.")
    lines += ["", "**No loss for low-rank tiers.** Under HAFL's freezing every tier holds all R components: its "
              "rank-4 and rank-8 clients receive the global model itself (a gap of 0 by construction). The "
              "truncating rows hand those clients a cut model; the gap is the final global model's accuracy minus "
              "the cut model's, in points, on the same fixed subset after the last round:", ""]
    for label in TRUNCATING:
        if label in labels:
            parts = [f"rank {t}: {mean_std_text(mean_std(g), '+.1f')} over {len(g)} seed(s)"
                     for t in (4, 8) if (g := tier_gaps(records, label, t))]
            lines.append(f"- {label}: " + ("; ".join(parts) if parts else "no tier evaluation in its runs") + ".")
            if label == "hetlora":
                lines += ["  Zero-padding zeroes a component in any round in which no sampled client holds it, and "
                          "a component with A and B both zero never moves again, so HetLoRA's global model loses rank "
                          "for good. From each seed's client sampling, components 8-15 and 4-7 die at: "
                          + "; ".join(f"seed {seed}: {when(r8)} and {when(r4)}"
                                      for seed, (r8, r4) in collapse_rounds((0, 1, 2)).items())
                          + ". Components that survive are diluted by every round's lower-rank clients (the table below: "
                          "4 live components in every module on every seed measured). A gap of zero "
                          "therefore means the rank-8 and rank-16 clients' extra rank carries nothing by the end, not "
                          "that the rank-4 clients lost nothing."]
            gaps = [g for t in (4, 8) for g in tier_gaps(records, label, t)]
            live = live_medians(label)
            if label.startswith("flexlora") and gaps and max(abs(g) for g in gaps) < 0.5 and live:
                lines += [f"  {label}'s gap is near zero because its averaged update itself keeps about {max(live)} "
                          "live components of 16 in every module (the table below): the rank collapse of SVD-based "
                          "allocation that Wu et al. (arXiv 2602.13486) analyse. Whichever the split, the clients' "
                          "truncated products are averaged whole, so a direction that only the rank-8 and rank-16 "
                          "clients hold is diluted by the rank-4 clients' products every round."
                          if label == "flexlora" else f"  {label}: the same collapse (the table below)."]
    return lines + [""]


def when(rnd: int | None) -> str:
    return f"round {rnd}" if rnd is not None else "never"


def collapse_rounds(seeds) -> dict[int, tuple[int | None, int | None]]:
    """Per seed, the first round in which no sampled client of HetLoRA's row holds a component above rank 8,
    and above rank 4 (None: none within the run). From the engine's own sampling and rank assignment."""
    from fedzip.config import load_config
    from fedzip.engine.rounds import sample_clients
    from fedzip.methods.hafl import HetLoRAOptions, assign_ranks

    overrides = dict((label, o) for label, o, _ in ROWS)["hetlora"]
    out = {}
    for seed in seeds:
        cfg = load_config(CONFIG, [*PROFILE, *overrides, f"seed={seed}"])
        ranks = assign_ranks(HetLoRAOptions.model_validate(cfg.method_options), cfg.num_clients, cfg.lora.rank, seed)
        top = [max(ranks[c] for c in sample_clients(seed, rnd, cfg.num_clients, cfg.clients_per_round))
               for rnd in range(1, cfg.rounds + 1)]
        out[seed] = tuple(next((rnd for rnd, r in enumerate(top, 1) if r <= cut), None) for cut in (8, 4))
    return out


SPECTRUM = RESULTS / "b1_hetero_spectrum.json"
LIVE = 1e-3  # a component is alive when its singular value is at least this fraction of the module's largest


def live_components(checkpoint: Path) -> list[int]:
    """Per LoRA module of a final server checkpoint: how many singular values of the global update B @ A are
    at least ``LIVE`` times the largest (FlexLoRA: of the averaged full-rank update it keeps)."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(checkpoint))
    full = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("full_rank_update/")}
    if not full:
        full = {k[len("global/"):-len(".lora_A.weight")]: tensors[k.replace("lora_A", "lora_B")] @ v
                for k, v in tensors.items() if k.startswith("global/") and k.endswith(".lora_A.weight")}
    counts = []
    for dw in full.values():
        s = torch.linalg.svdvals(dw.double())
        counts.append(int((s >= LIVE * s[0]).sum()) if s[0] > 0 else 0)
    return counts


def measure_spectrum(commit: bool, seeds: list[int]) -> None:
    """``--spectrum``: the live components of every finished run directory of this benchmark (the run
    directories stay on the machine that trained them; the counts go to results/b1_hetero_spectrum.json)."""
    found = json.loads(SPECTRUM.read_text()) if SPECTRUM.exists() else {}
    for label, _, _ in ROWS:
        for seed in seeds:
            run = ROOT / "runs" / BENCH / "cpu" / f"{label}-s{seed}"
            if (run / "summary.json").exists():
                found[f"{label}-s{seed}"] = live_components(run / "checkpoints" / "server.safetensors")
                say(f"[{label}-s{seed}] live components per module: {found[f'{label}-s{seed}']}")
    SPECTRUM.write_text(json.dumps(dict(sorted(found.items())), indent=1) + "\n")


def live_medians(label: str) -> list[int]:
    """Per seed measured by ``--spectrum``: the median over modules of ``label``'s live components."""
    found = json.loads(SPECTRUM.read_text()) if SPECTRUM.exists() else {}
    return [sorted(c)[len(c) // 2] for name, c in found.items() if name.rsplit("-s", 1)[0] == label]


def spectrum_lines() -> list[str]:
    if not SPECTRUM.exists():
        return []
    found = json.loads(SPECTRUM.read_text())
    lines = ["## How much rank the global model keeps", "",
             f"Live components of the final global update (singular values at least {LIVE:g} of the module's "
             "largest), over the 18 LoRA modules; of 16 (fedit_r4: of 4). From each finished run's last checkpoint "
             "(`python benchmarks/b1_hetero.py --spectrum`).", "",
             "| row | seeds | min | median | max |", "|---|---|---|---|---|"]
    for label, _, _ in ROWS:
        seeds = sorted(int(name.rsplit("-s", 1)[1]) for name in found if name.rsplit("-s", 1)[0] == label)
        if seeds:
            c = sorted(n for seed in seeds for n in found[f"{label}-s{seed}"])
            lines.append(f"| {label} | {', '.join(map(str, seeds))} | {c[0]} | {c[len(c) // 2]} | {c[-1]} |")
    return lines + [""]


def write_board() -> None:
    own = BENCHMARK.records()
    have = {(r["label"], r["seed"]) for r in own}
    stand_ins = [r | {"label": here} for here, there in STAND_INS.items() for r in B1_CPU.records({there})
                 if (here, r["seed"]) not in have]
    records = own + B1_CPU.records(set(BORROWED)) + stand_ins
    what = BENCHMARK.what | {label: f"{B1_CPU.what[label]} (b1_cpu)" for label in BORROWED}
    what |= {label: f"{BENCHMARK.what[label]} (seeds not run here: b1_cpu's run, the same training without "
                    "tier evaluations)" for label in STAND_INS}
    lines = ["# B1-cpu heterogeneous ranks: HAFL, HetLoRA, FlexLoRA and the controls", "",
             "Rebuilt by `python benchmarks/b1_hetero.py --board`; protocol [PROTOCOL.md](../PROTOCOL.md), profile "
             "b1_cpu's. Each seed is judged against FedIT (rank 16) of the same seed.", ""]
    if not any(r["label"] == "fedit" for r in records):
        say("no FedIT result yet: no board")
        return
    board = build_leaderboard(records, reference="fedit")
    for row in board["rows"]:
        row["what"] = what.get(row["label"], "")
    lines += [*leaderboard_markdown(board), "", *[f"- `{r['label']}`: {r['what']}" for r in board["rows"]], ""]
    lines += claims(records)
    lines += spectrum_lines()
    (RESULTS / "b1_hetero.json").write_text(json.dumps(board, indent=1) + "\n")
    lines += figure_lines(board, records, "b1_hetero.png", "B1 cpu profile, heterogeneous ranks: smoothed accuracy, "
                          "mean over seeds, band = 1 std", "smoothed accuracy")
    (RESULTS / "b1_hetero.md").write_text("\n".join(lines))
    say("\n".join(lines))


def main() -> None:
    BENCHMARK.main(__doc__.split("\n")[0], write_board, modes={
        "--spectrum": ("count the live components of every finished run directory here", measure_spectrum)})


if __name__ == "__main__":
    main()
