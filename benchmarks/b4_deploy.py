"""B4 deployment row: the B1 smoke profile in-process and on Flower (a SuperLink and SuperNodes on this machine).

Same config and seed both ways: reports seconds per round, bytes up/down, and whether the ledgers and
the final adapters are identical. Writes ``results/b4_deploy.json`` and ``results/b4_deploy.md``.

    python benchmarks/b4_deploy.py [--nodes 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from b1_fedit import PROFILES  # noqa: E402
from common import RESULTS, ROOT, machine  # noqa: E402

RUNS = [
    ("fedit_fp32", ["method=fedit"]),
    ("flasc_1_16", ["method=flasc", "method_options={server_optimizer: sgd, server_lr: 1.0, weighting: samples, "
                    "d_dl: 0.0625, d_ul: 0.0625}"]),
]


def summarise(run_dir: Path) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"wall_seconds": round(s["wall_seconds"], 1),
            "seconds_per_round": round(sum(r["round_s"] for r in rows) / len(rows), 2),
            "bytes_up_total": s["bytes_up_total"], "bytes_down_total": s["bytes_down_total"],
            "final_metrics": s["final_metrics"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("FEDZIP_DATA", str((ROOT.parent.parent / "shared" / "data").resolve()))
    from safetensors.torch import load_file

    from fedzip.config import load_config
    from fedzip.deploy.local import LocalFederation
    from fedzip.engine import run_experiment

    base = ROOT / "runs" / "b4_deploy"
    if base.exists():
        shutil.rmtree(base)
    results = []
    for label, overrides in RUNS:
        ov = PROFILES["smoke"] + ["train.threads=1"] + overrides
        print(f"[{label}] in-process", flush=True)
        sim = Path(run_experiment(load_config("b1_fedit", ov), base / f"{label}-inprocess", progress=False)["run_dir"])
        print(f"[{label}] Flower, {args.nodes} SuperNodes", flush=True)
        out = base / f"{label}-flower"
        t0 = time.time()
        with LocalFederation(base / f"{label}-flower-home", args.nodes) as fed:
            fed.wait_for_run(fed.submit("b1_fedit", ov, out), out)
        if not (out / "summary.json").exists():
            raise SystemExit(f"[{label}] the Flower run failed; see {base / f'{label}-flower-home'}")
        a = load_file(str(sim / "adapter" / "adapter_model.safetensors"))
        b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
        results.append({
            "label": label, "profile": "smoke", "machine": machine(), "nodes": args.nodes,
            "in_process": summarise(sim), "flower": summarise(out) | {"submit_to_end_s": round(time.time() - t0, 1)},
            "ledger_identical": (sim / "ledger.jsonl").read_text() == (out / "ledger.jsonl").read_text(),
            "adapter_identical": a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a),
        })
    (RESULTS / "b4_deploy.json").write_text(json.dumps({"benchmark": "b4_deploy", "runs": results}, indent=1) + "\n")
    lines = ["# B4: deployment on Flower vs in-process (B1 smoke profile, same config and seed)", "",
             f"Machine: {results[0]['machine']}; {args.nodes} SuperNodes, SuperLink and ServerApp on the same machine.", "",
             "| run | s/round in-process | s/round Flower | MB up (in-process / Flower) | MB down (in-process / Flower) "
             "| ledger identical | adapter identical |", "|---|---|---|---|---|---|---|"]
    for r in results:
        i, f = r["in_process"], r["flower"]
        lines.append(f"| {r['label']} | {i['seconds_per_round']:.1f} | {f['seconds_per_round']:.1f} | "
                     f"{i['bytes_up_total'] / 1e6:.3f} / {f['bytes_up_total'] / 1e6:.3f} | "
                     f"{i['bytes_down_total'] / 1e6:.3f} / {f['bytes_down_total'] / 1e6:.3f} | "
                     f"{'yes' if r['ledger_identical'] else 'NO'} | {'yes' if r['adapter_identical'] else 'NO'} |")
    lines += ["", "Flower's extra seconds per round are mostly each ClientApp message starting a fresh process that "
              "loads the model and data (Flower 1.41 runs one ClientApp process per message); the bytes are the same "
              "because the same encoded payloads travel.", ""]
    (RESULTS / "b4_deploy.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
