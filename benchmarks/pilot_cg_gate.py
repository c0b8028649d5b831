"""CG-FedLLM's codecs on the same recorded TGAP maps: learned autoencoders against the gate's baselines.

Runs b1_cpu's CG-FedLLM row (seed 0) through round TGAP - 1 (``fedzip run --stop-after``), whose checkpoint
holds every factor map TGAP recorded so far, then fits linear autoencoders at 1/16 and 1/64 to the older 80%
of those maps (early stopping on the newest 20%) and scores every codec on the held-out maps with the
quality gate's measure (autoencoder.gate_baselines: mean cosine at the same number of values).
Writes ``results/pilots/cg_gate_offline.json`` and ``.md``.

    python benchmarks/pilot_cg_gate.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from b1_cpu import CONFIG, PROFILE, runs_for  # noqa: E402
from common import RESULTS, ROOT, machine, run_one, say  # noqa: E402

TGAP = 30


def main() -> None:
    import torch
    from safetensors.torch import load_file

    from fedzip.methods.autoencoder import BlockLinearAutoencoder, autoencoder_cosine, gate_baselines, train_autoencoder

    out = ROOT / "runs" / "pilot_cg_gate" / "cgfedllm_linear16-s0"
    overrides = dict((label, ov) for label, ov, _ in runs_for("cpu"))["cgfedllm_linear16"]
    if not (out / "checkpoints" / "state.json").exists():
        run_one("cgfedllm_linear16-s0", f"configs/{CONFIG}.yaml", [*PROFILE, *overrides, "seed=0"], out, threads=2,
                stop_after=TGAP - 1)
    maps = list(load_file(str(out / "checkpoints" / "server.safetensors"))["maps"])
    held = max(1, round(0.2 * len(maps)))
    train, heldout = maps[:-held], maps[-held:]
    result = {"maps": len(maps), "map_shape": list(maps[0].shape), "heldout": held, "source": "b1_cpu cgfedllm_linear16 "
              f"seed 0, rounds 1-{TGAP - 1} of TGAP", "machine": machine(), "codecs": {}}
    torch.set_num_threads(1)
    for ratio in (16, 64):
        torch.manual_seed(0)
        ae = BlockLinearAutoencoder(256, ratio)
        t0 = time.time()
        log = train_autoencoder(ae, train, epochs=400, lr=3e-3, batch=8, heldout=heldout, patience=30)
        cos = {"autoencoder": autoencoder_cosine(ae, heldout)}
        cos |= gate_baselines(train, heldout, ae.encode(maps[0]).numel(), block=256)
        result["codecs"][f"1/{ratio}"] = {"epochs_run": len(log.train_loss), "best_epoch": log.best_epoch,
                                          "seconds": round(time.time() - t0), "cosine": cos}
        say(f"1/{ratio}: {cos}")
    path = RESULTS / "pilots" / "cg_gate_offline.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# CG-FedLLM's codecs on the same TGAP maps (B1-cpu, seed 0)", "",
             f"{result['maps']} factor maps ({result['map_shape'][0]} x {result['map_shape'][1]}) from {result['source']};"
             f" linear autoencoders fitted to the oldest {result['maps'] - held} (Adam, lr 3e-3, at most 400 epochs, "
             f"early stopping on the newest {held}); mean cosine on those {held} held-out maps, each codec sending as "
             "many values as the autoencoder's latent (top-k: positions not counted). "
             "`python benchmarks/pilot_cg_gate.py`.", "",
             "| size | autoencoder (epochs, best) | random projection + least squares | block PCA | top-k | zero |",
             "|---|---|---|---|---|---|"]
    for size, c in result["codecs"].items():
        k = c["cosine"]
        lines.append(f"| {size} | {k['autoencoder']:.3f} ({c['epochs_run']}, {c['best_epoch']}) | "
                     f"{k['random_projection']:.3f} | {k['block_pca']:.3f} | {k['topk']:.3f} | 0 |")
    lines += ["", f"Machine: {result['machine']}.", ""]
    (RESULTS / "pilots" / "cg_gate_offline.md").write_text("\n".join(lines))
    say("\n".join(lines))


if __name__ == "__main__":
    main()
