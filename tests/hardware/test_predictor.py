"""Latency predictor: parts cover a space, the table builds and resumes, prediction is the sum of
interpolated parts plus the fitted overhead, and tables from another machine are refused."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml
from torch import nn

import nas.hardware.latency_table as build_module
from nas.cli import main
from nas.errors import UserError
from nas.hardware.fingerprint import fingerprint
from nas.hardware.latency_table import build_table, grid_points
from nas.hardware.measure import measure
from nas.hardware.parts import PoolPart, decompose, space_parts
from nas.hardware.predictor import LatencyPredictor, LatencyTable, Overhead, fit_overhead, interpolate
from nas.hardware.target import Target
from nas.space import load_space, space_from_dict
from nas.supernet import blocks
from nas.supernet.subnet import VitnasSubnet

TARGET = Target.parse("cpu:threads=1,batch=2")
TINY = {
    "name": "tiny",
    "image_size": 8,
    "patch_size": 2,
    "in_chans": 3,
    "num_classes": 3,
    "stages": [
        {"dim": [8], "heads": [2], "mlp_ratio": [2.0], "attention": ["softmax", "linear"], "depth": [1, 2],
         "cells": ["basic", "share"], "reduction": {"kind": ["none", "tome"], "r": [2]}},
        {"tokens": [5], "pool": ["avg", "conv1d"], "dim": [16], "heads": [2], "depth": [1, 2],
         "cells": ["basic", "share"], "reduction": {"kind": ["none", "evit"], "keep_rate": [0.5], "at": [0]}},
    ],
}  # fmt: skip
OVERHEAD = Overhead(constant_ms=0.5, scale=2.0)
BUILD = dict(budget_s=0.005, fit_subnets=4, passes=1, progress=False)


@pytest.fixture(scope="module")
def tiny():
    return space_from_dict(TINY, "tiny")


class CountingMeasure:
    """The real ``measure``, counted; raises KeyboardInterrupt at call ``stop_at`` (an interrupted build)."""

    def __init__(self, stop_at: int | None = None):
        self.calls, self.stop_at = 0, stop_at

    def __call__(self, *args, **kwargs):
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        self.calls += 1
        return measure(*args, **kwargs)


def measurements(table: LatencyTable) -> int:
    parts = sum(len(v) for points in table.parts.values() for v in points.values())
    return parts + sum(len(s["measured_ms"]) for s in table.subnets.values())


# -- parts --------------------------------------------------------------------------------------
def test_space_parts_cover_every_member():
    space = load_space("psvit-digits")
    needed = space_parts(space)
    for seed in range(300):
        for part, n in decompose(space.sample(seed)):
            assert n in needed[part], (part.key, n)


def test_parts_chain_into_the_subnet(tiny):
    """Each part takes what the part before it gives, and the chain ends in logits, as the subnet does."""
    for seed in range(6):
        arch = tiny.sample(seed)
        parts = decompose(arch)
        assert sum(1 for p, _ in parts if type(p).__name__ == "CellPart") == sum(s.depth for s in arch.stages)
        chain = nn.Sequential(*(part.module(n)[0] for part, n in parts)).eval()
        x = torch.randn(2, 3, 8, 8)
        with torch.inference_mode():
            assert chain(x).shape == VitnasSubnet(arch).eval()(x).shape == (2, 3)


def test_pools_enter_with_the_tokens_the_subnet_pools(monkeypatch):
    """A positional pool after an in-stage reduction reads the restored positions, any other pool
    the reduced tokens: the parts say what the subnet runs."""
    space = load_space("psvit-digits")
    seen, real = [], blocks.pool_forward
    monkeypatch.setattr(
        blocks,
        "pool_forward",
        lambda kind, p, x, out: seen.append((kind, x.shape[1])) or real(kind, p, x, out),
    )
    reducing = set()
    for seed in range(40):
        arch, seen[:] = space.sample(seed), []
        with torch.inference_mode():
            VitnasSubnet(arch).eval()(torch.randn(1, 3, 32, 32))
        assert seen == [(p.kind, n) for p, n in decompose(arch) if isinstance(p, PoolPart)]
        reducing |= {
            (st.pool, prev.tokens != prev.exit_tokens) for prev, st in zip(arch.stages, arch.stages[1:])
        }
    assert {("conv1d", True), ("avg", True), ("tome", True)} <= reducing  # the cases that differ were drawn


def test_grid_points_keep_both_ends():
    assert grid_points({5, 9}, 4) == [5, 9]
    grid = grid_points(set(range(5, 34)), 4)
    assert len(grid) == 4 and grid[0] == 5 and grid[-1] == 33


# -- interpolation and prediction on synthetic tables --------------------------------------------
def test_interpolation_exact_at_grid_points_and_linear_between():
    table = {10: 1.0, 20: 3.0, 40: 4.0}
    for n, ms in table.items():
        assert interpolate(table, n) == ms
    assert interpolate(table, 15) == pytest.approx(2.0)
    assert interpolate(table, 30) == pytest.approx(3.5)
    assert interpolate(table, 45) == pytest.approx(4.25)  # extrapolated from the last segment
    assert interpolate(table, 0) == 0.0  # extrapolated below zero: clamped
    assert interpolate({7: 2.5}, 99) == 2.5


def cost_per_10_tokens(arch) -> dict[str, float]:
    """A known price for each distinct part of ``arch``: 1, 2, 3 ... ms per 10 tokens."""
    keys = sorted({part.key for part, _ in decompose(arch)})
    return {key: i + 1.0 for i, key in enumerate(keys)}


def synthetic_table(arch, overhead: Overhead | None = OVERHEAD, fp: dict | None = None) -> LatencyTable:
    """Each part of ``arch`` on a grid of n - 1 and n + 1 tokens around each count it sees, linear in n;
    three passes each, the median the price."""
    price = cost_per_10_tokens(arch)
    parts: dict[str, dict[int, float]] = {}
    for part, n in decompose(arch):
        grid = {m: price[part.key] * m / 10 for m in (n - 1, n + 1)}
        parts.setdefault(part.key, {}).update({m: [3 * ms, ms, 0.5 * ms] for m, ms in grid.items()})
    return LatencyTable(
        space={"name": "tiny", "hash": "x", "source": "test"},
        target=TARGET.key(),
        fingerprint=fp or fingerprint(TARGET).to_dict(),
        budget_s=0.01,
        parts=parts,
        overhead=overhead,
    )


def test_prediction_is_sum_of_parts_plus_overhead(tiny):
    for arch in (tiny.largest(), tiny.smallest(), tiny.sample(3)):
        parts, price = decompose(arch), cost_per_10_tokens(arch)
        expected_sum = sum(price[part.key] * n / 10 for part, n in parts)  # the grid points straddle n
        predicted = LatencyPredictor(synthetic_table(arch)).predict(arch)
        assert predicted == pytest.approx(0.5 + 2.0 * expected_sum)


def test_fit_overhead_recovers_a_line_despite_an_outlier():
    sums = [1.0, 2.0, 3.5, 1.7, 2.2, 2.9]
    measured = [0.3 + 1.2 * s for s in sums]
    fitted = fit_overhead(sums, measured)
    assert (fitted.constant_ms, fitted.scale) == (pytest.approx(0.3), pytest.approx(1.2))
    measured[2] *= 3  # one subnet measured while the machine was busy
    robust = fit_overhead(sums, measured)
    assert (robust.constant_ms, robust.scale) == (pytest.approx(0.3), pytest.approx(1.2))
    few = fit_overhead([1.0, 2.0], [1.5, 2.5])
    assert (few.constant_ms, few.scale) == (0.0, pytest.approx(1.375))
    falling = fit_overhead([1.0, 1.1, 1.2], [1.3, 1.2, 0.5])  # noise over a narrow range: no line
    assert (falling.constant_ms, falling.scale) == (0.0, pytest.approx(1.2 / 1.1))  # the median ratio
    assert fit_overhead([], []) == Overhead()


def test_unknown_part_is_a_user_error(tiny):
    table = synthetic_table(tiny.smallest())
    with pytest.raises(UserError, match="has no part"):
        LatencyPredictor(table).predict(load_space("psvit-digits").largest())


# -- fingerprints ---------------------------------------------------------------------------------
def test_table_from_another_machine_refused_unless_forced(tiny, tmp_path):
    here = fingerprint(TARGET)
    other = dataclasses.replace(here, cpu_model="Some Other CPU")
    path = tmp_path / "table.json"
    synthetic_table(tiny.largest(), fp=other.to_dict()).save(path)
    with pytest.raises(UserError) as err:
        LatencyPredictor.load(path, expect=here, target=TARGET)
    message = str(err.value)
    assert other.digest() in message and here.digest() in message and "\n" not in message
    with pytest.warns(UserWarning, match=other.digest()):
        forced = LatencyPredictor.load(path, expect=here, target=TARGET, force=True)
    assert forced.fingerprint == other
    with pytest.raises(UserError, match="built for target"):
        LatencyPredictor.load(path, expect=other, target=Target.parse("cpu:threads=1,batch=1"))


def test_interrupted_table_is_refused(tiny, tmp_path):
    path = tmp_path / "table.json"
    synthetic_table(tiny.largest(), overhead=None).save(path)
    with pytest.raises(UserError, match="incomplete"):
        LatencyPredictor.load(path, expect=fingerprint(TARGET), target=TARGET)


# -- building on real parts ---------------------------------------------------------------------
def test_build_resumes_after_interruption(tiny, tmp_path, monkeypatch):
    path = tmp_path / "table.json"
    total = sum(len(grid_points(ns)) for ns in space_parts(tiny).values()) + BUILD["fit_subnets"]

    def build(stop_at: int | None = None, **kwargs) -> CountingMeasure:
        counter = CountingMeasure(stop_at)
        monkeypatch.setattr(build_module, "measure", counter)
        build_table(tiny, TARGET, path, **{**BUILD, **kwargs})
        return counter

    with pytest.raises(KeyboardInterrupt):
        build(stop_at=7)
    assert measurements(LatencyTable.load(path)) == 7  # written on the way out
    assert build().calls == total - 7
    table = LatencyTable.load(path)
    assert measurements(table) == total and len(table.subnets) == BUILD["fit_subnets"]
    assert table.overhead is not None
    assert build().calls == 0  # complete: nothing to measure, the overhead refitted
    assert build(passes=2).calls == total  # a second pass over every point
    assert measurements(LatencyTable.load(path)) == 2 * total

    predictor = LatencyPredictor.load(path, expect=fingerprint(TARGET), target=TARGET)
    assert predictor.fingerprint == fingerprint(TARGET)
    for seed in range(10):
        assert predictor.predict(tiny.sample(seed)) > 0
    assert build(force=True).calls == total


def test_build_refuses_a_table_for_something_else(tiny, tmp_path):
    path = tmp_path / "table.json"
    synthetic_table(tiny.largest(), fp=dataclasses.replace(fingerprint(TARGET), cores=999).to_dict()).save(
        path
    )
    before = json.loads(path.read_text())
    with pytest.raises(UserError, match="--force"):
        build_table(tiny, TARGET, path, **BUILD)
    assert json.loads(path.read_text()) == before


def test_cli_builds_and_resumes(tmp_path, capsys):
    space_file, out = tmp_path / "tiny.yaml", tmp_path / "table.json"
    space_file.write_text(yaml.safe_dump(TINY))
    argv = ["latency-table", "build", "--space", str(space_file), "--target", "cpu:threads=1,batch=2",
            "--out", str(out), "--passes", "1", "--budget-s", "0.005", "--fit-subnets", "4", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert str(out) in first and "0 kept" in first
    assert main(argv) == 0
    assert "(0 measured now" in capsys.readouterr().out
    LatencyPredictor.load(out, expect=fingerprint(TARGET), target=TARGET)
