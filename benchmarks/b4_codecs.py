"""B4 codec table on real LoRA updates from B1.

Takes the global state of a finished B1 FedIT run (its checkpoint), trains a few sampled clients for one
local epoch exactly as B1 does, and encodes their real updates (delta = trained - global) with each codec.
Reports bytes, ratio to dense fp32, position bytes against the information floor log2(C(P, k)) bits, and
encode / decode time. Writes ``results/b4_codecs.json`` and ``results/b4_codecs.md``.

    python benchmarks/b4_codecs.py [--run benchmarks/runs/b1_fedit/full/fedit_fp32] [--clients 3]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, machine  # noqa: E402

SPECS = ["fp32", "fp16", "bf16", "int8", "int4", "fp32+zstd", "int8+zstd",
         "topk(0.25)", "topk(0.0625)", "topk(0.015625)", "topk(0.0625)+fp16", "topk(0.0625)+int8+zstd",
         "topk(0.0625)+int4+zstd", "topk(0.015625)+int8+zstd"]
# FLASC's own messages: one global top-k mask over all tensors, flattened into a single vector and sent
# with ``nonzero+`` (one position stream over all P entries). (label, density, chain)
GLOBAL = [("FLASC global top-k(1/4)", 0.25, "nonzero+fp32"), ("FLASC global top-k(1/16)", 0.0625, "nonzero+fp32"),
          ("FLASC global top-k(1/64)", 0.015625, "nonzero+fp32"),
          ("FLASC global top-k(1/16)+int8+zstd", 0.0625, "nonzero+int8+zstd"),
          ("FLASC global top-k(1/16)+int4+zstd", 0.0625, "nonzero+int4+zstd")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=str(ROOT / "runs" / "b1_fedit" / "full" / "fedit_fp32"))
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from fedzip.config import load_config
    from fedzip.engine.client import client_seed
    from fedzip.engine.rounds import sample_clients
    from fedzip.engine.runtime import build_runtime
    from fedzip.methods import METHODS
    from fedzip.methods.flasc import flatten, global_topk_masks
    from fedzip.methods.training import train_locally
    from fedzip.wire import Message, decode, encode
    from fedzip.wire.payload import PREFIX
    from fedzip.wire.stages import position_floor_bits

    run = Path(args.run)
    cfg = load_config(run / "config.yaml", ["train.threads=1"])
    rt = build_runtime(cfg, METHODS[cfg.method])
    state = load_file(str(run / "checkpoints" / "server.safetensors"))
    names = rt.view.names()
    rnd = cfg.rounds + 1  # the round after the run ended
    updates, train_s = [], []
    for cid in sample_clients(cfg.seed, rnd, cfg.num_clients, cfg.clients_per_round)[: args.clients]:
        rt.view.set({n: state[n] for n in names})
        t0 = time.time()
        train_locally(rt.model, rt.view.params, rt.task, rt.parts[cid], cfg.train, client_seed(cfg.seed, rnd, cid))
        train_s.append(time.time() - t0)
        updates.append({n: rt.view.params[n].detach() - state[n] for n in names})
    expect = rt.view.shapes()
    p = sum(t.numel() for t in updates[0].values())
    def flasc_message(upd: dict, density: float) -> dict:
        masks = global_topk_masks(upd, max(1, math.ceil(density * p)))  # as FlascMethod.k_for
        return {"delta": flatten({n: t * masks[n] for n, t in upd.items()})}

    cases = [(spec, spec, lambda u: u, expect) for spec in SPECS]
    cases += [(label, spec, lambda u, d=d: flasc_message(u, d), {"delta": (p,)}) for label, d, spec in GLOBAL]
    rows = []
    for label, spec, prepare, shapes in cases:
        size = enc_s = dec_s = pos_bytes = floor_bytes = 0.0
        for upd in updates:
            msg = Message(prepare(upd), {"num_examples": 1})
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                data = encode(msg, spec)
                t1 = time.perf_counter()
                decode(data, shapes)
                t2 = time.perf_counter()
                enc_s += (t1 - t0) / args.repeats
                dec_s += (t2 - t1) / args.repeats
            size += len(data)
            header = json.loads(data[PREFIX.size:PREFIX.size + PREFIX.unpack_from(data)[1]])
            for e in header["tensors"]:
                if "np" in e["params"]:
                    n = 1
                    for d in e["shape"]:
                        n *= d
                    pos_bytes += e["params"]["np"]
                    floor_bytes += position_floor_bits(n, e["params"]["k"]) / 8
        c = len(updates)
        rows.append({"codec": label, "bytes": size / c, "ratio_to_dense_fp32": (4 * p) / (size / c),
                     "position_bytes": pos_bytes / c if pos_bytes else None,
                     "position_ratio_to_floor": (pos_bytes / floor_bytes) if floor_bytes else None,
                     "encode_ms": 1000 * enc_s / c, "decode_ms": 1000 * dec_s / c})
    result = {"benchmark": "b4_codecs", "machine": machine(), "source_run": run.name, "params": p,
              "clients": len(updates), "client_train_seconds_mean": sum(train_s) / len(train_s), "codecs": rows}
    (RESULTS / "b4_codecs.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# B4: codecs on real B1 LoRA updates ({p:,} values a message; {machine()})", "",
             f"Mean of {len(updates)} client updates; a client's local training took "
             f"{result['client_train_seconds_mean']:.1f} s on average. Bytes are whole payloads (header included).", "",
             "| codec | bytes | x smaller than dense fp32 | positions / floor | encode ms | decode ms |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        pr = f"{r['position_ratio_to_floor']:.3f}" if r["position_ratio_to_floor"] else "-"
        lines.append(f"| `{r['codec']}` | {r['bytes']:,.0f} | {r['ratio_to_dense_fp32']:.1f} | {pr} | "
                     f"{r['encode_ms']:.1f} | {r['decode_ms']:.1f} |")
    (RESULTS / "b4_codecs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
