"""Latency measurement on real (tiny) models: statistics, protocol, state restored, failures recorded."""

import dataclasses
import functools
import importlib
import math
import random
import time

import pytest
import torch
from torch import nn

from nas.errors import UserError
from nas.hardware.measure import (
    MAX_REMEASURES,
    MIN_REPEATS,
    NOISY_SPREAD,
    PROBE_TOLERANCE,
    MeasureResult,
    ReferenceProbe,
    measure,
    measure_in_subprocess,
    measure_safely,
    median_ci_rel,
    noisy_reason,
    settled,
)
from nas.hardware.target import Target

measure_module = importlib.import_module("nas.hardware.measure")  # the package re-exports ``measure``

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


# -- noisy measurements, re-measurement and the reference probe ----------------------------------
class Jittery(nn.Module):
    """Sleeps 2-10 ms in a random half of its forward passes (seeded): timings no median can be trusted."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.rng = random.Random(seed)

    def forward(self, x):
        if self.rng.random() < 0.5:
            time.sleep(self.rng.uniform(0.002, 0.010))
        return x


class ScriptedProbe:
    """Stands in for ``ReferenceProbe``: returns the given ratios in turn (the last from then on)."""

    def __init__(self, *ratios: float):
        self.ratios, self.calls = ratios, 0

    def ratio(self) -> float:
        self.calls += 1
        return self.ratios[min(self.calls - 1, len(self.ratios) - 1)]


@pytest.fixture
def steady_clock(monkeypatch):
    """Every forward pass 'takes' 1 ms +- 1 % (seeded): timing that repeats, whatever the machine's load."""
    rng = random.Random(0)

    def fake_time(forward):
        forward()
        return 1.0 + rng.uniform(-0.01, 0.01)

    monkeypatch.setattr(measure_module, "_time_cpu", fake_time)


@pytest.mark.parametrize("remeasure", [0, 1, MAX_REMEASURES])
def test_a_noisy_measurement_is_remeasured_a_bounded_number_of_times_and_flagged(remeasure):
    latency = measure(Jittery(), TARGET, time_budget_s=0.15, remeasure=remeasure)
    assert latency.attempts == 1 + remeasure
    assert latency.noisy
    assert latency.noisy_reason.startswith("spread")
    assert latency.spread > NOISY_SPREAD


def test_a_steady_measurement_is_not_flagged(steady_clock):
    latency = measure(tiny_cnn(), TARGET, time_budget_s=0.2)
    assert (latency.noisy, latency.noisy_reason, latency.attempts) == (False, None, 1)
    assert latency.probe_ratio is None  # no probe asked for


def test_a_noisy_attempt_then_a_clean_one_keeps_the_clean_one(monkeypatch):
    attempts = iter([[1.0] * 5 + [3.0] * 5, [1.0] * 10])  # two modes, then repeatable

    def scripted_repeat(forward, timer, budget_s, rel_precision):
        return next(attempts)

    monkeypatch.setattr(measure_module, "_repeat", scripted_repeat)
    latency = measure(tiny_cnn(), TARGET, time_budget_s=0.2)
    assert (latency.noisy, latency.attempts, latency.median_ms) == (False, 2, 1.0)


def test_noisy_reason_reads_spread_confidence_and_probe():
    def latency(samples):
        return measure_module._latency(sorted(samples), warmup=0, backend="eager")

    steady = latency([1.0, 1.01, 0.99] * 10)
    assert noisy_reason(steady) is None
    assert noisy_reason(steady, probe_ratio=1 + PROBE_TOLERANCE / 2) is None
    assert noisy_reason(steady, probe_ratio=1.5).startswith("machine changed")
    assert noisy_reason(latency([1.0] * 30 + [400.0] * 5)).startswith("spread")  # a p90 far above the median
    assert noisy_reason(latency([1.0] * 5 + [1.2] * 5)).startswith("median known")  # 10 samples, 2 modes
    # one preempted pass among many: a huge CV, but the median stands
    one_outlier = latency([1.0] * 99 + [50.0])
    assert one_outlier.cv > 1 and noisy_reason(one_outlier) is None


def test_a_probe_that_moved_makes_the_candidate_remeasured_inside_its_window(steady_clock):
    probe = ScriptedProbe(1.0, 1.6, 1.03, 0.99)  # the machine changed during the first attempt only
    latency = measure(tiny_cnn(), TARGET, time_budget_s=0.2, probe=probe)
    assert (latency.noisy, latency.attempts, probe.calls) == (False, 2, 4)
    assert latency.probe_ratio == 1.03  # the kept attempt's window, farthest from 1


def test_a_probe_that_stays_off_is_flagged_after_the_bounded_retries(steady_clock):
    probe = ScriptedProbe(1.5)
    latency = measure(tiny_cnn(), TARGET, time_budget_s=0.2, probe=probe)
    assert latency.noisy and latency.noisy_reason.startswith("machine changed")
    assert (latency.attempts, probe.calls, latency.probe_ratio) == (
        1 + MAX_REMEASURES,
        2 + 2 * MAX_REMEASURES,
        1.5,
    )


def test_the_reference_probe_ratio_is_recorded_with_the_measurement():
    probe = ReferenceProbe(TARGET)
    latency = measure(tiny_cnn(), TARGET, time_budget_s=0.2, probe=probe)
    assert probe.baseline_ms > 0
    assert probe.checks == 2 * latency.attempts  # before and after every attempt
    assert latency.probe_ratio > 0
    assert probe.target.backend == "eager"
    first = [p.detach().clone() for p in probe.model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(first, ReferenceProbe(TARGET).model.parameters()))  # fixed


def test_cache_records_from_before_the_noise_fields_still_load():
    old = MeasureResult(ok=True, latency=measure(tiny_cnn(), TARGET, time_budget_s=0.1)).to_dict()
    for key in ("noisy", "noisy_reason", "attempts", "probe_ratio"):
        del old["latency"][key]
    latency = MeasureResult.from_dict(old).latency
    assert (latency.noisy, latency.attempts, latency.probe_ratio) == (False, 1, None)


class _Cache:
    """A result cache holding one result (or none) and recording what is put."""

    def __init__(self, result: MeasureResult | None = None):
        self.result, self.puts = result, []

    def get(self, arch_hash, fingerprint, target):
        return self.result

    def put(self, arch_hash, fingerprint, target, result):
        self.puts.append(result)


class _Arch:
    image_size = 16

    def arch_hash(self) -> str:
        return "0123abcd"


def _scorer(cache):
    from nas.families import Candidates
    from nas.hardware.fingerprint import fingerprint
    from nas.search.scoring import Scorer

    candidates = Candidates(lambda arch: tiny_cnn(), None, None, None, "weights_hash")
    return Scorer(candidates, target=TARGET, fingerprint=fingerprint(TARGET), cache=cache, measure_budget_s=0.2)


def test_the_scorer_probes_records_and_flags_in_the_trial_metrics():
    from nas.search.scoring import Score

    cache = _Cache()
    scorer = _scorer(cache)
    result = scorer.measure(_Arch(), tiny_cnn())
    assert result.ok and cache.puts == [result]
    assert scorer.probe is not None and scorer.probe.baseline_ms > 0
    metrics = Score(accuracy=0.5, gflops=0.1, params_m=0.1, measured=result).metrics()
    assert metrics["latency_probe_ratio"] == result.latency.probe_ratio
    assert metrics["latency_noisy"] == float(result.latency.noisy)
    assert metrics["latency_attempts"] == result.latency.attempts
    flagged = dataclasses.replace(result.latency, noisy=True, noisy_reason="spread: ...")
    assert (
        Score(accuracy=0.5, gflops=0.1, params_m=0.1, measured=MeasureResult(True, flagged)).metrics()[
            "latency_noisy"
        ]
        == 1.0
    )


def test_a_cached_noisy_latency_is_measured_again_a_clean_one_is_not():
    latency = measure(tiny_cnn(), TARGET, time_budget_s=0.1)
    clean = MeasureResult(ok=True, latency=dataclasses.replace(latency, noisy=False))
    noisy = MeasureResult(ok=True, latency=dataclasses.replace(latency, noisy=True))
    assert _scorer(_Cache(clean)).cached_latency(_Arch()) == clean
    assert _scorer(_Cache(noisy)).cached_latency(_Arch()) is None
    failed = MeasureResult(ok=False, error="timeout: ...")
    assert _scorer(_Cache(failed)).cached_latency(_Arch()) == failed


def test_the_front_table_marks_noisy_latencies():
    from nas.report import format_front

    row = {
        "trial_number": 1,
        "val_accuracy": 0.9,
        "latency_ms": 1.2,
        "latency_p90_ms": 412.0,
        "arch_hash": "ab",
    }
    text = format_front([{**row, "latency_noisy": 1.0}, {**row, "trial_number": 2, "latency_noisy": 0.0}])
    assert "1 with a noisy latency" in text.splitlines()[0]
    assert [line.rstrip().endswith("noisy") for line in text.splitlines()[3:5]] == [True, False]
    assert "noisy" not in format_front([{**row, "latency_noisy": 0.0}])
