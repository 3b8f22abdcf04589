"""Pareto maths against brute force on small random sets full of ties and duplicates."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nas.pareto import best_under_budget, hypervolume, pareto_front, pareto_ranks


def dominates(p, q, senses) -> bool:
    no_worse = all(a >= b if s == "max" else a <= b for a, b, s in zip(p, q, senses, strict=True))
    return no_worse and tuple(p) != tuple(q)


def brute_ranks(points, senses):
    """Peel fronts by the definition: rank k = not dominated once ranks < k are removed."""
    remaining = {i for i, p in enumerate(points) if None not in p}
    ranks, rank = [None] * len(points), 0
    while remaining:
        front = {i for i in remaining if not any(dominates(points[j], points[i], senses) for j in remaining)}
        for i in front:
            ranks[i] = rank
        remaining -= front
        rank += 1
    return ranks


def constrained_dominates(i, j, points, senses, violation) -> bool:
    """Optuna's constrained domination (NSGA-II's `_constrained_dominates`), written out."""
    if violation[i] <= 0 and violation[j] <= 0:
        return dominates(points[i], points[j], senses)
    if violation[i] <= 0 or violation[j] <= 0:
        return violation[i] <= 0
    return violation[i] < violation[j]


@st.composite
def point_sets(draw, with_none=True):
    """Up to 25 points of 1-3 objectives, values in 0..3 (so many ties and duplicates), mixed senses."""
    m = draw(st.integers(1, 3))
    senses = tuple(draw(st.lists(st.sampled_from(["max", "min"]), min_size=m, max_size=m)))
    value = st.sampled_from([0, 1, 2, 3, None]) if with_none else st.integers(0, 3)
    points = draw(st.lists(st.tuples(*[value] * m), max_size=25))
    return points, senses


@settings(max_examples=300, deadline=None)
@given(point_sets())
def test_ranks_match_brute_force(case):
    points, senses = case
    assert pareto_ranks(points, senses) == brute_ranks(points, senses)


@settings(max_examples=200, deadline=None)
@given(point_sets())
def test_front_is_rank_zero(case):
    points, senses = case
    assert pareto_front(points, senses) == [i for i, r in enumerate(brute_ranks(points, senses)) if r == 0]


def test_duplicates_share_the_front_and_nan_is_left_out():
    points = [(1, 2), (1, 2), (0, 3), (math.nan, 0), (None, 1), (2, 5)]
    assert pareto_ranks(points, ("max", "min")) == [0, 0, 1, None, None, 0]
    assert pareto_front(points, ("max", "min")) == [0, 1, 5]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="senses"):
        pareto_ranks([(1, 2)], ("max", "up"))
    with pytest.raises(ValueError, match="2 objectives"):
        pareto_ranks([(1, 2), (1,)], ("max", "min"))


@settings(max_examples=200, deadline=None)
@given(point_sets(with_none=False), st.data())
def test_constrained_front_matches_optuna_definition(case, data):
    points, senses = case
    violation = data.draw(st.lists(st.sampled_from([0, 0, 0.5, 1, 2]), min_size=len(points), max_size=len(points)))
    expected = [i for i in range(len(points))
                if not any(constrained_dominates(j, i, points, senses, violation) for j in range(len(points)))]
    assert pareto_front(points, senses, violation=violation) == expected
    feasible = [v == 0 for v in violation]
    binary = [0 if ok else 1 for ok in feasible]
    expected = [i for i in range(len(points))
                if not any(constrained_dominates(j, i, points, senses, binary) for j in range(len(points)))]
    assert pareto_front(points, senses, feasible=feasible) == expected


def test_constrained_front_cases():
    points = [(0.9, 10), (0.8, 5), (0.7, 1), (0.95, 20)]
    # feasible points beat every infeasible one, however good
    assert pareto_front(points, ("max", "min"), feasible=[False, True, True, False]) == [1, 2]
    # none feasible: least violation wins, objectives ignored
    assert pareto_front(points, ("max", "min"), violation=[3, 1, 1, 2]) == [1, 2]
    with pytest.raises(ValueError):
        pareto_front(points, ("max", "min"), feasible=[True] * 4, violation=[0] * 4)


def brute_hypervolume(points, senses, reference) -> int:
    """Count the unit cells of the integer grid that lie between some point and the reference."""

    def between(c, p, r, sense):
        return r < c < p if sense == "max" else p < c < r

    coords = [[reference[k], *(p[k] for p in points)] for k in range(2)]
    cells = itertools.product(*(range(min(c), max(c)) for c in coords))
    return sum(
        any(all(between(c + 0.5, p[k], reference[k], senses[k]) for k, c in enumerate(cell)) for p in points)
        for cell in cells
    )


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), max_size=12),
       st.tuples(st.sampled_from(["max", "min"]), st.sampled_from(["max", "min"])),
       st.tuples(st.integers(0, 6), st.integers(0, 6)))
def test_hypervolume_matches_grid_count(points, senses, reference):
    assert hypervolume(points, senses, reference) == brute_hypervolume(points, senses, reference)


def test_hypervolume_cases():
    assert hypervolume([(0.8, 2.0), (0.6, 1.0)], ("max", "min"), (0.0, 4.0)) == pytest.approx(0.8 * 2 + 0.6 * 1)
    assert hypervolume([(1, 5)], ("max", "min"), (0, 4)) == 0  # worse than the reference on latency
    assert hypervolume([(None, 1), (math.nan, 1)], ("max", "min"), (0, 4)) == 0
    with pytest.raises(ValueError, match="2 objectives"):
        hypervolume([(1, 2, 3)], ("max", "min", "min"), (0, 0, 0))


def test_best_under_budget():
    acc = [0.7, 0.9, 0.9, 0.9, 0.8, None, 0.99]
    lat = [1.0, 5.0, 3.0, 3.0, 2.0, 0.1, math.nan]
    assert best_under_budget(acc, lat, 4.0) == 2  # ties on accuracy: faster, then earlier
    assert best_under_budget(acc, lat, 3.0) == 2  # the budget is inclusive
    assert best_under_budget(acc, lat, 2.9) == 4
    assert best_under_budget(acc, lat, math.inf) == 2
    assert best_under_budget(acc, lat, 0.5) is None  # nothing fits (the None/NaN rows never count)
    assert best_under_budget([], [], 1.0) is None

