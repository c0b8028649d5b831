"""The leaderboard: every method against a reference over several seeds, with error bars.

Input: compact run results (:mod:`fedzip.report.compact`), several seeds per label. Each seed is judged
against the reference run *of the same seed* (same partition, client sampling and initialisation): its
target is that run's smoothed final value minus one point (accuracy) or plus 0.01 (loss), as in
``benchmarks/PROTOCOL.md``. Per label the board gives the mean and sample standard deviation over seeds
of the final metric, of bytes and link time to target, and of the bytes ratio against the reference;
runs that never reach their target are counted, never averaged in.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict

from fedzip.report.targets import cumulative_bytes, first_reaching, fixed_subset_curve, smoothed, tail_gain


def mean_std(values: list[float]) -> dict | None:
    """Mean and sample standard deviation (0 for a single value), or None for no values."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def primary_metric(records: list[dict]) -> tuple[str, bool]:
    """(metric, higher is better): accuracy where the runs have it, else loss."""
    if any("accuracy" in p for r in records for p in r["curve"]):
        return "accuracy", True
    return "loss", False


def judge(run: dict, reference: dict, metric: str, higher: bool, window: int, drop: float) -> dict:
    """One seed's run against the same seed's reference: round, bytes and link time to the target."""
    ref_curve = fixed_subset_curve(reference["curve"], metric)
    final = smoothed(ref_curve, window)[-1][1]
    target = final - drop if higher else final + drop
    reached = first_reaching(fixed_subset_curve(run["curve"], metric), target, window, higher)
    out = {"seed": run["seed"], "target": target, "round_to_target": reached}
    if reached is not None:
        up, down = cumulative_bytes(run["curve"], reached)
        at = [p["round"] for p in run["curve"]].index(reached)
        out |= {"bytes_up_to_target": up, "bytes_down_to_target": down,
                "seconds_to_target": {name: secs[at] for name, secs in run["link_seconds"].items()}}
    return out


def build_leaderboard(records: list[dict], reference: str, window: int = 3, drop: float = 0.01) -> dict:
    """Rows per label (reference first), from compact results; ``reference`` is the reference's label."""
    metric, higher = primary_metric(records)
    by_label: dict[str, dict[int, dict]] = defaultdict(dict)
    for r in records:
        by_label[r["label"]][r["seed"]] = r  # one result per (label, seed)
    if reference not in by_label:
        raise ValueError(f"no runs of the reference {reference!r} among labels {sorted(by_label)}")
    refs = by_label[reference]
    ref_judged = {s: judge(r, r, metric, higher, window, drop) for s, r in refs.items()}
    rows = []
    for label in [reference] + sorted(set(by_label) - {reference}):
        runs = by_label[label]
        seeds = sorted(runs)
        judged = [judge(runs[s], refs[s], metric, higher, window, drop) for s in seeds if s in refs]
        hit = [j for j in judged if j["round_to_target"] is not None]
        ratios = []
        for j in judged:
            j["bytes_ratio"] = None  # the reference's bytes to target over this run's, for a seed that reached it
        for j in hit:
            ref = ref_judged[j["seed"]]
            ref_bytes = ref["bytes_up_to_target"] + ref["bytes_down_to_target"]
            j["bytes_ratio"] = ref_bytes / (j["bytes_up_to_target"] + j["bytes_down_to_target"])
            ratios.append(j["bytes_ratio"])
        curves = [fixed_subset_curve(runs[s]["curve"], metric) for s in seeds]
        first = runs[seeds[0]]
        links = list(first["link_seconds"])
        rows.append({
            "label": label, "method": first["method"], "seeds": seeds,
            f"final_{metric}": mean_std([runs[s]["final_metrics"].get(metric) for s in seeds]),
            f"smoothed_final_{metric}": mean_std([smoothed(c, window)[-1][1] for c in curves if c]),
            "plateau_gain_last_20pct": mean_std([tail_gain(c, window) for c in curves if len(c) > 1]),
            "plateau_gain_by_seed": {s: tail_gain(c, window) for s, c in zip(seeds, curves) if len(c) > 1},
            "reached": f"{len(hit)}/{len(judged)}",
            "round_to_target": mean_std([j["round_to_target"] for j in hit]),
            "mb_up_to_target": mean_std([j["bytes_up_to_target"] / 1e6 for j in hit]),
            "mb_down_to_target": mean_std([j["bytes_down_to_target"] / 1e6 for j in hit]),
            "bytes_ratio_vs_reference": mean_std(ratios),
            "hours_to_target": {name: mean_std([j["seconds_to_target"][name] / 3600 for j in hit]) for name in links},
            "mb_up_total": mean_std([runs[s]["bytes_up_total"] / 1e6 for s in seeds]),
            "mb_down_total": mean_std([runs[s]["bytes_down_total"] / 1e6 for s in seeds]),
            "client_peak_rss_mb": max((runs[s]["client_peak_rss_bytes"] / 1e6 for s in seeds
                                       if runs[s].get("client_peak_rss_bytes")), default=None),
            "client_cuda_peak_mb": max((runs[s]["client_cuda_peak_bytes"] / 1e6 for s in seeds
                                        if runs[s].get("client_cuda_peak_bytes")), default=None),
            "client_step_s": mean_std([runs[s].get("client_step_s") for s in seeds]),
            "wall_s": mean_std([runs[s]["wall_seconds"] for s in seeds]),
            "machines": sorted({runs[s]["machine"] for s in seeds}),
            "warnings": [f"seed {s}, {w}" for s in seeds for w in runs[s].get("warnings", [])],
            "per_seed": judged,
        })
    formats = Counter(r.get("wire_format", "FZP1") for r in records)  # runs from before the key sent FZP1
    return {"metric": metric, "higher_is_better": higher, "reference": reference, "window": window, "drop": drop,
            "links": links, "rows": rows, "wire_formats": dict(sorted(formats.items())),
            "code_commits": sorted({r.get("code_commit") or "not recorded" for r in records})}


# What changed between wire formats, for a page whose runs mix them: bytes compare only within one format.
WIRE_FORMAT_NOTES = {"FZP1": "the header as plain JSON", "FZP2": "the header zstd-compressed: a FedIT message is "
                                                                  "about 0.5% smaller than in FZP1"}


def provenance_lines(board: dict) -> list[str]:
    """What produced the board's runs: a warning when they mix wire formats, and the code commits."""
    formats = board.get("wire_formats") or {}
    lines = []
    if len(formats) > 1:
        lines += ["", "**The runs on this board mix wire formats**: " + ", ".join(
            f"{n} run(s) {f} ({WIRE_FORMAT_NOTES.get(f, 'unknown')})" for f, n in formats.items()) +
            ". Accuracy does not depend on the format; bytes do, so compare bytes within one format."]
    commits = board.get("code_commits") or []
    if commits:
        lines += ["", "Code: " + ", ".join(f"`{c[:12]}`" if c != "not recorded" else c for c in commits) +
                  " (each compact result's `code_commit`; results from before it was recorded say \"not recorded\")."]
    return lines


def mean_std_text(v: dict | None, fmt: str = ".3f", scale: float = 1.0) -> str:
    """``mean_std``'s result as "mean ± std" in table cells ("-" for none)."""
    if not v:
        return "-"
    return f"{v['mean'] * scale:{fmt}} ± {v['std'] * scale:{fmt.lstrip('+')}}"


def leaderboard_markdown(board: dict) -> list[str]:
    """The board as a markdown table (one row per label) and a line stating the target."""
    m = board["metric"]
    head = ["method", "seeds", f"final {m}", f"smoothed {m} (subset)", "last-20% gain", "reached",
            "MB up to target", "MB down to target", f"bytes vs {board['reference']}"]
    head += [f"h to target ({name})" for name in board["links"]] + ["MB up / down, whole run", "client peak RSS MB",
                                                                    "client step s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in board["rows"]:
        ratio = r["bytes_ratio_vs_reference"]
        cells = [r["label"], str(len(r["seeds"])), mean_std_text(r[f"final_{m}"]), mean_std_text(r[f"smoothed_final_{m}"]),
                 mean_std_text(r["plateau_gain_last_20pct"], "+.3f"), r["reached"], mean_std_text(r["mb_up_to_target"], ".1f"),
                 mean_std_text(r["mb_down_to_target"], ".1f"),
                 f"{ratio['mean']:.2f}x ± {ratio['std']:.2f}" if ratio else "-"]
        cells += [mean_std_text(r["hours_to_target"][name], ".2f") for name in board["links"]]
        cells += [f"{r['mb_up_total']['mean']:.1f} / {r['mb_down_total']['mean']:.1f}",
                  f"{r['client_peak_rss_mb']:.0f}" if r["client_peak_rss_mb"] else "-",
                  mean_std_text(r["client_step_s"], ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    warned = [f"- **{r['label']}** {w}" for r in board["rows"] for w in r.get("warnings", [])]
    if warned:
        lines += ["", "Warnings raised by these runs (they went on anyway):", *warned]
    return lines + provenance_lines(board)


def leaderboard_figure(board: dict, records: list[dict], path, title: str = "") -> None:
    """Smoothed curves (mean over seeds, band = one std) against rounds and against total MB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metric, window = board["metric"], board["window"]
    fig, (by_round, by_mb) = plt.subplots(1, 2, figsize=(13, 4.6), dpi=110)
    for i, row in enumerate(board["rows"]):
        runs = [r for r in records if r["label"] == row["label"]]
        curves = [smoothed(fixed_subset_curve(r["curve"], metric), window) for r in runs]
        common = sorted(set.intersection(*(set(x for x, _ in c) for c in curves))) if curves else []
        if not common:
            continue
        values = np.array([[dict(c)[x] for x in common] for c in curves])
        mb = np.array([[sum(cumulative_bytes(r["curve"], x)) / 1e6 for x in common] for r in runs]).mean(axis=0)
        mean, std = values.mean(axis=0), values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(len(common))
        colour = plt.get_cmap("tab10")(i % 10)
        for ax, xs in ((by_round, common), (by_mb, mb)):
            ax.plot(xs, mean, color=colour, label=f"{row['label']} (n={len(runs)})", linestyle="-" if i < 10 else "--")
            ax.fill_between(xs, mean - std, mean + std, color=colour, alpha=0.15)
    for ax, xlabel in ((by_round, "round"), (by_mb, "cumulative MB (up + down)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{metric}, smoothed over {window} evaluations")
        ax.grid(alpha=0.3)
    by_mb.set_xscale("log")
    by_round.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
