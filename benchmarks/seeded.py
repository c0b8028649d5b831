"""Seeded benchmarks under protocol v2: rows x seeds of one profile, each finished run kept as a compact result.

A benchmark is a config, a profile (overrides every row shares) and rows (label, overrides, what the row
is). Each (row, seed) is an ordinary ``fedzip run`` into ``benchmarks/runs/<bench>/cpu/<label>-s<seed>``
(not committed); when it finishes, its compact result goes to ``results/runs/<bench>/<label>-s<seed>.json``
and, with ``--commit``, into git at once. A (row, seed) whose compact result exists is skipped and an
interrupted run resumes from its checkpoint, so a benchmark accumulates across sessions and machines.

Order: the reference rows' seeds first (every other row is judged against them), then seed by seed across
the other rows, so that a partial benchmark has every row on its first seeds rather than some on all.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from common import RESULTS, ROOT, bench_threads, run_one, say

from fedzip.report.compact import compact_run, load_compact

GIT = threading.Lock()  # parallel runs finish at any time; one commit at a time


@dataclass
class SeededBenchmark:
    name: str  # results/runs/<name>/
    config: str  # a packaged config name, e.g. "b1_fedit"
    profile: list[str]  # overrides every row shares
    rows: list[tuple[str, list[str], str]]  # (label, overrides, what the row is)
    references: list[str] = field(default_factory=list)  # labels that run first (default: the first row)
    results_dir: Path | None = None  # where compact results go (default: results/runs/<name>)
    seeds_of: dict[str, list[int]] = field(default_factory=dict)  # a row run on these seeds only (default: all)

    @property
    def what(self) -> dict[str, str]:
        return {label: what for label, _, what in self.rows}

    @property
    def compact_dir(self) -> Path:
        return self.results_dir or RESULTS / "runs" / self.name

    def compact_path(self, label: str, seed: int) -> Path:
        return self.compact_dir / f"{label}-s{seed}.json"

    def records(self, labels: set[str] | None = None) -> list[dict]:
        """The compact results written so far (of ``labels`` only, when given)."""
        records = [load_compact(p) for p in sorted(self.compact_dir.glob("*.json"))]
        return [r for r in records if labels is None or r["label"] in labels]

    def run_and_keep(self, label: str, overrides: list[str], seed: int, threads: int, commit: bool) -> None:
        """Train one (label, seed), write its compact result, and commit it when asked."""
        out = ROOT / "runs" / self.name / "cpu" / f"{label}-s{seed}"
        run_one(f"{label}-s{seed}", f"configs/{self.config}.yaml", [*self.profile, *overrides, f"seed={seed}"],
                out, threads)
        result = compact_run(out, label)
        on_gpu = str(result.get("device", "cpu")).startswith("cuda")  # train.device=auto takes a lent GPU
        result |= {"what": self.what[label], "benchmark": self.name, "profile": "gpu" if on_gpu else "cpu"}
        path = self.compact_path(label, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=None, separators=(",", ":")) + "\n")
        say(f"[{label}-s{seed}] compact result: "
            f"{path.relative_to(ROOT.parent) if path.is_relative_to(ROOT.parent) else path}")
        if commit:
            with GIT:
                commit_file(path, f"{self.name}: {label} seed {seed} finished (compact result)")

    def todo(self, seeds: list[int], only: set[str]) -> list[tuple[str, list[str], int]]:
        first = self.references or [self.rows[0][0]]
        todo = [(label, ov, s) for label, ov, _ in self.rows if label in first for s in seeds]
        todo += [(label, ov, s) for s in seeds for label, ov, _ in self.rows if label not in first]
        return [t for t in todo if (not only or t[0] in only) and t[2] in self.seeds_of.get(t[0], seeds)
                and not self.compact_path(t[0], t[2]).exists()]

    def run(self, seeds: list[int], only: set[str], jobs: int, commit: bool) -> list[str]:
        """Every (row, seed) not done yet, ``jobs`` at a time; returns the names of the runs that failed."""
        todo = self.todo(seeds, only)
        threads = bench_threads(jobs)
        say(f"{len(todo)} run(s) to do, {jobs} at a time, {threads} thread(s) each")
        failed = []
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(self.run_and_keep, label, ov, s, threads, commit): f"{label}-s{s}"
                       for label, ov, s in todo}
            for f, name in futures.items():
                try:
                    f.result()
                except RuntimeError as exc:  # one failed run is reported; the others go on
                    say(str(exc))
                    failed.append(name)
        return failed

    def main(self, description: str, write_board, modes: dict | None = None) -> None:
        """The command line every seeded benchmark shares; ``write_board()`` rebuilds its results page.

        ``modes`` adds flags of the benchmark's own: ``{"--flag": (help, run(commit, seeds))}``; one of them given
        runs it instead of the rows (with ``--seeds``, for a mode that has seeds), then rebuilds the page."""
        ap = argparse.ArgumentParser(description=description)
        for flag, (text, _) in (modes or {}).items():
            ap.add_argument(flag, action="store_true", help=text)
        ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
        ap.add_argument("--only", default="", help="comma-separated labels (default: all): " + ", ".join(self.what))
        ap.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each by default")
        ap.add_argument("--commit", action="store_true", help="git-commit each compact result as its run finishes")
        ap.add_argument("--board", action="store_true", help="only rebuild the results page")
        args = ap.parse_args()
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s]
        except ValueError:
            ap.error(f"--seeds: comma-separated integers, got {args.seeds!r}")
        only = {x for x in args.only.split(",") if x}
        if only - set(self.what):
            ap.error(f"unknown label(s): {', '.join(sorted(only - set(self.what)))}; known: {', '.join(self.what)}")
        chosen = [run for flag, (_, run) in (modes or {}).items() if getattr(args, flag.lstrip("-").replace("-", "_"))]
        if chosen:
            chosen[0](args.commit, seeds)
            failed = []
        else:
            failed = [] if args.board else self.run(seeds, only, args.jobs, args.commit)
        write_board()
        if failed:
            raise SystemExit(f"error: {len(failed)} run(s) failed: {', '.join(failed)}")


def by_seed(records: list[dict], label: str) -> dict[int, dict]:
    return {r["seed"]: r for r in records if r["label"] == label}


def paired_values(records: list[dict], a: str, b: str, value) -> list[tuple[float, float]]:
    """Per seed both rows have, in seed order: (``value`` of a's record, of b's), where neither is None."""
    ra, rb = by_seed(records, a), by_seed(records, b)
    pairs = [(value(ra[seed]), value(rb[seed])) for seed in sorted(set(ra) & set(rb))]
    return [(va, vb) for va, vb in pairs if va is not None and vb is not None]


def ratio_verdict(row: dict, claim: float, seeds: int = 3) -> str:
    """Whether "FedIT's accuracy with ``claim``x fewer bytes" holds for a leaderboard row, seed by seed."""
    judged = row["per_seed"]
    ratios = [j.get("bytes_ratio") for j in judged]
    hit = [r for r in ratios if r is not None]
    if len(judged) < seeds:  # what the seeds so far say, without calling it a verdict
        so_far = f"{sum(r >= claim for r in hit)} of {len(judged)} at >= {claim:g}x"
        return f"provisional ({len(judged)} of {seeds} seeds): {so_far}" + (
            f", lowest {min(hit):.1f}x, mean {sum(hit) / len(hit):.1f}x" if hit else "")
    if len(hit) < len(judged):
        return f"does not hold: reaches the target on {len(hit)} of {len(judged)} seeds"
    low = min(hit)
    mean = sum(hit) / len(hit)
    if low >= claim:
        return f"holds on every seed (lowest {low:.1f}x, mean {mean:.1f}x)"
    if mean >= claim:
        return f"holds on average ({mean:.1f}x) but not on every seed (lowest {low:.1f}x)"
    return f"does not hold: {mean:.1f}x on average, {low:.1f}x at worst"


def verdict(diffs: list[float], need: int = 3, unit: str = "points", fmt: str = "+.1f") -> str:
    """Seed-by-seed differences in the row's favour (positive: ahead). With at least ``need`` seeds, ``holds``:
    ahead on every seed; ``does not hold``: not ahead on the mean; else ``not shown``. Fewer: provisional."""
    from fedzip.report.leaderboard import mean_std, mean_std_text

    if not diffs:
        return "not measured yet"
    ahead = sum(d > 0 for d in diffs)
    text = f"{mean_std_text(mean_std(diffs), fmt)} {unit} over {len(diffs)} seed(s), ahead on {ahead}"
    if len(diffs) < need:
        return f"provisional ({text})"
    if sum(diffs) <= 0:
        return f"**does not hold** ({text})"
    return f"{'**holds**' if ahead == len(diffs) else 'not shown'} ({text})"


def figure_lines(board: dict, records: list[dict], name: str, title: str, alt: str) -> list[str]:
    """Draw the board's figure to ``results/<name>`` and return its markdown line (none without matplotlib)."""
    from fedzip.report.leaderboard import leaderboard_figure

    try:
        leaderboard_figure(board, records, RESULTS / name, title)
    except ImportError:
        say("matplotlib missing: no figure (pip install 'fedzip[report]')")
        return []
    return [f"![{alt}]({name})", ""]


def commit_file(path: Path, message: str) -> None:
    """A failed commit (e.g. someone else holds the index lock) leaves the file for a later commit."""
    for cmd in (["git", "add", str(path)], ["git", "commit", "-q", "-m", message, "--", str(path)]):
        if subprocess.run(cmd, cwd=ROOT.parent).returncode != 0:
            say(f"could not commit {path.name}; it is written, commit it by hand")
            return
