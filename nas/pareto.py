"""Pareto maths: non-dominated sorting, fronts, hypervolume, the pick under a budget.

Pure numpy, no MLflow or Optuna, and below both search and tracking, so the campaign, the MLflow
tags, the dashboard and the benchmarks agree on one definition. Objectives come with senses
(``"max"`` or ``"min"``); internally everything is turned into minimisation. A point with a missing (None) or NaN objective takes part in nothing: its rank
is None and it is never on a front.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Sense = str  # "max" | "min"


def _minimised(points: Sequence[Sequence[float | None]], senses: Sequence[Sense]) -> np.ndarray:
    """An (n, m) float array to minimise: max columns negated, None as NaN."""
    if any(s not in ("max", "min") for s in senses):
        raise ValueError(f"senses must be 'max' or 'min', got {list(senses)}")
    if any(len(p) != len(senses) for p in points):
        raise ValueError(f"every point needs {len(senses)} objectives, one per sense")
    x = np.array([[math.nan if v is None else v for v in p] for p in points], dtype=float)
    return x.reshape(len(points), len(senses)) * np.array([-1.0 if s == "max" else 1.0 for s in senses])


def _dominance(x: np.ndarray) -> np.ndarray:
    """``d[i, j]``: point i dominates point j (no worse everywhere, better somewhere). O(n² m)."""
    n = len(x)
    no_worse, better = np.ones((n, n), bool), np.zeros((n, n), bool)
    for col in x.T:
        no_worse &= col[:, None] <= col[None, :]
        better |= col[:, None] < col[None, :]
    return no_worse & better


def pareto_ranks(points: Sequence[Sequence[float | None]], senses: Sequence[Sense]) -> list[int | None]:
    """Non-dominated sorting rank of every point: 0 is the front, 1 the front once it is removed, ...

    Equal points do not dominate each other, so duplicates share a rank. Points with a None/NaN
    objective get None.
    """
    x = _minimised(points, senses)
    idx = np.flatnonzero(~np.isnan(x).any(axis=1))
    dom = _dominance(x[idx])
    dominators = dom.sum(axis=0)
    ranks = np.full(len(idx), -1)
    current, rank = np.flatnonzero(dominators == 0), 0
    while current.size:
        ranks[current] = rank
        dominators -= dom[current].sum(axis=0)
        dominators[current] = -1  # never picked again
        current, rank = np.flatnonzero(dominators == 0), rank + 1
    out: list[int | None] = [None] * len(points)
    for i, r in zip(idx, ranks, strict=True):
        out[i] = int(r)
    return out


def pareto_front(
    points: Sequence[Sequence[float | None]],
    senses: Sequence[Sense],
    feasible: Sequence[bool] | None = None,
    violation: Sequence[float] | None = None,
) -> list[int]:
    """Indices of the non-dominated points, in input order.

    With ``feasible`` (a mask) or ``violation`` (total constraint violation per point, 0 when
    feasible, as Optuna sums its positive constraint values), the constrained front as Optuna
    defines it: feasible points dominate infeasible ones, two infeasible points compare by
    violation only (less wins). So if any point is feasible, the front is that of the feasible
    points; otherwise it is the infeasible points of least violation.
    """
    if feasible is not None and violation is not None:
        raise ValueError("give feasible or violation, not both")
    if feasible is not None:
        violation = [0.0 if ok else 1.0 for ok in feasible]
    ranks = pareto_ranks(points, senses)
    if violation is None:
        return [i for i, r in enumerate(ranks) if r == 0]
    if len(violation) != len(points):
        raise ValueError(f"{len(violation)} constraint values for {len(points)} points")
    valid = [i for i, r in enumerate(ranks) if r is not None]
    ok = [i for i in valid if violation[i] <= 0]
    if ok:
        sub = pareto_ranks([points[i] for i in ok], senses)
        return [i for i, r in zip(ok, sub, strict=True) if r == 0]
    least = min((violation[i] for i in valid), default=None)
    return [i for i in valid if violation[i] == least]


def hypervolume(
    points: Sequence[Sequence[float | None]], senses: Sequence[Sense], reference: Sequence[float]
) -> float:
    """Area dominated by the points and bounded by ``reference`` (two objectives, exact sweep).

    Points that do not strictly beat the reference on both objectives add nothing.
    """
    if len(senses) != 2 or len(reference) != 2:
        raise ValueError("hypervolume is implemented for exactly 2 objectives")
    x = _minimised(points, senses)
    ref = _minimised([reference], senses)[0]
    x = x[(x < ref).all(axis=1)]  # NaN compares False: dropped too
    area, y_best = 0.0, ref[1]
    for px, py in sorted(map(tuple, x)):  # by the first objective, then the second
        if py < y_best:
            area += (ref[0] - px) * (y_best - py)
            y_best = py
    return float(area)


def best_under_budget(
    acc: Sequence[float | None], latency: Sequence[float | None], budget: float
) -> int | None:
    """Index of the most accurate point with ``latency <= budget`` (ties: faster, then earlier); None if none fits.

    Points with a missing or NaN value are skipped; ``budget=math.inf`` means no budget.
    """
    best, best_key = None, None
    for i, (a, t) in enumerate(zip(acc, latency, strict=True)):
        if a is None or t is None or math.isnan(a) or math.isnan(t) or t > budget:
            continue
        key = (a, -t)
        if best_key is None or key > best_key:
            best, best_key = i, key
    return best
