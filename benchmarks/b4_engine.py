"""B4 systems: engine overhead and process memory with 10 / 100 / 1,000 registered clients, 10 a round.

The B1 setting (MiniLM + LoRA r=16 on 20 Newsgroups, Dirichlet 0.1) with two local steps per client so
that the engine's own costs are visible. Engine overhead = (round wall time - client compute time) /
round wall time, where client compute is local training only; encode, decode, aggregation and
bookkeeping are the overhead. Memory is the peak RSS of the simulation process (server and the
client being simulated share it). Writes ``results/b4_engine.json`` and ``results/b4_engine.md``.

    python benchmarks/b4_engine.py --profile smoke|full
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, profile_sections, run_matrix  # noqa: E402

PROFILES = {"smoke": {"sizes": [10, 100], "rounds": 2}, "full": {"sizes": [10, 100, 1000], "rounds": 4}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", choices=sorted(PROFILES), default="smoke")
    ap.add_argument("--jobs", type=int, default=1)
    args = ap.parse_args()
    prof = PROFILES[args.profile]
    runs = [(f"clients_{n}", "b1_fedit",
             [f"num_clients={n}", "clients_per_round=10", f"rounds={prof['rounds']}", "train.max_steps=2",
              "data.max_test_examples=200", f"eval.every={prof['rounds']}", "partition.min_examples=1",
              "train.persist_optimizer_state=true"])
            for n in prof["sizes"]]
    dirs = run_matrix("b4_engine", args.profile, runs, args.jobs)
    rows = []
    for (label, _, _), n in zip(runs, prof["sizes"]):
        d = dirs[label]
        summary = json.loads((d / "summary.json").read_text())
        metrics = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if x.strip()]
        train_rounds = [m for m in metrics if "eval_s" not in m] or metrics  # rounds without evaluation
        round_s = sum(m["round_s"] for m in train_rounds) / len(train_rounds)
        compute_s = sum(m["compute_s"] for m in train_rounds) / len(train_rounds)
        codec_s = sum(m["encode_s"] + m["decode_s"] for m in train_rounds) / len(train_rounds)
        agg_s = sum(m["aggregate_s"] for m in train_rounds) / len(train_rounds)
        rows.append({"registered_clients": n, "clients_per_round": 10, "profile": args.profile, "machine": machine(),
                     "seconds_per_round": round(round_s, 3), "client_compute_s": round(compute_s, 3),
                     "encode_decode_s": round(codec_s, 4), "aggregate_s": round(agg_s, 4),
                     "engine_overhead_fraction": round((round_s - compute_s) / round_s, 4),
                     "peak_rss_bytes": summary["peak_rss_bytes"],
                     "server_state_bytes": (d / "checkpoints" / "server.safetensors").stat().st_size,
                     "client_state_files": sum(1 for _ in (d / "client_state").rglob("*.safetensors"))
                     if (d / "client_state").exists() else 0,
                     "bytes_up_per_round": summary["bytes_up_total"] / summary["rounds_completed"],
                     "bytes_down_per_round": summary["bytes_down_total"] / summary["rounds_completed"]})
    path = RESULTS / "b4_engine.json"
    old = json.loads(path.read_text())["runs"] if path.exists() else []
    data = {"benchmark": "b4_engine", "runs": [r for r in old if r["profile"] != args.profile] + rows}
    path.write_text(json.dumps(data, indent=1) + "\n")
    lines = ["# B4: engine overhead and memory (B1 setting, 10 clients a round, 2 local steps each)", ""]
    columns = ["registered clients", "s / round", "client compute s", "encode+decode s", "aggregate s",
               "engine overhead", "process peak RSS MiB", "server state MiB", "MB up / round"]
    for _profile, sel, header in profile_sections(data["runs"], columns):
        lines += header
        for r in sel:
            lines.append(f"| {r['registered_clients']} | {r['seconds_per_round']:.2f} | {r['client_compute_s']:.2f} | "
                         f"{r['encode_decode_s']:.3f} | {r['aggregate_s']:.3f} | "
                         f"{100 * r['engine_overhead_fraction']:.1f}% | {r['peak_rss_bytes'] / 2**20:.0f} | "
                         f"{r['server_state_bytes'] / 2**20:.2f} | "
                         f"{r['bytes_up_per_round'] / 1e6:.2f} |")
        lines.append("")
    lines += ["The simulation runs the server and the client being trained in one process, so the peak RSS is",
              "the model, the tokenized data set and one client's training together; the server's own state is the",
              "checkpointed global tensors. Client state lives on disk, so memory does not grow with registered clients.", ""]
    (RESULTS / "b4_engine.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
