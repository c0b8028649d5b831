"""B1 heterogeneous: HAFL vs HetLoRA, FlexLoRA and homogeneous FedIT at ranks 16 and 4.

Three tiers with rank budgets 4 / 8 / 16 of a global rank 16, a third of the clients each, on B1's data,
model, partition and seed. Writes ``results/b1_hafl.json`` (the ``b1_fedit.json`` schema plus per-tier
bytes and distribution accuracy), ``results/b1_hafl.md`` and ``results/b1_hafl_<profile>.png``.

    python benchmarks/b1_hafl.py --profile smoke|full
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from b1_fedit import PROFILES  # noqa: E402
from b1_fedit import RUNS as FEDIT_RUNS
from common import RESULTS, accuracy_figure, collect, merge_results, profile_sections, run_profile  # noqa: E402

TIERS = "tiers: [{rank: 4, share: 0.3334}, {rank: 8, share: 0.3333}, {rank: 16, share: 0.3333}]"


def hafl(method: str, agg: str | None, extra: str = "") -> list[str]:
    every = "degradation_every: 5, degradation_examples: 2000"
    aggregation = f"aggregation: {agg}, " if agg else ""
    return [f"method={method}", f"method_options={{{aggregation}{extra}{TIERS}, {every}}}"]


RUNS = [
    ("hafl_freeze_adaptive", hafl("hafl", "adaptive")),
    ("hafl_freeze_zero_pad", hafl("hafl", "zero_pad")),
    ("hafl_truncate", hafl("hafl_truncate", "adaptive")),
    ("hetlora", hafl("hetlora", "zero_pad")),
    ("flexlora", hafl("flexlora", None, "factor_split: sqrt, ")),  # how it ran (FlexLoRA's own split: b1_hetero)
    ("fedit_rank16", dict(FEDIT_RUNS)["fedit_fp32"], "b1_fedit/fedit_fp32"),  # B1 FedIT's run, reused
    ("fedit_rank4", ["method=fedit", "lora.rank=4", "lora.alpha=4"]),
]


def tier_bytes(run_dir: Path, method: dict) -> dict[str, dict[str, int]]:
    if "client_ranks" not in method:
        return {}
    ranks = method["client_ranks"]
    out: dict[str, dict[str, int]] = {}
    for line in (run_dir / "ledger.jsonl").read_text().splitlines():
        e = json.loads(line)
        t = out.setdefault(str(ranks[e["client"]]), {"up": 0, "down": 0, "messages_up": 0})
        t[e["direction"]] += e["bytes"]
        t["messages_up"] += e["direction"] == "up"
    return out


def update_norm(run_dir: Path) -> float | None:
    """Mean Frobenius norm of the global LoRA update scale * B @ A per module, from the exported adapter.

    A size diagnostic: aggregation rules differ mostly in how far they move the global model a round."""
    from safetensors.torch import load_file

    path = run_dir / "adapter" / "adapter_model.safetensors"
    if not path.exists():
        return None
    cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    w = load_file(str(path))
    norms = [float((scale * w[a.replace("lora_A", "lora_B")] @ w[a]).norm()) for a in w if "lora_A" in a]
    return sum(norms) / len(norms) if norms else None


def main() -> None:
    profile, runs, dirs = run_profile("b1_hafl", "b1_fedit", PROFILES, lambda _: RUNS)
    results = []
    for label, *_ in runs:
        r = collect(dirs[label], profile, label)
        path = dirs[label] / "method.json"
        method = json.loads(path.read_text()) if path.exists() else {}
        r["tier_bytes"] = tier_bytes(dirs[label], method)
        r["mean_update_norm"] = update_norm(dirs[label])
        r["tier_train_state_bytes"] = method.get("tier_train_state_bytes")
        rows = [json.loads(x) for x in (dirs[label] / "metrics.jsonl").read_text().splitlines()]
        r["tier_accuracy"] = [{k: v for k, v in row.items() if k.startswith("tier") or k == "round"}
                              for row in rows if any(k.startswith("tier") for k in row)]
        results.append(r)
    data = merge_results(RESULTS / "b1_hafl.json", results)
    write_outputs(data)


def write_outputs(data: dict) -> None:
    lines = ["# B1 heterogeneous ranks: HAFL vs HetLoRA, FlexLoRA, FedIT (tiers 4/8/16 of rank 16)", ""]
    columns = ["run", "accuracy", "MB up", "MB down", "mean up KB / message by tier (4 / 8 / 16)",
               "last tier accuracy (4 / 8 / 16)", "mean norm of dW a module"]
    for profile, runs, header in profile_sections(data["runs"], columns):
        lines += header
        for r in runs:
            tb = r.get("tier_bytes") or {}
            per = " / ".join(f"{tb[t]['up'] / max(tb[t]['messages_up'], 1) / 1e3:.1f}" if t in tb else "-"
                             for t in ("4", "8", "16"))
            last = r["tier_accuracy"][-1] if r.get("tier_accuracy") else {}
            acc = " / ".join(f"{last[f'tier{t}_accuracy']:.3f}" if f"tier{t}_accuracy" in last else "-"
                             for t in ("4", "8", "16"))
            norm = f"{r['mean_update_norm']:.2f}" if r.get("mean_update_norm") is not None else "-"
            lines.append(f"| {r['label']} | {r['final_metrics'].get('accuracy', float('nan')):.4f} | "
                         f"{r['bytes_up_total'] / 1e6:.2f} | {r['bytes_down_total'] / 1e6:.2f} | {per} | {acc} | {norm} |")
        mem = next((r["tier_train_state_bytes"] for r in runs if r.get("tier_train_state_bytes")), None)
        if mem:
            lines += ["", "Client training state (LoRA + head weights, grads and AdamW moments) by tier: " +
                      ", ".join(f"rank {t}: {b / 1e6:.2f} MB" for t, b in mem.items()) + "."]
        lines.append("")
        lines += accuracy_figure(runs, f"b1_hafl_{profile}", f"B1 heterogeneous ranks, {profile}")
    lines += ["Tier accuracy: the global model as each tier receives it (truncated to its rank, before local",
              "training), on 2,000 test posts; in `freeze` mode every tier receives the whole model.",
              "mean norm of dW: the size of the final global LoRA update (scale * B @ A), averaged over modules.", ""]
    (RESULTS / "b1_hafl.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
