"""B1 FedIT baselines: 20 Newsgroups, MiniLM + LoRA, 100 clients, Dirichlet(0.1), 10 a round.

Runs FedIT with dense fp32 and fp16 payloads and FFA-LoRA, then writes
``results/b1_fedit.json``, ``results/b1_fedit.md`` and ``results/b1_fedit_*.png``.

    python benchmarks/b1_fedit.py --profile smoke   # < 5 minutes on 2 cores
    python benchmarks/b1_fedit.py --profile full    # the published numbers
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, accuracy_figure, collect, merge_results, profile_sections, run_profile  # noqa: E402

PROFILES = {
    # Same code path, smaller: fewer clients, rounds and test examples.
    "smoke": ["rounds=3", "num_clients=20", "clients_per_round=4", "data.max_train_examples=1500",
              "data.max_test_examples=500", "eval.every=1", "eval.max_examples=null"],
    "full": [],
    # The full set-up cut to 10 rounds: for comparisons at the same round when the 25-round runs do not fit
    # the machine's time (e.g. HAFL vs HetLoRA on 2 CPU cores).
    "medium": ["rounds=10"],
}
RUNS = [
    ("fedit_fp32", ["method=fedit", "wire.down=fp32", "wire.up=fp32"]),
    ("fedit_fp16", ["method=fedit", "wire.down=fp16", "wire.up=fp16"]),
    ("ffa_lora_fp32", ["method=ffa_lora", "wire.down=fp32", "wire.up=fp32"]),
]


def main() -> None:
    profile, runs, dirs = run_profile("b1_fedit", "b1_fedit", PROFILES, lambda _: RUNS)
    results = [collect(dirs[label], profile, label) for label, *_ in runs]
    data = merge_results(RESULTS / "b1_fedit.json", results)
    write_outputs(data)


def write_outputs(data: dict) -> None:
    lines = ["# B1: FedIT baselines (20 Newsgroups, MiniLM + LoRA r=16, 100 clients, Dirichlet 0.1)", ""]
    columns = ["run", "method", "rounds", "accuracy", "macro-F1", "MB up", "MB down", "up bytes vs fp32", "wall s"]
    for profile, runs, header in profile_sections(data["runs"], columns):
        lines += header
        ref = next((r for r in runs if r["label"] == "fedit_fp32"), runs[0])
        for r in runs:
            fm = r["final_metrics"]
            lines.append(f"| {r['label']} | {r['method']} | {r['rounds']} | {fm.get('accuracy', float('nan')):.4f} | "
                         f"{fm.get('macro_f1', float('nan')):.4f} | {r['bytes_up_total'] / 1e6:.2f} | "
                         f"{r['bytes_down_total'] / 1e6:.2f} | {r['bytes_up_total'] / ref['bytes_up_total']:.3f} | "
                         f"{r['wall_seconds']:.0f} |")
        lines.append("")
        lines += accuracy_figure(runs, f"b1_fedit_{profile}", f"B1 FedIT baselines, profile {profile}")
    lines += ["Intermediate points of the full profile are evaluated on a fixed 2,000-post subset of the test",
              "split; the final round on the full test split (7,532 posts). The smoke profile only checks the",
              "pipeline (3 rounds, 20 clients, 1,500 posts): its accuracy is near chance (5%) by design.", ""]
    (RESULTS / "b1_fedit.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
