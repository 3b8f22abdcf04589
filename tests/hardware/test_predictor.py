"""Latency predictor: parts cover a space, the table builds and resumes, prediction is the sum of
interpolated parts plus the fitted overhead, and tables from another machine are refused."""

from __future__ import annotations

import dataclasses
import json
import random
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn

import nas.hardware.latency_table as build_module
from nas.cli import main
from nas.errors import UserError
from nas.hardware.fingerprint import fingerprint
from nas.hardware.latency_table import (
    AGREE_TOL,
    EXTRA_PASS_SHARE,
    GRID_POINTS,
    LINEAR_TOL,
    MIN_PASSES,
    build_table,
    grid_points,
    part_grid,
    wants_pass,
)
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
    onnx = dataclasses.replace(TARGET, backend="onnxruntime")  # a table is per backend too
    with pytest.raises(UserError, match="built for target"):
        LatencyPredictor.load(path, expect=here, target=onnx, force=True)


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


@pytest.mark.slow
def test_a_table_built_on_a_deployment_runtime_predicts_for_that_runtime_only(tiny, tmp_path):
    """Every part is exported and timed by ONNX Runtime as whole candidates are; the table serves
    that backend's target and no other."""
    onnx_target = Target.parse("cpu:threads=1,batch=2,backend=onnxruntime")
    path = tmp_path / "table.json"
    report = build_table(tiny, onnx_target, path, **{**BUILD, "fit_subnets": 2})
    table = report.table
    points = sum(len(grid_points(ns)) for ns in space_parts(tiny).values())
    assert measurements(table) == points + 2 and table.target == onnx_target.key()
    assert fingerprint(onnx_target).runtime.startswith("onnxruntime ")
    predictor = LatencyPredictor.load(path, expect=fingerprint(onnx_target), target=onnx_target)
    assert all(predictor.predict(tiny.sample(seed)) > 0 for seed in range(6))
    with pytest.raises(UserError, match="built for target"):
        LatencyPredictor.load(path, expect=fingerprint(onnx_target), target=TARGET, force=True)


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
    assert "measurements (0 now," in capsys.readouterr().out
    LatencyPredictor.load(out, expect=fingerprint(TARGET), target=TARGET)


# -- fewer points where the prediction does not need them; an honest ETA --------------------------
def test_a_part_gets_its_quarter_points_only_when_its_middle_is_off_the_line():
    counts = set(range(9, 34))  # grid: 9, 21, 33; quarters 15 and 27
    assert part_grid(counts, {}) == [9, 21, 33]
    near_line = {9: [1.0], 21: [2.0 * (1 + LINEAR_TOL / 2)], 33: [3.0]}
    assert part_grid(counts, near_line) == [9, 21, 33]
    curved = {9: [1.0], 21: [2.0 * (1 + 2 * LINEAR_TOL)], 33: [3.0]}
    assert part_grid(counts, curved) == [9, 15, 21, 27, 33]
    assert part_grid(counts, {**near_line, 12: [1.2]}) == [9, 12, 21, 33]  # a point measured stays measured
    assert part_grid({5, 9}, {}) == [5, 9]


def test_a_later_pass_measures_only_points_whose_passes_disagree():
    assert [wants_pass([], i) for i in range(3)] == [True, True, True]
    assert not wants_pass([1.0], 0)  # pass 0 is done (a resumed build)
    assert wants_pass([1.0], 1)
    agree, disagree = [1.0, 1.0 + AGREE_TOL / 2], [1.0, 1.0 + 2 * AGREE_TOL]
    assert not wants_pass(agree, MIN_PASSES) and wants_pass(disagree, MIN_PASSES)
    assert not wants_pass([1.0, 2.0, 1.5], MIN_PASSES)  # has its third


def test_build_adds_a_third_pass_only_where_the_first_two_disagree(tiny, tmp_path, monkeypatch):
    flips = random.Random(0)

    def scripted_measure(module, target, *, input_shape, **kwargs):
        # parts entered by 17 tokens take 1 or 2 ms at random; everything else the same every time
        size = sum(p.numel() for p in module.parameters()) / 1000
        return SimpleNamespace(median_ms=flips.choice([1.0, 2.0]) if input_shape[1] == 17 else size)

    monkeypatch.setattr(build_module, "measure", scripted_measure)
    table = build_table(tiny, TARGET, tmp_path / "table.json", **{**BUILD, "passes": 3}).table
    for points in table.parts.values():
        for ms in points.values():
            assert len(ms) == (3 if ms[0] != ms[1] else 2)
    assert any(len(ms) == 3 for points in table.parts.values() for ms in points.values())
    assert all(len(s["measured_ms"]) == 2 for s in table.subnets.values())  # whole subnets agree


def test_eta_is_the_mean_time_per_kind_times_the_jobs_left(tiny, monkeypatch):
    monkeypatch.setattr(build_module, "ETA_REPLAN_S", 0.0)  # re-estimate the later passes after every job
    part, arch = next(iter(space_parts(tiny))), tiny.largest()
    progress = build_module._Progress(budget_s=0.1)  # enabled: a disabled tqdm counts nothing
    later = {"part": 100.0, "subnet": 10.0}
    progress.plan("pass 1/3", [(part, 5)] * 1000 + [arch] * 100, lambda: later)
    first = 1100 * build_module.ETA_PRIOR["part"] * 0.1
    first += 110 * build_module.ETA_PRIOR["subnet"] * build_module.SUBNET_BUDGET * 0.1
    assert progress.eta_s() == pytest.approx(first)  # before any job: the guess from the budgets
    assert progress.bar.total == 1210
    for _ in range(1000):
        progress.done((part, 5), 0.02)
    for _ in range(100):
        progress.done(arch, 0.5)  # a subnet costs 25 parts here
    assert progress.eta_s() == pytest.approx(100 * 0.02 + 10 * 0.5, rel=0.02)
    assert progress.bar.n == 1100 and progress.bar.total == 1210  # the bar never runs past its total
    progress.close()


def test_later_passes_are_estimated_from_the_points_and_how_often_passes_disagree(tiny, monkeypatch):
    parts, archs = space_parts(tiny), build_module._fit_archs(tiny, 4)
    points = sum(len(part_grid(counts, {})) for counts in parts.values())
    table = synthetic_table(tiny.largest(), overhead=None)
    table.parts, table.subnets = {}, {}
    guess = build_module._later_passes(table, parts, archs, 0, 3, GRID_POINTS)  # nothing measured twice yet
    assert guess == {"part": points * (1 + EXTRA_PASS_SHARE), "subnet": 4 * (1 + EXTRA_PASS_SHARE)}
    monkeypatch.setattr(build_module, "SHARE_MIN_POINTS", 1)  # the tiny space has few points
    for i, part in enumerate(parts):  # every point measured twice; a quarter of the parts disagree
        table.parts[part.key] = {n: [1.0, 2.0 if i % 4 == 0 else 1.0] for n in part_grid(parts[part], {})}
    share = sum(len(v) for i, v in enumerate(table.parts.values()) if i % 4 == 0) / points
    assert build_module._later_passes(table, parts, [], 1, 3, GRID_POINTS)["part"] == pytest.approx(
        points * share
    )
