"""B3: CG-FedLLM vs FedIT on instruction tuning (SmolLM2-135M-Instruct + LoRA, Alpaca-format, 10 clients).

Reports held-out loss (and FedIT's at the same total bytes), uplink bytes, reconstruction SNR per round
(both definitions), one-time encoder size and C-Eval (val) accuracy. Writes ``results/b3_cgfedllm.json``
(the ``b1_fedit.json`` schema plus ``uplink_ratio_vs_fedit``, ``snr_db`` and ``fedit_loss_at_equal_bytes``),
``results/b3_cgfedllm.md`` and ``results/b3_cgfedllm_<profile>.png``.

    python benchmarks/b3_cgfedllm.py --profile smoke|medium|full

``medium`` is the CPU-sized run (10 rounds of 3 clients x 5 steps, C-Eval on 3 questions per subject, held-out
loss on the whole test split at rounds 5 and 10); ``full`` is the 20-round set-up of the config.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from b1_cgfedllm import accuracy_at_bytes  # noqa: E402
from common import RESULTS, collect, merge_results, profile_sections, run_profile  # noqa: E402

PROFILES = {
    "smoke": ["rounds=4", "clients_per_round=2", "train.max_steps=2", "data.max_test_examples=40",
              "eval.ceval_max_per_subject=1"],
    "medium": ["rounds=10", "clients_per_round=3", "train.max_steps=5", "eval.every=5",
               "eval.ceval_max_per_subject=3"],
    "full": [],
}
TGAP = {"smoke": "tgap_rounds: 2, ae_epochs: 3", "medium": "tgap_rounds: 3, ae_epochs: 30",
        "full": "tgap_rounds: 6, ae_epochs: 30"}


def runs_for(profile: str) -> list[tuple[str, list[str]]]:
    t = TGAP[profile]
    return [
        ("fedit", ["method=fedit"]),
        ("cgfedllm_conv64", ["method=cgfedllm", f"method_options={{{t}, autoencoder: conv}}"]),
        # The paper's map is 17% padding on SmolLM2; packing the factors makes the latent exactly 1/64.
        ("cgfedllm_conv64_packed", ["method=cgfedllm",
                                    f"method_options={{{t}, autoencoder: conv, map_layout: packed}}"]),
        ("cgfedllm_linear64", ["method=cgfedllm", f"method_options={{{t}, autoencoder: linear, linear_ratio: 64}}"]),
        ("cgfedllm_linear16", ["method=cgfedllm", f"method_options={{{t}, autoencoder: linear, linear_ratio: 16}}"]),
    ]


def main() -> None:
    profile, runs, dirs = run_profile("b3_cgfedllm", "b3_cgfedllm", PROFILES, runs_for)
    results = [collect(dirs[label], profile, label) for label, *_ in runs]
    ref = next(r for r in results if r["label"] == "fedit")
    for r, (label, *_) in zip(results, runs):
        rows = [json.loads(x) for x in (dirs[label] / "metrics.jsonl").read_text().splitlines() if x.strip()]
        faf = [row for row in rows if "snr_db" in row]
        r["snr_db"] = [{"round": row["round"], "snr_db": row["snr_db"], "snr_paper": row["snr_paper"],
                        "cosine": row["cosine"]} for row in faf]
        faf_rounds = {row["round"] for row in faf}
        up = [p["bytes_up"] for p in r["curve"] if p["round"] in faf_rounds]
        ref_up = [p["bytes_up"] for p in ref["curve"] if p["round"] in faf_rounds]
        r["uplink_ratio_vs_fedit"] = (sum(up) / sum(ref_up)) if up and ref_up else None
        r["fedit_loss_at_equal_bytes"] = accuracy_at_bytes(ref, r["bytes_up_total"] + r["bytes_down_total"], "loss")
        method = json.loads((dirs[label] / "method.json").read_text())
        for key in ("encoder_params", "map_shape", "map_padding", "latent_values", "lora_values"):
            r[key] = method.get(key)
    data = merge_results(RESULTS / "b3_cgfedllm.json", results)
    write_outputs(data)


def write_outputs(data: dict) -> None:
    lines = ["# B3: CG-FedLLM vs FedIT (SmolLM2-135M-Instruct + LoRA r=8, Alpaca-format, 10 clients)", ""]
    columns = ["run", "held-out loss", "FedIT loss with the same total bytes", "C-Eval val", "MB up", "MB down",
               "uplink vs FedIT (FAF rounds)", "LoRA values / latent", "encoder (sent once a client)",
               "mean SNR dB", "mean paper SNR", "mean cosine"]
    for profile, sel, header in profile_sections(data["runs"], columns):
        lines += header
        for r in sel:
            fm, snr = r["final_metrics"], r.get("snr_db") or []
            mean = lambda k, f=".3f": f"{sum(s[k] for s in snr) / len(snr):{f}}" if snr else "-"  # noqa: E731
            ratio = r.get("uplink_ratio_vs_fedit")
            eq = r.get("fedit_loss_at_equal_bytes")
            latent = f"{r['lora_values'] / r['latent_values']:.1f}" if r.get("latent_values") else "-"
            enc = f"{r['encoder_params']:,} values" if r.get("encoder_params") else "-"
            lines.append(f"| {r['label']} | {fm.get('loss', float('nan')):.4f} | {'-' if eq is None else f'{eq:.4f}'} | "
                         f"{fm.get('ceval_accuracy', float('nan')):.3f} | {r['bytes_up_total'] / 1e6:.2f} | "
                         f"{r['bytes_down_total'] / 1e6:.2f} | {'-' if not ratio else f'1/{1 / ratio:.1f}'} | "
                         f"{latent} | {enc} | {mean('snr_db')} | {mean('snr_paper', '.3g')} | {mean('cosine')} |")
        lines += ["", *figure(sel, profile)]
    lines += ["FedIT's loss with the same total bytes (up + down) is read off its loss-vs-bytes curve (linear between",
              "evaluated rounds, its final loss past its last one, '-' before its first evaluation). The uplink ratio",
              "is over the FAF rounds, whole messages (headers and the normalisation scale included). SNR in dB is",
              "10 log10(||G||^2 / ||G - G~||^2) (0 dB: the error is as large as the update); the paper's SNR is",
              "||G||^2 / (||G - G~||^2 / n), which grows with the n entries of the map.", ""]
    (RESULTS / "b3_cgfedllm.md").write_text("\n".join(lines))


def figure(runs: list[dict], profile: str) -> list[str]:
    """Held-out loss against cumulative uplink MB, and reconstruction SNR (dB) per FAF round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_snr) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for i, r in enumerate(runs):  # one colour per run in both panels
        pts = [p for p in r["curve"] if "loss" in p]
        ax_loss.plot([p["cum_bytes_up"] / 1e6 for p in pts], [p["loss"] for p in pts], marker="o", ms=3,
                     color=f"C{i}", label=r["label"])
        if r.get("snr_db"):
            ax_snr.plot([s["round"] for s in r["snr_db"]], [s["snr_db"] for s in r["snr_db"]], marker="o", ms=3,
                        color=f"C{i}", label=r["label"])
    ax_loss.set(xlabel="cumulative uplink MB", ylabel="held-out loss", xscale="log")
    ax_snr.set(xlabel="round (FAF)", ylabel="reconstruction SNR (dB)")
    ax_snr.xaxis.get_major_locator().set_params(integer=True)
    for ax in (ax_loss, ax_snr):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"B3 CG-FedLLM vs FedIT, {profile} ({runs[0]['machine']})", fontsize=9)
    fig.tight_layout()
    name = f"b3_cgfedllm_{profile}.png"
    fig.savefig(RESULTS / name)
    plt.close(fig)
    return [f"![held-out loss vs uplink MB, and SNR per round]({name})", ""]


if __name__ == "__main__":
    main()
