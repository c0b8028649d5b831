"""B1 under protocol v2 (cpu profile): every method family against FedIT, three seeds each, one leaderboard.

B1's task and model (20 Newsgroups, MiniLM + LoRA r=16 on q/k/v + head) sized for a 2-core machine:
20 clients with a Dirichlet(1.0) label split, 4 a round, 3 local steps of 16 posts at 48 tokens, 150
rounds; clients train with SGD-momentum under a cosine learning-rate decay over rounds, so that
FedIT's smoothed curve settles (PROTOCOL.md). Every method runs the same profile, the same seeds, the
same client optimiser; a method differs from FedIT only in what the method itself changes.

Each finished run's compact result goes to ``results/runs/b1_cpu/<label>-s<seed>.json`` (run directories
stay under ``benchmarks/runs/``, not committed); a run whose compact result exists is skipped, so the
benchmark accumulates across sessions and machines. The leaderboard (``results/LEADERBOARD.{md,json,png}``)
is rebuilt from the compact results alone.

    python benchmarks/b1_cpu.py                      # every label x seeds 0,1,2 not done yet, two at a time
    python benchmarks/b1_cpu.py --only fedit,flasc_1_16 --seeds 0,1,2,3
    python benchmarks/b1_cpu.py --commit             # git-commit each compact result as its run finishes
    python benchmarks/b1_cpu.py --board              # only rebuild the leaderboard from results/runs/b1_cpu
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, say  # noqa: E402
from seeded import SeededBenchmark, figure_lines  # noqa: E402

from fedzip.report.compact import load_compact  # noqa: E402
from fedzip.report.leaderboard import build_leaderboard, leaderboard_markdown  # noqa: E402
from fedzip.report.targets import fixed_subset_curve, smoothed  # noqa: E402

BENCH = "b1_cpu"
CONFIG = "b1_fedit"
# The cpu profile, chosen by the pilots (results/pilots/b1_cpu_cosine_pilot.md): 120 rounds at Dirichlet 1.0
# plateaued on one FedIT seed but not on all three (mean +1.0 points), so the decay is stretched to 150
# rounds. The client learning rate was chosen on FedIT (seed 0) and is fixed for every method.
PROFILE = ["rounds=150", "num_clients=20", "clients_per_round=4", "partition.alpha=1.0", "data.max_length=48",
           "eval.every=6", "eval.max_examples=800", "data.max_test_examples=2000", "train.max_steps=3",
           "train.optimizer=sgd", "train.momentum=0.9", "train.lr_schedule=cosine", "train.lr=0.5"]

FEDAVG_SERVER = "server_optimizer: sgd, server_lr: 1.0, weighting: samples"  # FLASC's server as plain FedAvg
HAFL_TIERS = "tiers: [{rank: 4, share: 0.3334}, {rank: 8, share: 0.3333}, {rank: 16, share: 0.3333}]"


def runs_for(profile: str) -> list[tuple[str, list[str], str]]:
    """(label, overrides, what the row is) of every method family; FedIT first, every other row's reference.

    CG-FedLLM's TGAP phase takes a fifth of the rounds, as in the paper's schedule."""
    tgap = {"cpu": 30, "gpu": 40}[profile]
    return [
        ("fedit", [], "FedIT: LoRA FedAvg, r=16, fp32 both ways (reference)"),
        ("ffa_lora", ["method=ffa_lora"], "FFA-LoRA: A frozen at its random init, only B and the head travel"),
        ("flasc_1_16", ["method=flasc", f"method_options={{{FEDAVG_SERVER}, d_dl: 0.0625, d_ul: 0.0625}}"],
         "FLASC: top-k 1/16 of LoRA + head, both directions, server FedAvg"),
        ("hafl", ["method=hafl", f"method_options={{aggregation: adaptive, {HAFL_TIERS}}}"],
         "HAFL: client ranks 4/8/16, importance freezing, adaptive rank-1 aggregation"),
        ("hetlora", ["method=hetlora", f"method_options={{aggregation: zero_pad, {HAFL_TIERS}}}"],
         "HetLoRA: client ranks 4/8/16, zero-padding aggregation"),
        # FlexLoRA with its own split, B = U Sigma, A = V^T. On the cpu profile its runs are b1_hetero's (the
        # same training, with each tier's received model evaluated too), joined into the leaderboard below.
        *([("flexlora", ["method=flexlora", f"method_options={{{HAFL_TIERS}}}"],
            "FlexLoRA: client ranks 4/8/16, SVD redistribution of the full-rank product (B = U Sigma, A = V^T)")]
          if profile != "cpu" else []),
        # how this profile's FlexLoRA first ran: sqrt(Sigma) on each factor
        *([("flexlora_sqrt", ["method=flexlora", f"method_options={{{HAFL_TIERS}, factor_split: sqrt}}"],
            "FlexLoRA with sqrt(Sigma) on each factor instead of B = U Sigma, A = V^T")] if profile == "cpu" else []),
        # 200 epochs on every recorded map, no held-out maps and no gate: how this row first ran (its gated
        # successor is b1_compression's cgfedllm_linear16_gated)
        ("cgfedllm_linear16", ["method=cgfedllm", "method_options={autoencoder: linear, linear_ratio: 16, "
                               f"tgap_rounds: {tgap}, ae_epochs: 200, ae_lr: 0.003, ae_heldout: 0, ae_gate: off}}"],
         f"CG-FedLLM: {tgap} TGAP rounds (dense), then a linear 1/16 autoencoder (200 epochs, ungated) on the uplink"),
    ]


RUNS = runs_for("cpu")
# (label, seed) of runs whose measured compute is inflated: other work shared the cores for part of the run
SHARED_CORES = [("hafl", 2), ("hetlora", 2), ("flexlora_sqrt", 2), ("cgfedllm_linear16", 2)]
WHAT = {label: what for label, _, what in RUNS}
BENCHMARK = SeededBenchmark(BENCH, CONFIG, PROFILE, RUNS)


def longer_runs(records: list[dict]) -> str:
    """What FedIT did with more rounds (the plateau pilot, results/pilots/b1_cpu_200_rounds/), as a sentence."""
    pilot = sorted((RESULTS / "pilots" / "b1_cpu_200_rounds").glob("fedit-s*.json"))
    if not pilot:
        return ""
    ours = {r["seed"]: r for r in records if r["label"] == "fedit"}
    parts = []
    for path in pilot:
        long = load_compact(path)
        if long["seed"] in ours:
            diff = smoothed(fixed_subset_curve(long["curve"], "accuracy"))[-1][1] - \
                smoothed(fixed_subset_curve(ours[long["seed"]]["curve"], "accuracy"))[-1][1]
            parts.append(f"seed {long['seed']} at {long['rounds']} rounds ends {diff * 100:+.1f} points from its "
                         f"{ours[long['seed']]['rounds']}-round smoothed final")
    return ("Does FedIT gain from more rounds? " + "; ".join(parts) + " ([pilots/b1_cpu_200_rounds.md]"
            "(pilots/b1_cpu_200_rounds.md)). ") if parts else ""


# Benchmarks whose rows run this profile exactly, with these seeds, judged against these FedIT runs: their
# rows join the leaderboard (each compact result says what its row runs). None: every row of it; else these.
JOINED = {"b6_frontier": None, "b1_compression": {"cgfedllm_linear16_gated", "topk_up_1_16"}, "b1_hetero": {"flexlora"}}


def joined_records() -> list[dict]:
    return [r for bench, labels in JOINED.items() for p in sorted((RESULTS / "runs" / bench).glob("*.json"))
            for r in [load_compact(p)] if labels is None or r["label"] in labels]


def shared_cores() -> list[tuple[str, int]]:
    """(label, seed) of this board's runs that shared the cores, its own and the joined benchmarks'."""
    import b1_compression  # here, not at the top: it builds on this module

    return SHARED_CORES + b1_compression.SHARED_CORES


def joined_section(file: str, key: str | None, title: str, intro: str) -> tuple[list[str], dict | None]:
    """A second table from another benchmark's board (``results/<file>``, under ``key`` if given), as that
    benchmark's ``--board`` last wrote it: its markdown lines and the board, or nothing before it has one."""
    path = RESULTS / file
    data = json.loads(path.read_text()) if path.exists() else {}
    board = data.get(key) if key else data
    if not board or not board.get("rows"):
        return [], None
    return [f"## {title}", "", intro, "", *leaderboard_markdown(board), "",
            *[f"- `{r['label']}`: {r['what']}" for r in board["rows"]], ""], board


def all_linear_section() -> tuple[list[str], dict | None]:
    """The FLASC rows, which need LoRA on every linear layer and so their own FedIT."""
    return joined_section(
        "b1_compression.json", "flasc", "The same profile with LoRA on every linear layer (FLASC's set-up)",
        "FLASC's paper puts LoRA on every attention and MLP projection; with q/k/v only, its download mask drops "
        "most of B on this small model. These rows run that set-up against FedIT with the same LoRA (`fedit_al`, "
        "client lr 0.2 chosen on it); the rest of the profile is the one above. From "
        "[b1_compression.md](b1_compression.md), which also sets each run's accuracy against FedIT's at equal "
        "total bytes.")


def fedbiot_section() -> tuple[list[str], dict | None]:
    """B2's rows: FedBiOT, FedOT and offsite-tuning against FedIT on the full model, by loss on GSM8K."""
    return joined_section(
        "b2_aligned.json", None, "B2: the FedBiOT family on SmolLM2-135M (GSM8K, loss: lower is better)",
        "A causal LM the clients never hold whole: FedBiOT (emulator pre-aligned to its quality gate), FedOT and "
        "offsite-tuning train an adapter on a compressed emulator; the reference is FedIT's LoRA on the full "
        "model. 3 iid clients, 12 rounds of 8 local steps; the metric is the adapter in the full model (AdapFu), "
        "its loss on a fixed 50-question subset; target: FedIT's smoothed final loss + 0.01. From "
        "[b2_aligned.md](b2_aligned.md), which also gives AdapEmu, the emulator's gate and the paper's claim "
        "seed by seed.")


def write_board() -> dict | None:
    records = BENCHMARK.records() + joined_records()
    if not any(r["label"] == "fedit" for r in records):
        say("no FedIT result yet: no leaderboard")
        return None
    board = build_leaderboard(records, reference="fedit")
    what = {r["label"]: r.get("what", "") for r in records} | WHAT
    for row in board["rows"]:
        row["what"] = what.get(row["label"], "")
    board |= {"benchmark": BENCH, "profile": PROFILE, "config": f"configs/{CONFIG}.yaml"}
    linear_lines, linear_board = all_linear_section()
    fedbiot_lines, fedbiot_board = fedbiot_section()
    (RESULTS / "LEADERBOARD.json").write_text(json.dumps(board | {"all_linear": linear_board, "b2": fedbiot_board},
                                                         indent=1) + "\n")
    ref = board["rows"][0]
    gain = ref["plateau_gain_last_20pct"]
    by_seed = ", ".join(f"{s}: {g * 100:+.1f}" for s, g in sorted(ref["plateau_gain_by_seed"].items()))
    lines = ["# Leaderboard: B1, cpu profile of protocol v2", "",
             "Every method and baseline on the same data, model, seeds and client optimiser, judged as "
             "[benchmarks/PROTOCOL.md](../PROTOCOL.md) says. Rebuilt by `python benchmarks/b1_cpu.py --board` from the "
             "compact results in [runs/b1_cpu/](runs/b1_cpu/).", "",
             "Set-up: 20 Newsgroups (headers, footers and quotes removed), MiniLM + LoRA r=16 on q/k/v + head; "
             "20 clients, Dirichlet(1.0) label split, 4 a round, 150 rounds of 3 local steps of 16 posts at "
             "48 tokens; client SGD-momentum 0.9, lr 0.5 with cosine decay over rounds; evaluation every 6 rounds "
             "on a fixed 800-post subset of a fixed 2,000-post test set (the last round on both the subset and "
             "all 2,000).", "",
             f"FedIT's smoothed curve gains {gain['mean'] * 100:+.2f} ± {gain['std'] * 100:.2f} points over the "
             f"last 20% of rounds (seed by seed: {by_seed}); the protocol's plateau test (under 1 point) holds "
             f"for {sum(abs(g) < 0.01 for g in ref['plateau_gain_by_seed'].values())} of "
             f"{len(ref['plateau_gain_by_seed'])} seeds. " + longer_runs(records) +
             "Target per seed: that seed's FedIT smoothed final accuracy minus 1 point. Mean ± sample std over "
             "seeds; bytes and hours to target are over the seeds that reached it; `bytes vs fedit` is FedIT's "
             "bytes to target divided by the run's, seed by seed. Hours to target: the ledger's bytes over each "
             "link profile plus each client's measured compute on this machine (PROTOCOL.md). Client peak RSS: "
             "the simulation process while one client trained (it includes the server's share, so it is an upper "
             "bound on a deployed client).", "",
             *leaderboard_markdown(board), ""]
    lines += ["What each row runs:", ""]
    lines += [f"- `{r['label']}`: {r['what']}" for r in board["rows"]]
    lines += ["", *linear_lines, *fedbiot_lines]
    shown = [r for b in (board, linear_board, fedbiot_board) if b for r in b["rows"]]
    short = [r["label"] for r in shown if len(r["seeds"]) < 3]
    expected = [*WHAT, *[label for labels in JOINED.values() if labels for label in sorted(labels)]]
    missing = [label for label in expected if label not in {r["label"] for r in board["rows"]}]
    if short or missing:
        lines += ["**Provisional.** The protocol asks for three seeds a row. "
                  + (f"Fewer so far: {', '.join(short)}. " if short else "")
                  + (f"Not run yet: {', '.join(missing)}. " if missing else "")
                  + "The benchmark that owns a row (`b1_cpu.py`, `b1_compression.py`, `b1_hetero.py`, `b6_frontier.py`, "
                  "`b2_aligned.py`) "
                  "continues "
                  "where its last run stopped with `--commit`.", ""]
    shared = [f"{label} s{seed}" for label, seed in shared_cores()
              if any(r["label"] == label and seed in r["seeds"] for r in shown)]
    if shared:
        lines += ["**Timing caveat.** These runs shared the 2 cores with other work (tests, other pilots) for part "
                  f"of their run: {', '.join(shared)}. Their accuracy and bytes are unaffected; their measured client "
                  "compute, and so `client step s` and the hours to target, is inflated, which is what the larger std of "
                  "those columns shows.", ""]
    lines += [f"Machines: {'; '.join(sorted({m for r in shown for m in r['machines']}))}.", ""]
    lines += figure_lines(board, records, "LEADERBOARD.png", "B1 cpu profile: smoothed accuracy, mean over seeds, "
                          "band = 1 std", "smoothed accuracy by round and by bytes")
    (RESULTS / "LEADERBOARD.md").write_text("\n".join(lines))
    say("\n".join(leaderboard_markdown(board)))
    return board


def main() -> None:
    BENCHMARK.main(__doc__.split("\n")[0], write_board)


if __name__ == "__main__":
    main()
