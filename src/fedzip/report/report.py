"""Read run directories (the contract: summary.json, metrics.jsonl) and compare them."""

from __future__ import annotations

import base64
import html
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from fedzip.errors import RunDirError
from fedzip.report.links import Link, cumulative_seconds
from fedzip.report.targets import cumulative_bytes, first_reaching, fixed_subset_curve, reference_target
from fedzip.rundir import RunDir


@dataclass
class Run:
    path: Path
    label: str
    summary: dict
    rows: list[dict]

    def curve(self, metric: str) -> tuple[list[int], list[float], list[float]]:
        """(rounds, cumulative MB up+down, metric) at the rounds where the metric was evaluated."""
        rounds, mb, values, total = [], [], [], 0
        for r in self.rows:
            total += r["bytes_up"] + r["bytes_down"]
            if r.get(metric) is not None:
                rounds.append(r["round"])
                mb.append(total / 1e6)
                values.append(r[metric])
        return rounds, mb, values


def load_run(path: Path) -> Run:
    run = RunDir(path)
    if not run.metrics.exists():
        raise RunDirError(f"{run.path} is not a run directory (no metrics.jsonl)")
    summary = run.read_summary() if run.finished() else {"method": "?", "final_metrics": {}}
    return Run(path=run.path, label=f"{run.path.name}", summary=summary, rows=run.rows())


def primary_metric(runs: list[Run]) -> str:
    for m in ("accuracy", "loss"):
        if any(m in r for run in runs for r in run.rows):
            return m
    return "loss"


def table_rows(runs: list[Run], comparison: "Comparison | None" = None) -> list[dict]:
    out = []
    for run in runs:
        fm = run.summary.get("final_metrics", {})
        up = sum(r["bytes_up"] for r in run.rows)
        down = sum(r["bytes_down"] for r in run.rows)
        row = {"run": run.label, "method": run.summary.get("method", "?"), "rounds": len(run.rows),
               "accuracy": fm.get("accuracy"), "macro_f1": fm.get("macro_f1"), "loss": fm.get("loss"),
               "MB up": up / 1e6, "MB down": down / 1e6, "wall s": run.summary.get("wall_seconds")}
        out.append(row | (comparison.columns(run) if comparison else {}))
    return out


@dataclass
class Comparison:
    """Columns that judge each run against a reference run's smoothed target, in bytes and in link time.

    Without a reference, the link columns give each run's whole time over each link instead."""

    reference: Run | None
    links: list[Link]
    window: int = 3
    drop: float = 0.01

    def __post_init__(self):
        self.metric = primary_metric([self.reference]) if self.reference else None
        self.higher = self.metric == "accuracy"
        self.target = None
        if self.reference:
            curve = fixed_subset_curve(self.reference.rows, self.metric)
            if not curve:
                raise RunDirError(f"{self.reference.path}: no {self.metric} evaluations to take a target from")
            self.target = reference_target(curve, self.window, self.drop, self.higher)

    def describe(self) -> str:
        if self.target is None:
            return ""
        return (f"target: {self.metric} {self.target:.4f} ({self.reference.label} smoothed over {self.window} "
                f"evaluations, {self.drop:g} {'below' if self.higher else 'above'})")

    def columns(self, run: Run) -> dict:
        rundir = RunDir(run.path)
        ledger = rundir.ledger_rows() if rundir.ledger.exists() and self.links else []
        # a round's time over a link needs each client's compute: a DP run keeps it in the server's own rows
        rows = rundir.server_rows() if self.links else run.rows
        times = {link.name: cumulative_seconds(rows, ledger, link) for link in self.links}
        if self.target is None:
            return {f"h ({name})": (t[max(t)] / 3600 if t else None) for name, t in times.items()}
        reached = first_reaching(fixed_subset_curve(run.rows, self.metric), self.target, self.window, self.higher)
        cols = {"round to target": reached,
                "MB to target": sum(cumulative_bytes(run.rows, reached)) / 1e6 if reached else None}
        cols |= {f"h to target ({name})": (t[reached] / 3600 if reached else None) for name, t in times.items()}
        return cols


def warning_lines(runs: list[Run]) -> list[str]:
    """What the runs flagged while going on (summary.json ``warnings``), one line each."""
    return [f"{run.label}: {w}" for run in runs for w in run.summary.get("warnings", [])]


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) and abs(v) < 10 else (f"{v:,.1f}" if isinstance(v, float) else str(v))


def print_table(dirs: list[Path], comparison: Comparison | None = None) -> None:
    """The comparison table on the terminal (with the target line when there is a reference)."""
    from rich.console import Console
    from rich.table import Table

    runs = [load_run(d) for d in dirs]
    rows = table_rows(runs, comparison)
    t = Table(title="fedzip runs")
    for col in rows[0]:
        t.add_column(col, justify="left" if col in ("run", "method") else "right")
    for r in rows:
        t.add_row(*(_fmt(v) for v in r.values()))
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # piped output: do not squeeze columns to 80
    console.print(t)
    if comparison and comparison.describe():
        console.print(comparison.describe())
    for line in warning_lines(runs):
        console.print(f"[yellow]warning[/yellow] {line}", highlight=False)


def markdown_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot_runs(runs: list[Run], out_dir: Path, metric: str | None = None, title: str = "") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = metric or primary_metric(runs)
    paths = []
    for xkey, xlabel, fname in (("round", "round", f"{metric}_vs_round.png"),
                                ("mb", "cumulative MB (up + down)", f"{metric}_vs_mb.png")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        for run in runs:
            rounds, mb, values = run.curve(metric)
            if values:
                ax.plot(rounds if xkey == "round" else mb, values, marker="o", ms=3, label=run.label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        if xkey == "mb":
            ax.set_xscale("log")
        ax.set_title(title or f"{metric} vs {xlabel}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(dirs: list[Path], out_dir: Path, comparison: Comparison | None = None) -> Path:
    runs = [load_run(d) for d in dirs]
    out_dir.mkdir(parents=True, exist_ok=True)
    if importlib.util.find_spec("matplotlib") is not None:
        pngs, note = plot_runs(runs, out_dir), ""
    else:  # plots are an optional extra; the table alone is still a report
        pngs, note = [], "<p>Plots need matplotlib: pip install 'fedzip[report]'.</p>"
    rows = table_rows(runs, comparison)
    if comparison and comparison.describe():
        note = f"<p>{html.escape(comparison.describe())}</p>" + note
    note = "".join(f"<p><b>warning</b> {html.escape(w)}</p>" for w in warning_lines(runs)) + note
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r.values()) + "</tr>" for r in rows)
    imgs = "".join(f'<img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
                   for p in pngs)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>fedzip report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:4px 8px;text-align:right}}img{{max-width:48%;margin:1%}}</style></head><body>
<h1>fedzip report</h1><table><tr>{head}</tr>{body}</table>{imgs}{note}</body></html>"""
    path = RunDir(out_dir).report
    path.write_text(page, encoding="utf-8")
    return path
