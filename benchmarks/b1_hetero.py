"""HAFL against HetLoRA and FlexLoRA with controls, on B1-cpu: is it the components it picks, or the step size?

With tiers 4/8/16, zero-padding shrinks the components few clients hold by about a third a round, so
HetLoRA (and HAFL with zero-padding) behave like rank-4 LoRA while HAFL's adaptive aggregation behaves like
rank 16. The controls tell the causes apart, on b1_cpu's profile (Dirichlet 1.0, client SGD-momentum with a
cosine decay, 150 rounds) and seeds:

* ``fedit_r4``: FedIT at rank 4 (the same LoRA scale alpha / r = 1), beside b1_cpu's FedIT at rank 16;
* ``hafl_step3``: HAFL (freeze, adaptive) whose server steps a third of the way to the aggregate;
* ``hafl_random``: HAFL (freeze, adaptive) training r_k components drawn blindly instead of by importance;
* ``hafl_zeropad``: HAFL (freeze) with zero-padding aggregation.

HAFL, HetLoRA, FlexLoRA and FedIT r16 come from b1_cpu's compact results (the same profile and seeds).

    python benchmarks/b1_hetero.py --commit        # every row x seeds 0,1,2 not done yet
    python benchmarks/b1_hetero.py --board         # rebuild results/b1_hetero.{md,json,png}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from b1_cpu import BENCHMARK as B1_CPU  # noqa: E402
from b1_cpu import CONFIG, HAFL_TIERS, PROFILE  # noqa: E402
from common import RESULTS, say  # noqa: E402
from seeded import SeededBenchmark, figure_lines  # noqa: E402

from fedzip.report.leaderboard import build_leaderboard, leaderboard_markdown  # noqa: E402

BENCH = "b1_hetero"
HAFL = "aggregation: adaptive"


def hafl(extra: str) -> list[str]:
    return ["method=hafl", f"method_options={{{HAFL}, {HAFL_TIERS}, {extra}}}"]


ROWS = [
    ("fedit_r4", ["lora.rank=4", "lora.alpha=4"], "FedIT at rank 4, LoRA scale 1 as every row"),
    ("hafl_step3", hafl("server_lr: 0.3333"), "HAFL (freeze, adaptive), server step 1/3 towards the aggregate"),
    ("hafl_random", hafl("selection: random"), "HAFL (freeze, adaptive), r_k components drawn at random"),
    ("hafl_zeropad", ["method=hafl", f"method_options={{aggregation: zero_pad, {HAFL_TIERS}}}"],
     "HAFL (freeze) with HetLoRA's zero-padding aggregation"),
]
BORROWED = ["fedit", "hafl", "hetlora", "flexlora"]  # from b1_cpu
BENCHMARK = SeededBenchmark(BENCH, CONFIG, PROFILE, ROWS, references=[])


def write_board() -> None:
    records = BENCHMARK.records() + B1_CPU.records(set(BORROWED))
    what = BENCHMARK.what | {label: f"{B1_CPU.what[label]} (b1_cpu)" for label in BORROWED}
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
    (RESULTS / "b1_hetero.json").write_text(json.dumps(board, indent=1) + "\n")
    lines += figure_lines(board, records, "b1_hetero.png", "B1 cpu profile, heterogeneous ranks: smoothed accuracy, "
                          "mean over seeds, band = 1 std", "smoothed accuracy")
    (RESULTS / "b1_hetero.md").write_text("\n".join(lines))
    say("\n".join(lines))


def main() -> None:
    BENCHMARK.main(__doc__.split("\n")[0], write_board)


if __name__ == "__main__":
    main()
