"""Latency of a model on a target, measured by a protocol whose numbers can be trusted.

Protocol (inference mode, the target's threads/device/dtype/backend, garbage collector paused):

1. A first call, untimed for statistics: lazy initialisation, compilation for ``backend=compile``
   (if ``torch.compile`` fails the model is measured eager and the reason is recorded), export and
   session set-up for the deployment runtimes (``nas.hardware.runtimes``).
2. Warm-up until timings settle: the median of the last 3 runs no longer drops by more than 2 %
   from the 3 before, bounded by ``MAX_WARMUP`` runs and half of ``time_budget_s``.
3. Repeats until the median is known to ``rel_precision``: the 95 % order-statistics confidence
   interval of the median (distribution-free) has a relative half-width ≤ ``rel_precision``; or the
   time budget ends (never fewer than ``MIN_REPEATS``).

Each forward pass is timed on its own: ``perf_counter_ns`` on CPU, CUDA events followed by a
synchronisation on GPU, so queued kernels never leak into the next sample.

4. Noise: a measurement whose spread says its median cannot be trusted (``noisy_reason``) is timed
   again, up to ``remeasure`` times, and kept flagged (``Latency.noisy``) if every attempt was noisy.
   With a ``ReferenceProbe``, a fixed small model is timed before and after each attempt: if it ran
   more than ``PROBE_TOLERANCE`` away from its baseline (taken at the start of the session), the
   machine changed under the measurement, which is timed again too; ``Latency.probe_ratio`` records
   the probe's ratio around the attempt kept.

Why one process's numbers jump on a shared 2-vCPU VM (measured for issue 13 item 3): with
``threads=2`` each forward of a psvit-digits subnet runs ~124 OpenMP parallel regions. With
``OMP_WAIT_POLICY=PASSIVE`` the worker thread sleeps after every region and is woken by a futex
(124 voluntary context switches per forward): its cost depends on whether the other vCPU is halted
(this guest halts idle vCPUs at once: ``haltpoll.guest_halt_poll_ns=0``), so the same subnet times at
~1.8 or ~5-6 ms in one process. With libgomp's default (spinning) policy, a worker spins instead and
a forward takes ~1.3 ms, unless another process holds the other vCPU, when every region waits for a
time slice (medians of 10-300 ms). Neither the allocator (no page faults per forward once warm), the
garbage collector (paused), denormals (none in any op output of 32 subnets) nor the models kept alive
changed a one-thread timing. The wait policy is read when torch loads, so it is the process's to set;
``measure`` detects the consequences (spread, probe) and retries or flags.

Timeouts: the deadline is checked after every forward pass, so a slow model stops soon after it
passes ``timeout_s``; a thread cannot be killed, so a forward pass that truly hangs can only be
stopped by measuring in another process: ``measure_in_subprocess``.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import gc
import math
import multiprocessing
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from nas.errors import UserError
from nas.hardware import runtimes
from nas.hardware.target import Target

MIN_REPEATS = 10
MAX_REPEATS = 10_000
MAX_WARMUP = 50
SETTLE_WINDOW = 3
SETTLE_DROP = 0.02
_Z95 = 1.959964
_STARTUP_TIMEOUT_S = 120.0

#: Noisy: (p90 - p10) / median above this. Not the CV: one preempted pass (50 ms among 1 ms ones)
#: makes the CV huge and leaves the median alone. The interdecile range is what can move the median:
#: here (load ~3 on 2 vCPUs) subnets whose timings repeat give 2-12 %, so over 25 % means a tenth of
#: the passes or more ran a quarter slower (or two modes, as OpenMP workers woken or spinning), and the
#: median may sit in either.
NOISY_SPREAD = 0.25
#: Noisy too: the median's 95 % confidence interval still wider than +-5 % when the budget ended.
NOISY_CI_REL = 0.05
#: A noisy measurement is timed again at most this many times (each attempt gets the repeat budget).
MAX_REMEASURES = 2
#: Untimed passes after a pause or a probe, so the model's weights are back in the caches.
REWARM_PASSES = SETTLE_WINDOW
#: Pause before re-measurement k: k times this (a burst of another process's work may pass).
REMEASURE_PAUSE_S = 0.05
#: The reference probe off its baseline by more than this: the machine changed. Here (load ~3 on 2
#: vCPUs) the probe stayed within 0.97-1.10 of its baseline through a 6-minute benchmark; OpenMP
#: workers going from woken to spinning moved it to 0.22, a neighbour taking a vCPU from spinning
#: workers by 10-100x.
PROBE_TOLERANCE = 0.15
PROBE_BUDGET_S = 0.02  # per probe measurement (~0.5 ms a pass here: a check takes 10-15 ms)
PROBE_BASELINE_RUNS = 3  # the baseline is the median of this many probe measurements


class MeasureTimeout(Exception):
    """The measurement ran past its ``timeout_s``."""


@dataclass(frozen=True)
class Latency:
    """Statistics of the timed repeats, in milliseconds per forward pass of one batch."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    cv: float
    repeats: int
    warmup: int
    ci_rel: float  # relative half-width of the 95 % confidence interval of the median
    backend: str  # the backend actually measured
    fallback: str | None = None  # why torch.compile was not used, when it was asked for
    noisy: bool = False  # every attempt was noisy (``noisy_reason``): rank this latency with care
    noisy_reason: str | None = None
    attempts: int = 1  # timed attempts (1 + re-measurements)
    probe_ratio: float | None = None  # reference probe / its baseline around the attempt kept

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: how far the middle 80 % of the timings reach, relative to the median."""
        return (self.p90_ms - self.p10_ms) / self.median_ms if self.median_ms > 0 else 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MeasureResult:
    """A measurement that may have failed: the caller records the reason and keeps going."""

    ok: bool
    latency: Latency | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MeasureResult:
        latency = data.get("latency")
        return cls(ok=data["ok"], latency=Latency(**latency) if latency else None, error=data.get("error"))


def measure(
    model: nn.Module,
    target: Target,
    *,
    input_shape: tuple[int, ...] | None = None,
    time_budget_s: float = 10.0,
    rel_precision: float = 0.01,
    timeout_s: float = 300.0,
    remeasure: int = MAX_REMEASURES,
    probe: ReferenceProbe | None = None,
) -> Latency:
    """Measure ``model`` on ``target`` (see the module docstring); raises if the model fails.

    The model is put in eval mode (its training mode is restored afterwards) and moved to the
    target's device and dtype in place. ``input_shape`` defaults to ``target.input_shape`` of the
    model's timm ``pretrained_cfg["input_size"]``, or of ``target.resolution`` when it is set.
    ``time_budget_s`` bounds warm-up and one attempt's repeats; a noisy attempt is timed again up to
    ``remeasure`` times, each with that repeat budget; ``timeout_s`` bounds everything, compilation
    and probes too. ``probe``: a ``ReferenceProbe`` timed around every attempt (see the module docstring).
    """
    target.require_available()
    shape = input_shape or _input_shape(model, target)
    timer = _Timer(target.torch_device, timeout_s)
    was_training = model.training
    device_scope = torch.cuda.device(target.torch_device) if timer.cuda else contextlib.nullcontext()
    try:
        with _num_threads(target.threads), device_scope, torch.inference_mode(), _gc_paused():
            model.eval().to(target.torch_device, target.torch_dtype)
            x = torch.randn(shape, device=target.torch_device, dtype=target.torch_dtype)
            prepared = runtimes.prepare(model, x, target.backend, target.threads, timer)
            try:
                warm = _warm_up(prepared.forward, timer, time_budget_s / 2)
                repeat_budget_s = time_budget_s - sum(warm) / 1e3
                attempts: list[_Attempt] = []
                while len(attempts) <= max(remeasure, 0):
                    attempt = _attempt(prepared.forward, timer, repeat_budget_s, rel_precision, probe, len(attempts))
                    attempts.append(attempt)
                    if attempt.reason is None:
                        break
            finally:
                prepared.close()
    finally:
        model.train(was_training)
    kept = min(attempts, key=_Attempt.badness)
    latency = _latency(kept.samples, warmup=1 + len(warm), backend=prepared.backend, fallback=prepared.fallback)
    return dataclasses.replace(
        latency,
        noisy=kept.reason is not None,
        noisy_reason=kept.reason,
        attempts=len(attempts),
        probe_ratio=kept.probe_ratio,
    )


def noisy_reason(latency: Latency, probe_ratio: float | None = None) -> str | None:
    """Why ``latency`` cannot be ranked as exact, or None: its interdecile spread over
    ``NOISY_SPREAD``, its median's confidence interval over ``NOISY_CI_REL``, or the reference probe
    run more than ``PROBE_TOLERANCE`` away from its baseline (the machine changed meanwhile)."""
    if latency.spread > NOISY_SPREAD:
        return f"spread: p10..p90 is {latency.spread:.0%} of the median (over {NOISY_SPREAD:.0%})"
    if latency.ci_rel > NOISY_CI_REL:
        return f"median known to +-{latency.ci_rel:.0%} only (over {NOISY_CI_REL:.0%})"
    if probe_ratio is not None and abs(probe_ratio - 1) > PROBE_TOLERANCE:
        return f"machine changed: reference probe at {probe_ratio:.2f}x its baseline"
    return None


@dataclasses.dataclass
class _Attempt:
    samples: list[float]
    probe_ratio: float | None
    reason: str | None

    def badness(self) -> tuple[bool, bool, float]:
        """Which attempt to keep: a clean one; else one inside the probe's window; then the least spread."""
        off = self.probe_ratio is not None and abs(self.probe_ratio - 1) > PROBE_TOLERANCE
        return (self.reason is not None, off, _latency(self.samples, warmup=0, backend="").spread)


def _attempt(
    forward: Callable[[], object],
    timer: _Timer,
    budget_s: float,
    rel_precision: float,
    probe: ReferenceProbe | None,
    index: int,
) -> _Attempt:
    """One timed attempt: after a pause when it is a re-measurement (a burst of load may pass),
    between two probe runs when there is a probe, with a few untimed passes before timing."""
    if index:
        time.sleep(REMEASURE_PAUSE_S * index)
    ratios = [probe.ratio()] if probe is not None else []
    if index or probe is not None:
        for _ in range(REWARM_PASSES):
            timer(forward)
    samples = _repeat(forward, timer, budget_s, rel_precision)
    if probe is not None:
        ratios.append(probe.ratio())
    ratio = max(ratios, key=lambda r: abs(r - 1)) if ratios else None
    return _Attempt(samples, ratio, noisy_reason(_latency(samples, warmup=0, backend=""), ratio))


class ReferenceProbe:
    """A fixed small model timed around candidates: its latency against its baseline (the median of
    ``PROBE_BASELINE_RUNS`` measurements when first used: the start of the measurement session) tells
    whether the machine changed (load, OpenMP threads woken or spinning, frequency) while a candidate
    was measured. Eager always: compiling the probe at every check would cost seconds.

    One per process and target: a campaign's scorer holds one for all its candidates.
    """

    def __init__(self, target: Target, *, budget_s: float = PROBE_BUDGET_S):
        self.target = dataclasses.replace(target, backend="eager")
        self.budget_s = budget_s
        self.model = _probe_model()
        self.baseline_ms: float | None = None
        self.checks = 0

    def time_ms(self) -> float:
        """The probe's median now (a short measurement, never re-measured itself)."""
        latency = measure(
            self.model, self.target, input_shape=PROBE_SHAPE, time_budget_s=self.budget_s, remeasure=0
        )
        return latency.median_ms

    def start(self) -> float:
        """Take the baseline (once; later calls return it)."""
        if self.baseline_ms is None:
            self.baseline_ms = statistics.median(self.time_ms() for _ in range(PROBE_BASELINE_RUNS))
        return self.baseline_ms

    def ratio(self) -> float:
        """The probe's latency now over its baseline (taken first if there is none yet)."""
        baseline = self.start()
        self.checks += 1
        return self.time_ms() / baseline


PROBE_SHAPE = (1, 65, 64)  # batch, tokens, dim: a psvit-digits-sized sequence


class _ProbeBlock(nn.Module):
    """A pre-norm transformer block: the kinds of ops (matmuls, layer norms, attention, GELU) the
    measured ViTs run, so a change of machine state moves the probe as it moves them."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def _probe_model() -> nn.Module:
    """Four blocks at dim 64, 2 heads, with seeded weights (the same probe in every process), built
    without touching the global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(*(_ProbeBlock(PROBE_SHAPE[-1], 2) for _ in range(4))).eval()


def measure_safely(model: nn.Module, target: Target, **kwargs) -> MeasureResult:
    """``measure``, with a failure (out of memory, an exception, a timeout) returned as its reason.

    The reason starts with its kind: ``timeout: ...``, ``out of memory: ...`` or the exception's
    type. A ``UserError`` (a bad target or input shape) is not the candidate's fault and propagates.
    """
    try:
        return MeasureResult(ok=True, latency=measure(model, target, **kwargs))
    except runtimes.RuntimeUnsupported as err:  # this model on this runtime: the candidate's failure
        error = str(err)
    except UserError:
        raise
    except MeasureTimeout as err:
        error = str(err)
    except (torch.cuda.OutOfMemoryError, MemoryError) as err:
        error = f"out of memory: {_one_line(err)}"
    except Exception as err:
        error = f"{type(err).__name__}: {_one_line(err)}"
    if target.torch_device.type == "cuda":
        torch.cuda.empty_cache()  # here, after the traceback that held the activations is gone
    return MeasureResult(ok=False, error=error)


def measure_in_subprocess(
    model_factory: Callable[[], nn.Module], target: Target, *, timeout_s: float = 300.0, **kwargs
) -> MeasureResult:
    """``measure_safely`` in a fresh spawned process, killed if it outlives ``timeout_s``.

    The hard timeout for forward passes that hang (or crash the process). ``model_factory`` builds
    the model in the child, so it must be picklable: a module-level function or a
    ``functools.partial`` of one. The timeout starts once the child has imported everything; a
    ``UserError`` in the child is raised here, and a crash (e.g. the OOM killer) is a failed result.
    """
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(
        target=_measure_child, args=(sender, model_factory, target, timeout_s, kwargs), daemon=True
    )
    child.start()
    sender.close()
    try:
        for limit, what in ((_STARTUP_TIMEOUT_S, "start"), (timeout_s, "finish")):
            if not receiver.poll(limit):
                return MeasureResult(
                    ok=False, error=f"timeout: measuring process did not {what} within {limit:g} s"
                )
            message = receiver.recv()
    except EOFError:
        child.join()
        return MeasureResult(ok=False, error=f"crashed: measuring process exited with code {child.exitcode}")
    finally:
        child.kill()
        child.join()
        receiver.close()
    if isinstance(message, UserError):
        raise message
    return message


def _measure_child(sender, model_factory, target: Target, timeout_s: float, kwargs: dict) -> None:
    sender.send("started")
    try:
        sender.send(measure_safely(model_factory(), target, timeout_s=timeout_s, **kwargs))
    except UserError as err:  # the parent raises it: a user mistake, not a failed measurement
        sender.send(err)


class _Timer:
    """Times one forward pass at a time, and ends the measurement once the deadline has passed."""

    def __init__(self, device: torch.device, timeout_s: float):
        self.cuda = device.type == "cuda"
        self._timeout_s = timeout_s
        self._deadline = time.monotonic() + timeout_s
        self._passes = 0

    def __call__(self, forward: Callable[[], object]) -> float:
        ms = _time_cuda(forward) if self.cuda else _time_cpu(forward)
        self._passes += 1
        if time.monotonic() > self._deadline:
            raise MeasureTimeout(
                f"timeout: measurement ran past {self._timeout_s:g} s ({self._passes} forward passes done)"
            )
        return ms


def _time_cpu(forward: Callable[[], object]) -> float:
    start = time.perf_counter_ns()
    forward()
    return (time.perf_counter_ns() - start) / 1e6


def _time_cuda(forward: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    forward()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _warm_up(forward: Callable[[], object], timer: _Timer, budget_s: float) -> list[float]:
    """Run until the timings settle (see ``settled``), ``MAX_WARMUP`` runs or ``budget_s``."""
    times: list[float] = []
    while len(times) < MAX_WARMUP and sum(times) < budget_s * 1e3 and not settled(times):
        times.append(timer(forward))
    return times


def settled(times: list[float]) -> bool:
    """Whether the median of the last window no longer drops by more than SETTLE_DROP."""
    if len(times) < 2 * SETTLE_WINDOW:
        return False
    last = np.median(times[-SETTLE_WINDOW:])
    before = np.median(times[-2 * SETTLE_WINDOW : -SETTLE_WINDOW])
    return bool(last >= (1 - SETTLE_DROP) * before)


def _repeat(
    forward: Callable[[], object], timer: _Timer, budget_s: float, rel_precision: float
) -> list[float]:
    """Timed samples (kept sorted) until the median is precise enough or the budget ends."""
    samples: list[float] = []
    end = time.monotonic() + budget_s
    while len(samples) < MAX_REPEATS:
        bisect.insort(samples, timer(forward))
        if len(samples) >= MIN_REPEATS and (
            median_ci_rel(samples) <= rel_precision or time.monotonic() >= end
        ):
            break
    return samples


def median_ci_rel(sorted_samples: list[float]) -> float:
    """Relative half-width of the distribution-free 95 % confidence interval of the median.

    The interval runs between the order statistics of ranks floor((n - z√n)/2) and
    ceil(1 + (n + z√n)/2) (1-based; the normal approximation to the binomial), clamped to the data.
    """
    n = len(sorted_samples)
    spread = _Z95 * math.sqrt(n)
    low = max(math.floor((n - spread) / 2) - 1, 0)
    high = min(math.ceil(1 + (n + spread) / 2) - 1, n - 1)
    median = float(np.median(sorted_samples))
    return (sorted_samples[high] - sorted_samples[low]) / (2 * median)


def _latency(samples: list[float], *, warmup: int, backend: str, fallback: str | None = None) -> Latency:
    values = np.asarray(samples)
    mean, std = float(values.mean()), float(values.std(ddof=1))
    p10, median, p90 = (float(v) for v in np.percentile(values, [10, 50, 90]))
    return Latency(
        median_ms=median,
        p10_ms=p10,
        p90_ms=p90,
        mean_ms=mean,
        std_ms=std,
        cv=std / mean,
        repeats=len(samples),
        warmup=warmup,
        ci_rel=median_ci_rel(samples),
        backend=backend,
        fallback=fallback,
    )


def _input_shape(model: nn.Module, target: Target) -> tuple[int, int, int, int]:
    """NCHW from the target's resolution, else from the model's timm ``pretrained_cfg``."""
    input_size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    if input_size:
        return target.input_shape(input_size[-1], channels=input_size[0])
    if target.resolution is None:
        raise UserError(
            f"target {target} has no resolution and the model declares no input size: "
            "set resolution= in the target or pass input_shape"
        )
    return target.input_shape(target.resolution)


@contextlib.contextmanager
def _num_threads(threads: int | None) -> Iterator[None]:
    """Use ``threads`` intra-op threads (None: leave as is) and restore the count, even on errors."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Collect the young generation (a full collection costs ~0.3 s with torch loaded, more than
    measuring a small model), then keep the garbage collector's pauses out of the timings."""
    gc.collect(0)
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else repr(err))[:300]
