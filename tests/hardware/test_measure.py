"""Latency measurement on real (tiny) models: statistics, protocol, state restored, failures recorded."""

import functools
import math
import time

import pytest
import torch
from torch import nn

from nas.errors import UserError
from nas.hardware.measure import (
    MIN_REPEATS,
    MeasureResult,
    measure,
    measure_in_subprocess,
    measure_safely,
    median_ci_rel,
    settled,
)
from nas.hardware.target import Target

TARGET = Target.parse("cpu:threads=1,batch=2,resolution=16")


def tiny_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10))


class Recorder(nn.Module):
    """Records what each forward pass saw: input shape, threads, inference mode."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def forward(self, x):
        self.seen.add((tuple(x.shape), torch.get_num_threads(), torch.is_inference_mode_enabled()))
        return x.sum()


class Raises(nn.Module):
    def __init__(self, error: BaseException):
        super().__init__()
        self.error = error

    def forward(self, x):
        raise self.error


class Sleeps(nn.Module):
    """Sleeps ``durations_s[i]`` in its i-th forward pass (the last value from then on)."""

    def __init__(self, *durations_s: float):
        super().__init__()
        self.durations_s = durations_s
        self.calls = 0

    def forward(self, x):
        time.sleep(self.durations_s[min(self.calls, len(self.durations_s) - 1)])
        self.calls += 1
        return x


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_statistics_of_a_real_model_are_consistent():
    latency = measure(tiny_cnn(), TARGET, time_budget_s=1.0)
    assert 0 < latency.p10_ms <= latency.median_ms <= latency.p90_ms
    assert latency.mean_ms > 0 and latency.std_ms >= 0
    assert latency.cv == pytest.approx(latency.std_ms / latency.mean_ms)
    assert latency.repeats >= MIN_REPEATS
    assert latency.warmup >= 2
    assert 0 <= latency.ci_rel < math.inf
    assert (latency.backend, latency.fallback) == ("eager", None)
    result = MeasureResult(ok=True, latency=latency)
    assert MeasureResult.from_dict(result.to_dict()) == result


def test_forward_runs_with_the_targets_threads_shape_and_inference_mode():
    torch.set_num_threads(2)
    model = Recorder().train()
    measure(model, Target.parse("cpu:threads=1,batch=3,resolution=8"), time_budget_s=0.2)
    assert model.seen == {((3, 3, 8, 8), 1, True)}
    assert torch.get_num_threads() == 2
    assert model.training


def test_input_shape_falls_back_to_the_models_timm_config():
    model = Recorder()
    model.pretrained_cfg = {"input_size": (1, 12, 12)}
    measure(model, Target.parse("cpu:threads=1,batch=5"), time_budget_s=0.2)
    assert {seen[0] for seen in model.seen} == {(5, 1, 12, 12)}


def test_missing_input_size_is_a_user_error_even_when_measuring_safely():
    with pytest.raises(UserError, match="resolution"):
        measure_safely(Recorder(), Target.parse("cpu:threads=1"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_target_without_cuda_is_a_user_error():
    with pytest.raises(UserError, match="needs CUDA"):
        measure_safely(tiny_cnn(), Target.parse("cuda:0:batch=2,resolution=16"))


def test_threads_and_training_mode_are_restored_when_the_model_raises():
    torch.set_num_threads(2)
    model = Raises(RuntimeError("boom")).train()
    with pytest.raises(RuntimeError, match="boom"):
        measure(model, TARGET)
    assert torch.get_num_threads() == 2
    assert model.training


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (RuntimeError("shape mismatch\nlong torch detail"), "RuntimeError: shape mismatch"),
        (
            torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
            "out of memory: CUDA out",
        ),
        (MemoryError("no room"), "out of memory: no room"),
    ],
)
def test_a_failing_model_is_recorded_with_its_reason(error, reason):
    result = measure_safely(Raises(error), TARGET)
    assert not result.ok and result.latency is None
    assert result.error.startswith(reason)
    assert "\n" not in result.error


def test_a_forward_past_the_deadline_is_a_timeout():
    model = Sleeps(0.05)
    result = measure_safely(model, TARGET, timeout_s=0.01)
    assert not result.ok
    assert result.error.startswith("timeout")
    assert model.calls == 1  # stopped at the first check


def test_warm_up_lasts_until_timings_stop_dropping():
    # First call 128 ms, then 64, 32, ... down to 2 ms: the warm-up must outlast the drop.
    model = Sleeps(*(0.128 / 2**k for k in range(7)), 0.002)
    latency = measure(model, TARGET, time_budget_s=1.0)
    assert latency.warmup >= 10


def test_compile_failure_falls_back_to_eager_with_the_reason(monkeypatch):
    def broken_compile(model):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken_compile)
    target = Target.parse("cpu:threads=1,batch=2,resolution=16,backend=compile")
    latency = measure(tiny_cnn(), target, time_budget_s=0.2)
    assert latency.backend == "eager"
    assert latency.fallback == "torch.compile failed, measured eager: RuntimeError: no C++ compiler"


def test_every_model_is_compiled_however_many_of_one_class(monkeypatch):
    compiled = []

    def counting_backend(graph, example_inputs):
        compiled.append(graph)
        return graph.forward

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counting_backend))
    target = Target.parse("cpu:threads=1,batch=2,backend=compile")
    for width in range(4, 16):  # more models than dynamo's recompile limit (8)
        latency = measure(nn.Linear(width, width), target, input_shape=(2, width), time_budget_s=0.05)
        assert (latency.backend, latency.fallback) == ("compile", None)
    assert len(compiled) == 12


@pytest.mark.slow
def test_compile_backend_measures_the_compiled_model():
    target = Target.parse("cpu:threads=1,batch=2,resolution=16,backend=compile")
    latency = measure(tiny_cnn(), target, time_budget_s=0.5)
    assert (latency.backend, latency.fallback) == ("compile", None)


def test_settled_compares_the_medians_of_the_last_two_windows():
    assert not settled([5.0, 5.0, 5.0, 5.0, 5.0])  # too few to tell
    assert not settled([10.0, 10.0, 10.0, 9.0, 9.0, 9.0])  # still dropping by 10 %
    assert settled([10.0, 10.0, 10.0, 9.9, 9.9, 9.9])  # 1 % drop: settled
    assert settled([9.0, 9.0, 9.0, 10.0, 10.0, 10.0])  # rising is settled too


def test_median_confidence_interval_from_order_statistics():
    # n = 100: ranks 40 and 61 (1-based) bound the 95 % interval of the median.
    samples = [float(v) for v in range(1, 101)]
    assert median_ci_rel(samples) == pytest.approx((61 - 40) / (2 * 50.5))
    # n = 10: the interval is the whole range (coverage 1 - 2 / 2**10).
    assert median_ci_rel([10.0] * 9 + [12.0]) == pytest.approx(2 / 20)
    assert median_ci_rel([7.0] * 50) == 0


def test_measure_in_subprocess_returns_the_childs_result():
    factory = functools.partial(nn.Linear, 16, 4)
    result = measure_in_subprocess(factory, TARGET, input_shape=(2, 16), time_budget_s=0.2)
    assert result.ok and result.latency.repeats >= MIN_REPEATS


def test_measure_in_subprocess_kills_a_hung_forward():
    factory = functools.partial(Sleeps, 600.0)
    result = measure_in_subprocess(factory, TARGET, timeout_s=1.0)
    assert not result.ok
    assert result.error.startswith("timeout")


def test_measure_in_subprocess_raises_a_user_error_in_the_parent():
    with pytest.raises(UserError, match="resolution"):
        measure_in_subprocess(functools.partial(nn.Linear, 16, 4), Target.parse("cpu:threads=1"))
