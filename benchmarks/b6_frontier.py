"""B6, the communication frontier: Fed-SB, FedSA-LoRA and FedKSeed against FedIT under protocol v2.

**B1-cpu rows** share ``b1_cpu.py``'s profile exactly (20 Newsgroups, MiniLM, LoRA r=16 on q/k/v + head, 20
clients at Dirichlet 1.0, 4 a round, 3 local SGD-momentum steps, lr 0.5 with a cosine decay, 150 rounds) and
its three seeds. Their reference is FedIT run here (``fedit_personal``: its training and training bytes are
FedIT's; its personalised evaluation is counted apart), under the same code and the same wire format as the
rows it judges: B1-cpu's own FedIT runs sent plain-JSON headers (``FZP1``, 0.6% of a FedIT message), and
they stay on the page as ``fedit`` to show the two agree. The learning rate stays the one chosen on FedIT,
as for every method in B1.

* ``fedsb_r16``: Fed-SB with LoRA-SB's gradient initialisation (round 1: the first cohort's gradients on 64
  examples each), r = 16; ``fedsb_r64``: r = 64 (the paper trades a larger R, r^2 values, for expressivity),
  alpha scaled with the rank; ``fedsb_r16_random``: the data-free seeded basis (no round-1 gradients);
  ``fedsb_r16_random_int4``: the same with R and the head in int4 (stochastic rounding) + zstd both ways,
  the clients sending the change in R and the head (``upload: update``, so the server's state is never
  rounded): the row for the issue's goal of 100x fewer bytes than FedIT to FedIT's target;
  ``fedsb_r16_random_int4_model`` (seed 0) sends the whole R and head, whose rounding the server keeps.
* ``fedsb_r16_random_int4_lr1``, ``_lr2``, ``_lr4`` (seed 0): the goal row at lr 1, 2 and 4, a learning-rate
  pilot. Fed-SB trains only R between a fixed B and A, so FedIT's rate need not suit it; the protocol's rule
  for rows that change the LoRA is a small grid on seed 0 (FedIT's own grid was 0.5 and 1.0, which diverged).
  lr 4 was added when lr 2 led the first two. lr 2 won on seed 0 by a hair over lr 4, so ``_lr2`` runs on
  every seed and is a candidate for the goal; the others stay at seed 0.
* Seed 0 only, to explain the candidates (never candidates themselves): ``fedsb_r16_random``, ``fedsb_r64``,
  ``fedsb_r16_random_int4_model`` and the pilot's lr 1 and 4 (``B6_ABLATIONS``).
* ``fedsa_lora``: FedSA-LoRA (A shared; B and the head stay on the clients). It has no one global model: its
  accuracy is the mean of 10 clients' own models on the shared test subset, and ``personal_accuracy`` each
  on a test draw that follows its own labels. ``fedit_personal`` is FedIT with the same personalised
  evaluation (the global model on each of those clients' draws), the comparison FedSA-LoRA's claim needs.

**FedKSeed** is not in the cpu rows: zeroth-order training needs its paper's hundreds of local steps a round
(each two forward passes and four draws of a direction over all 22.7M weights), which B1-cpu's three steps
a round do not give and two CPU cores cannot. Its rows are the ``--causal`` set, for a lent GPU: SmolLM2-135M
on Alpaca-style instructions, FedIT against FedKSeed (K = 1024, lr 3e-7 as the paper, 200 local steps),
judged by test loss.

On a lent GPU machine these rows run through ``gpu_suite.py --suite b6_causal``: the machine has no network
and a call carries at most 64 MiB, less than SmolLM2's smallest faithful form (its Q4_1 GGUF, 98 MB), so the
suite carries the model in two halves over two calls (the steps are in its docstring). A 2-round check of the
suite on 2 CPU cores took 104 s for FedIT and 293 s for FedKSeed (2 zeroth-order steps a client). FedKSeed's
whole run (40 rounds x 4 clients x 200 two-point steps, each direction over 134.5M weights) has not been timed
on a GPU: one seed of each row may be what one session's device time allows. ``progress.json`` from the suite
gives the pace of what did not finish.

    python benchmarks/b6_frontier.py --commit            # the cpu rows x seeds 0,1,2 not done yet
    python benchmarks/b6_frontier.py --only fedsb_r16,fedsa_lora --seeds 0
    python benchmarks/b6_frontier.py --board             # rebuild results/b6_frontier.{md,json,png}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from b1_cpu import BENCHMARK as B1_CPU  # noqa: E402
from b1_cpu import CONFIG, PROFILE  # noqa: E402
from common import RESULTS, say  # noqa: E402
from seeded import SeededBenchmark, figure_lines, ratio_verdict  # noqa: E402

from fedzip.report.leaderboard import build_leaderboard, leaderboard_markdown, mean_std_text  # noqa: E402

BENCH = "b6_frontier"
PERSONAL = ["eval.personal_clients=10", "eval.personal_examples=100"]
# stochastic: R and the head travel as whole states every round, and rounding each the same way every round
# would hold back changes smaller than half a step (int4 has 7 levels a side)
INT4 = ["wire.up=int4(stochastic=1)+zstd", "wire.down=int4(stochastic=1)+zstd"]
REFERENCE = "fedit_personal"  # FedIT run here, under the same code and wire format as the rows it judges
SB_LR_GRID = (1.0, 2.0, 4.0)  # beside lr 0.5, FedIT's, which the Fed-SB rows use
SB_LR_CHOSEN = 2.0  # the pilot's best on seed 0 (below)
GOAL = 100  # the goal: total bytes to FedIT's target at least 100x fewer than FedIT's
ROWS = [
    ("fedit_personal", PERSONAL, "FedIT (the reference), with personalised evaluation: the global model on 10 clients' "
                                 "own test draws"),
    # the >= 100x goal: R and the head are 12.3k values against FedIT's 230k, 19x fewer bytes a message at fp32;
    # int4 brings that to about 130x, which leaves room to reach the target a little later than FedIT
    ("fedsb_r16_random_int4", ["method=fedsb", "method_options={init: random, upload: update}", *INT4],
     "Fed-SB r=16, random basis, int4 (stochastic rounding) + zstd both ways; clients send the change in R and "
     "the head (upload: update), so the server's state carries no rounding of its own"),
    ("fedsb_r16", ["method=fedsb"], "Fed-SB r=16: only R (16x16 per module) and the head travel; LoRA-SB's "
                                    "gradient initialisation from round 1's cohort (counted)"),
    ("fedsa_lora", ["method=fedsa_lora", *PERSONAL], "FedSA-LoRA: A shared, B and the head kept on each client; "
                                                     "accuracy = mean of 10 client models on the shared test subset"),
    ("fedsb_r16_random", ["method=fedsb", "method_options={init: random}"],
     "Fed-SB r=16 with a seeded random basis and R = 0 (no round-1 gradients), fp32"),
    ("fedsb_r64", ["method=fedsb", "lora.rank=64", "lora.alpha=128"],
     "Fed-SB r=64 (alpha 128, the same scaling as r=16): R has 16x the values"),
    # the ablation of upload: update, seed 0 only: whole R and head int4 each way, as the paper would send them
    ("fedsb_r16_random_int4_model", ["method=fedsb", "method_options={init: random}", *INT4],
     "Fed-SB r=16, random basis, int4 (stochastic rounding) + zstd both ways, whole R and head sent (the server's "
     "state is rounded every round)"),
    # the learning-rate pilot, seed 0: Fed-SB trains only R between a fixed B and A, so the rate chosen on FedIT's
    # LoRA need not suit it (the protocol's rule for rows that change the LoRA: a small grid on seed 0)
    *[(f"fedsb_r16_random_int4_lr{lr:g}", ["method=fedsb", "method_options={init: random, upload: update}", *INT4,
                                          f"train.lr={lr}"],
       f"the goal row (fedsb_r16_random_int4) at lr {lr:g}: learning-rate pilot, seed 0") for lr in SB_LR_GRID],
]
# one seed: they explain a row, they are not candidates. The pilot's best rate on seed 0 (smoothed final accuracy
# 0.549 at lr 2, 0.546 at 4, 0.530 at 1, 0.510 at FedIT's 0.5) runs on every seed: a candidate like the others
# fedsb_r16_random and fedsb_r64 (fp32, 19x and 3x fewer values a message than FedIT) cannot meet the goal
B6_ABLATIONS = ["fedsb_r16_random", "fedsb_r64", "fedsb_r16_random_int4_model",
                *[f"fedsb_r16_random_int4_lr{lr:g}" for lr in SB_LR_GRID if lr != SB_LR_CHOSEN]]
BENCHMARK = SeededBenchmark(BENCH, CONFIG, PROFILE, ROWS, references=[REFERENCE],
                            seeds_of={label: [0] for label in B6_ABLATIONS})

# --causal, for a lent GPU (not run on the cpu machines): SmolLM2-135M on the Alpaca demo set
CAUSAL_PROFILE = ["model.name=smollm2-135m", "data.source=alpaca", "data.max_length=256", "data.max_test_examples=100",
                  "num_clients=20", "clients_per_round=4", "partition.scheme=iid", "rounds=40", "eval.every=4",
                  "train.batch_size=4", "lora.train_head=false", "train.device=cuda"]
CAUSAL_ROWS = [
    ("fedit_causal", ["method=fedit", "method_options={}", "train.optimizer=adamw", "train.lr=0.0003", "train.max_steps=20"],
     "FedIT, LoRA r=8 via the config, AdamW 3e-4, 20 local steps"),
    ("fedkseed_causal", ["method=fedkseed", "train.lr=3e-7",
                         "train.max_steps=200", "method_options={num_seeds: 1024, directions: device}"],
     "FedKSeed, K=1024, lr 3e-7, 200 zeroth-order steps a round, directions drawn on the GPU"),
]
CAUSAL = SeededBenchmark(f"{BENCH}_causal", "b2_fedbiot", CAUSAL_PROFILE, CAUSAL_ROWS)


def personal_table(records: list[dict]) -> list[str]:
    """Personalised accuracy (each client's model on its own test draw) at the last evaluation, per row."""
    lines = ["| row | personalised accuracy (mean of 10 clients) | worst client | accuracy on the shared test | seeds |",
             "|---|---|---|---|---|"]
    for label in ("fedsa_lora", "fedit_personal"):
        runs = [r for r in records if r["label"] == label]
        last = [r["curve"][-1] for r in runs if r.get("curve")]
        values = [row["personal_accuracy"] for row in last if "personal_accuracy" in row]
        if not values:
            continue
        worst = [row["personal_accuracy_min"] for row in last if "personal_accuracy_min" in row]
        acc = [r["final_metrics"].get("accuracy") for r in runs]
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        lines.append(f"| {label} | {mean(values):.3f} | {mean(worst):.3f} | {mean([a for a in acc if a is not None]):.3f} "
                     f"| {len(values)} |")
    return lines if len(lines) > 2 else []


def goal_lines(board: dict) -> list[str]:
    """Each row against the goal: total bytes (up + down) to FedIT's target, >= GOAL times fewer than FedIT's."""
    lines = [f"### The >= {GOAL}x goal", "",
             "Total bytes (up + down) to FedIT's target (its smoothed final accuracy minus one point, seed by seed), "
             "FedIT's over the row's; a seed that never reaches the target has no ratio.", "",
             "| row | reached | bytes vs FedIT (mean ± std) | smallest ratio of a seed | MB up + down, whole run | goal |",
             "|---|---|---|---|---|---|"]
    met, provisional = [], []
    for row in board["rows"]:
        if row["label"] in (board["reference"], "fedit"):  # FedIT itself, here and in B1-cpu
            continue
        ratios = [j["bytes_ratio"] for j in row["per_seed"] if j["bytes_ratio"] is not None]
        verdict = ratio_verdict(row, GOAL)  # "holds on every seed" only with 3 seeds, each at >= GOAL
        if row["label"] in B6_ABLATIONS:  # run on seed 0 to explain a row: never a candidate
            verdict = "not a candidate (seed 0 only): " + verdict.split(": ", 1)[-1]
        if verdict.startswith("holds on every seed"):
            met.append(row["label"])
        elif verdict.startswith("provisional") and row["label"] not in B6_ABLATIONS:
            provisional.append(row["label"])
        whole = row["mb_up_total"]["mean"] + row["mb_down_total"]["mean"]
        lines.append(f"| {row['label']} | {row['reached']} | {mean_std_text(row['bytes_ratio_vs_reference'], '.1f')} | "
                     f"{f'{min(ratios):.1f}' if ratios else '-'} | {whole:.1f} | {verdict} |")
    lines += ["", f"Goal met by: {', '.join(met)}." if met else
              f"No verdict yet: fewer than 3 seeds of {', '.join(provisional)}." if provisional else
              f"Goal not met: no row reaches FedIT's target on every seed with {GOAL}x fewer bytes."]
    return lines


def write_board() -> None:
    own = BENCHMARK.records()
    lines = ["# B6: the communication frontier (Fed-SB, FedSA-LoRA; FedKSeed on a GPU)", "",
             "Rebuilt by `python benchmarks/b6_frontier.py --board` from "
             "[runs/b6_frontier/](runs/b6_frontier/); the reference is FedIT run here (`fedit_personal`); `fedit` is "
             "B1-cpu's FedIT (same profile, plain-JSON headers), shown beside it. The rows and the profile are in "
             "the script's docstring.", ""]
    if not own:
        lines += ["No finished run yet.", ""]
    elif not any(r["label"] == REFERENCE for r in own):
        lines += [f"No run of the reference ({REFERENCE}) yet.", ""]
    else:
        records = own + B1_CPU.records({"fedit"})
        board = build_leaderboard(records, reference=REFERENCE)
        lines += leaderboard_markdown(board) + [""]
        lines += goal_lines(board) + [""]
        lines += personal_table(own) + [""]
        (RESULTS / "b6_frontier.json").write_text(json.dumps(board, indent=1) + "\n")
        lines += figure_lines(board, records, "b6_frontier.png", "B6: smoothed accuracy, mean over seeds", "b6")
    causal = CAUSAL.records()
    lines += ["## Causal LM (SmolLM2-135M): FedKSeed against FedIT", ""]
    if causal and any(r["label"] == "fedit_causal" for r in causal):
        lines += leaderboard_markdown(build_leaderboard(causal, reference="fedit_causal")) + [""]
    else:
        lines += ["Not run: these rows need a GPU (`python benchmarks/b6_frontier.py --causal`).", ""]
    (RESULTS / "b6_frontier.md").write_text("\n".join(lines) + "\n")
    say("\n".join(lines))


def causal(commit: bool, seeds: list[int]) -> None:
    failed = CAUSAL.run(seeds, set(), jobs=1, commit=commit)
    if failed:
        raise SystemExit(f"error: {len(failed)} run(s) failed: {', '.join(failed)}")


def main() -> None:
    BENCHMARK.main(__doc__.split("\n")[0], write_board,
                   modes={"--causal": ("the causal-LM rows (FedIT vs FedKSeed on SmolLM2; for a GPU)", causal)})


if __name__ == "__main__":
    main()
