"""The demo's automatic latency budget names its members by size and says which one is faster."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from nas.demo import _auto_budget


@pytest.mark.parametrize("small, large, faster", [(1.0, 4.0, "smallest-size"), (4.0, 1.0, "largest-size")])
def test_auto_budget_is_the_geometric_mean_and_says_which_member_is_faster(small, large, faster):
    space = SimpleNamespace(smallest=lambda: "s", largest=lambda: "l")
    latency = {"s": small, "l": large}
    scorer = SimpleNamespace(score=lambda arch: SimpleNamespace(latency_ms=latency[arch]))
    lines = []
    assert math.isclose(_auto_budget(space, scorer, lines.append), 2.0)
    assert f"(the {faster} one is faster)" in lines[0] and "smallest member" not in lines[0]
