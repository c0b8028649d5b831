"""How a method is judged against its reference: smoothed curves, a target, and what reaching it costs.

A single evaluation is noisy (a FedIT curve on B1 swings by several points between evaluations), so
every judgement is taken on a trailing moving average over ``window`` evaluations, and only over the
evaluations made on the same fixed subset (the engine's last round uses the whole test split, a different
set, and is left out of curves). The target is the reference's smoothed final value minus ``drop``; a
run reaches it at the first evaluation whose smoothed value is at least that good.
"""

from __future__ import annotations

from collections import Counter

Curve = list[tuple[int, float]]  # (round, metric value) at evaluated rounds, in round order


def fixed_subset_curve(rows: list[dict], metric: str) -> Curve:
    """The metric at every evaluation made on the run's usual evaluation set (its most common size).

    The last round's evaluation on the whole test split is another set; the engine also evaluates that
    round on the fixed subset (``fixed_subset`` in its row), and the curve takes that one."""
    points = {}  # round -> (examples, value); an evaluation of the row itself wins over its fixed_subset
    for r in rows:
        for ev in (r.get("fixed_subset"), r):
            if isinstance(ev, dict) and ev.get(metric) is not None:
                points.setdefault(r["round"], []).append((ev.get("eval_examples"), float(ev[metric])))
    if not points:
        return []
    usual = Counter(n for evs in points.values() for n, _ in evs).most_common(1)[0][0]
    curve = []
    for rnd in sorted(points):
        same = [v for n, v in points[rnd] if n == usual]
        if same:
            curve.append((rnd, same[-1]))
    return curve


def smoothed(curve: Curve, window: int = 3) -> Curve:
    """Trailing mean over the last ``window`` evaluations (fewer at the start)."""
    out = []
    for i, (rnd, _) in enumerate(curve):
        part = [v for _, v in curve[max(0, i - window + 1) : i + 1]]
        out.append((rnd, sum(part) / len(part)))
    return out


def reference_target(curve: Curve, window: int = 3, drop: float = 0.01, higher_is_better: bool = True) -> float:
    """The reference's smoothed final value, ``drop`` worse (accuracy: minus; loss: plus)."""
    if not curve:
        raise ValueError("the reference run has no evaluations on its fixed subset")
    final = smoothed(curve, window)[-1][1]
    return final - drop if higher_is_better else final + drop


def first_reaching(curve: Curve, target: float, window: int = 3, higher_is_better: bool = True) -> int | None:
    """The first round whose smoothed value reaches ``target``; None if the run never does."""
    for rnd, value in smoothed(curve, window):
        if (value >= target) if higher_is_better else (value <= target):
            return rnd
    return None


def tail_gain(curve: Curve, window: int = 3, tail: float = 0.2) -> float:
    """How much the smoothed curve moved over the last ``tail`` share of its rounds (plateau: small)."""
    smooth = smoothed(curve, window)
    if len(smooth) < 2:
        raise ValueError("a plateau needs at least two evaluations")
    last_round = smooth[-1][0]
    start = min(smooth, key=lambda p: abs(p[0] - (1 - tail) * last_round))
    return smooth[-1][1] - start[1]


def cumulative_bytes(rows: list[dict], through_round: int) -> tuple[int, int]:
    """Bytes up and down of every round up to and including ``through_round``."""
    done = [r for r in rows if r["round"] <= through_round]
    return sum(r["bytes_up"] for r in done), sum(r["bytes_down"] for r in done)
