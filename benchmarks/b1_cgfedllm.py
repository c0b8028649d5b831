"""B1 CG-FedLLM vs FedIT and top-k sparsification at a matched uplink (20 Newsgroups, MiniLM + LoRA r=16).

Every run shares B1's data, model, partition and seed (``configs/b1_fedit.yaml``). CG-FedLLM spends its
first rounds on TGAP (FedIT on 30% of each client's data, uncompressed) and the rest on FAF (encoded
uploads, dense broadcast). The top-k references upload about as little: FLASC with a dense download and
1/64 upload density (top-k alone), and FLASC at 1/64 both ways (B1 FLASC's run, reused). Writes
``results/b1_cgfedllm.json`` (the ``b1_fedit.json`` schema plus ``uplink_ratio_vs_fedit``, ``snr_db`` and
``fedit_accuracy_at_equal_bytes``), ``results/b1_cgfedllm.md`` and ``results/b1_cgfedllm_<profile>.png``.

    python benchmarks/b1_cgfedllm.py --profile smoke|medium|full
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from b1_fedit import PROFILES  # noqa: E402  (the same sizes and FedIT reference)
from b1_fedit import RUNS as FEDIT_RUNS
from b1_flasc import RUNS as FLASC_RUNS  # noqa: E402
from b1_flasc import flasc
from common import RESULTS, accuracy_figure, collect, merge_results, profile_sections, run_profile  # noqa: E402

# TGAP takes about a fifth of the rounds, as in the paper's schedule; the autoencoder trains on every map.
TGAP = {"smoke": "tgap_rounds: 1, ae_epochs: 3", "medium": "tgap_rounds: 3, ae_epochs: 30",
        "full": "tgap_rounds: 5, ae_epochs: 30"}


def runs_for(profile: str) -> list[tuple]:
    cg = lambda opts: ["method=cgfedllm", f"method_options={{{TGAP[profile]}, {opts}}}"]  # noqa: E731
    return [
        ("fedit_fp32", dict(FEDIT_RUNS)["fedit_fp32"], "b1_fedit/fedit_fp32"),
        ("cgfedllm_conv64", cg("autoencoder: conv")),
        ("cgfedllm_linear16", cg("autoencoder: linear, linear_ratio: 16")),
        ("topk_ul_1_64", flasc(1.0, 1 / 64)),
        ("flasc_1_64", next(ov for label, ov, *_ in FLASC_RUNS if label == "flasc_1_64"), "b1_flasc/flasc_1_64"),
    ]


def total_bytes(point: dict) -> int:
    return point["cum_bytes_up"] + point["cum_bytes_down"]


def accuracy_at_bytes(run: dict, budget: int, metric: str = "accuracy") -> float | None:
    """The run's ``metric`` with ``budget`` total bytes: linear between its evaluated rounds, its final value
    past its last one (it got there with fewer bytes), None before its first evaluated round."""
    pts = [(total_bytes(p), p[metric]) for p in run["curve"] if metric in p]
    if pts and budget >= pts[-1][0]:
        return pts[-1][1]
    for (b0, a0), (b1, a1) in zip(pts, pts[1:]):
        if b0 <= budget <= b1:
            return a0 + (a1 - a0) * (budget - b0) / (b1 - b0)
    return None


def main() -> None:
    profile, runs, dirs = run_profile("b1_cgfedllm", "b1_fedit", PROFILES, runs_for)
    results = [collect(dirs[label], profile, label) for label, *_ in runs]
    ref = next(r for r in results if r["label"] == "fedit_fp32")
    ref_up = {p["round"]: p["bytes_up"] for p in ref["curve"]}
    for r, (label, *_) in zip(results, runs):
        rows = [json.loads(x) for x in (dirs[label] / "metrics.jsonl").read_text().splitlines() if x.strip()]
        faf = [row for row in rows if "snr_db" in row]
        r["snr_db"] = [{"round": row["round"], "snr_db": row["snr_db"], "snr_paper": row["snr_paper"],
                        "cosine": row["cosine"]} for row in faf]
        # Uplink ratio over the rounds that compress (FAF for CG-FedLLM, all rounds for the others).
        rounds = {row["round"] for row in faf} or {p["round"] for p in r["curve"]}
        up = sum(p["bytes_up"] for p in r["curve"] if p["round"] in rounds)
        base = sum(ref_up.get(t, 0) for t in rounds)
        r["uplink_ratio_vs_fedit"] = up / base if base else None
        r["fedit_accuracy_at_equal_bytes"] = accuracy_at_bytes(ref, r["bytes_up_total"] + r["bytes_down_total"])
        method = json.loads((dirs[label] / "method.json").read_text()) if (dirs[label] / "method.json").exists() else {}
        r["encoder_params"] = method.get("encoder_params")
    data = merge_results(RESULTS / "b1_cgfedllm.json", results)
    write_outputs(data)


def write_outputs(data: dict) -> None:
    lines = ["# B1: CG-FedLLM vs FedIT and top-k (20 Newsgroups, MiniLM + LoRA r=16, 100 clients, Dirichlet 0.1)", ""]
    columns = ["run", "accuracy", "FedIT accuracy with the same total bytes", "MB up", "MB down",
               "uplink vs FedIT (compressed rounds)", "mean SNR dB", "mean cosine"]
    for profile, runs, header in profile_sections(data["runs"], columns):
        lines += header
        for r in runs:
            snr = r.get("snr_db") or []
            mean = lambda k: f"{sum(s[k] for s in snr) / len(snr):.3f}" if snr else "-"  # noqa: E731
            eq = r.get("fedit_accuracy_at_equal_bytes")
            ratio = r.get("uplink_ratio_vs_fedit")
            lines.append(f"| {r['label']} | {r['final_metrics'].get('accuracy', float('nan')):.4f} | "
                         f"{'-' if eq is None else f'{eq:.4f}'} | {r['bytes_up_total'] / 1e6:.2f} | "
                         f"{r['bytes_down_total'] / 1e6:.2f} | {'-' if ratio is None else f'1/{1 / ratio:.1f}'} | "
                         f"{mean('snr_db')} | {mean('cosine')} |")
        lines.append("")
        lines += accuracy_figure(runs, f"b1_cgfedllm_{profile}", f"B1 CG-FedLLM vs FedIT and top-k, {profile}")
    lines += ["FedIT's accuracy with the same total bytes (up + down) is read off its accuracy-vs-bytes curve: linear",
              "between evaluated rounds, its final accuracy past its last round, '-' before its first evaluation.",
              "CG-FedLLM's broadcast is dense and each client receives the encoder once, so downloads dominate its",
              "total. The trained classification head travels dense in every method.", ""]
    (RESULTS / "b1_cgfedllm.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
