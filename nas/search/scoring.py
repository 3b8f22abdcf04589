"""Scoring one candidate: accuracy, FLOPs, params and latency on the target.

``Scorer`` holds what every trial of a campaign shares (the data, the weights, the target, the
latency cache) and turns an architecture into a ``Score``. What a candidate's network is and which
weights it inherits is its family's business (``nas.families``: ``Candidates``): a psvit subnet
extracted from the supernet, or a timm ViT patched with a reduction schedule. Either way accuracy
and latency are taken on the stand-alone network that export would write.

Latency is measured unless the campaign's policy says the prediction is enough (a candidate
clearly over the budget or off the front); then the predictor's estimate stands in, and the
score says so. Measurements go through the shared
result cache, so an architecture is never measured twice on one machine and target, unless its
cached latency was flagged noisy: that one is measured again (a later session may be quieter).
A reference probe (``nas.hardware.measure.ReferenceProbe``, its baseline taken at the scorer's first
measurement) is timed around every measurement; ``latency_noisy`` and ``latency_probe_ratio`` in
the metrics say how far the number can be trusted.

A model whose work depends on its input (AdaViT, ``family: adaptive``) is costed over a fixed,
seeded sample of validation images (``nas.hardware.input_cost``): ``gflops`` is the mean over the
images (``gflops_p90`` beside it), the latency the mean per batch over them (p10/p90 over the
images), cached under the architecture, the images' hash and the weights' hash.

Accuracy is computed on the campaign's eval device (``--eval-device``): the supernet or base
model is moved there once, each validation batch as it is used. Latency is still measured on the
target, whatever the eval device.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from nas.evaluation import classification_accuracy
from nas.families import Candidates, family_of
from nas.hardware.cache import ResultCache
from nas.hardware.fingerprint import Fingerprint
from nas.hardware.flops import flops, params
from nas.hardware.input_cost import (
    cost_key,
    fixed_sample,
    input_flops,
    is_input_dependent,
    measure_over_inputs,
)
from nas.hardware.measure import MeasureResult, ReferenceProbe, measure_safely
from nas.hardware.target import Target
from nas.names import ACCURACY, LATENCY


@dataclass
class Score:
    accuracy: float
    gflops: float
    params_m: float
    measured: MeasureResult | None = None  # None: not measured (predicted only)
    predicted_ms: float | None = None
    cached: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)  # e.g. gflops_p90 of an input-dependent model

    @property
    def ok(self) -> bool:
        return self.measured is None or self.measured.ok

    @property
    def latency_ms(self) -> float | None:
        """Measured median when measured, else the prediction."""
        if self.measured is not None and self.measured.ok:
            return self.measured.latency.median_ms
        return self.predicted_ms

    def metrics(self) -> dict[str, float]:
        out = {ACCURACY: self.accuracy, "gflops": self.gflops, "params_m": self.params_m}
        if self.latency_ms is not None:
            out[LATENCY] = self.latency_ms
        if self.measured is not None and self.measured.ok:
            lat = self.measured.latency
            out.update(latency_p90_ms=lat.p90_ms, latency_p10_ms=lat.p10_ms, latency_cv=lat.cv)
            # 1.0: every attempt was noisy (nas.hardware.measure.noisy_reason); rank it with care
            out.update(latency_noisy=float(lat.noisy), latency_attempts=float(lat.attempts))
            if lat.probe_ratio is not None:
                out["latency_probe_ratio"] = lat.probe_ratio
        if self.predicted_ms is not None:
            out["predicted_latency_ms"] = self.predicted_ms
        out.update(self.extra)
        out.update({f"time_{k}_s": v for k, v in self.timings.items()})
        return out


class Scorer:
    """What all trials of a campaign share; ``score`` is called once per candidate."""

    probe: ReferenceProbe | None = None  # made at the first measurement: its baseline is the session's start

    def __init__(
        self,
        candidates: Candidates,
        target: Target,
        fingerprint: Fingerprint,
        cache: ResultCache,
        predictor=None,
        measure_budget_s: float = 2.0,
        eval_device: torch.device | str = "cpu",
    ):
        self.candidates = candidates
        self.val_data = candidates.val_data
        self.target, self.fingerprint, self.cache = target, fingerprint, cache
        self.predictor = predictor
        self.measure_budget_s = measure_budget_s
        self.eval_device = torch.device(eval_device)  # where ``build`` puts a candidate to score it
        self._scores: dict[str, Score] = {}  # by arch hash: samplers propose the same candidate again

    @property
    def data_spec(self) -> str | None:
        """The validation data's spec, for the campaign's record."""
        return self.candidates.data_spec

    @property
    def weights_hash(self) -> str | None:
        """The hash of the weights file candidates inherit from, recorded under ``weights_tag``."""
        return self.candidates.weights_hash

    @property
    def weights_tag(self) -> str:
        return self.candidates.weights_tag

    def build(self, arch) -> nn.Module:
        """The stand-alone network whose accuracy and latency are measured."""
        return self.candidates.build(arch)

    def image_size(self, arch) -> int:
        return self.target.resolution or arch.image_size

    def predict(self, arch) -> float | None:
        return None if self.predictor is None else self.predictor.predict(arch)

    def cost(self, model: nn.Module, arch) -> tuple[float, float]:
        """(GFLOPs, params in millions) at batch 1 and the target's resolution (on the eval device,
        where ``model`` is: the counts do not depend on it)."""
        return self.costs(model, arch)[:2]

    def costs(self, model: nn.Module, arch) -> tuple[float, float, dict[str, float]]:
        """``cost`` and more metrics: a model whose work depends on its input (AdaViT) is counted
        over ``cost_inputs`` (mean GFLOPs, and ``gflops_p90`` etc.; ``nas.hardware.input_cost``)."""
        if is_input_dependent(model):
            counted = input_flops(model, self.cost_inputs())
            return counted.mean, params(model) / 1e6, counted.metrics()
        x = torch.zeros((1, *self.target.input_shape(self.image_size(arch))[1:]), device=self.eval_device)
        return flops(model, x) / 1e9, params(model) / 1e6, {}

    def cost_inputs(self) -> torch.Tensor:
        """The fixed, seeded sample of validation images an input-dependent model's cost is taken over."""
        if getattr(self, "_cost_inputs", None) is None:
            self._cost_inputs = fixed_sample(self.val_data)
        return self._cost_inputs

    def latency_key(self, arch, model: nn.Module | None = None) -> str:
        """The cache key: the architecture, and for an input-dependent model also its inputs and weights."""
        if model is not None and is_input_dependent(model):
            return cost_key(arch.arch_hash(), self.cost_inputs(), self.weights_hash)
        return arch.arch_hash()

    def cached_latency(self, arch, model: nn.Module | None = None) -> MeasureResult | None:
        """The cached result, unless it was flagged noisy: that one is measured again (and replaced)."""
        cached = self.cache.get(self.latency_key(arch, model), self.fingerprint, self.target)
        if cached is not None and cached.ok and cached.latency.noisy:
            return None
        return cached

    def measure(self, arch, model: nn.Module) -> MeasureResult:
        """Measured with the scorer's reference probe around it, re-measured (bounded) when noisy."""
        if self.probe is None:
            self.probe = ReferenceProbe(self.target)
        shape = self.target.input_shape(self.image_size(arch))
        options = dict(time_budget_s=self.measure_budget_s, rel_precision=0.02, probe=self.probe)
        if is_input_dependent(model):  # over the fixed sample of images, not one blank image
            result = measure_over_inputs(model, self.cost_inputs(), self.target, **options)
        else:
            result = measure_safely(model, self.target, input_shape=shape, **options)
        self.cache.put(self.latency_key(arch, model), self.fingerprint, self.target, result)
        return result

    def score(
        self,
        arch,
        should_measure: Callable[[float, float | None], bool] | None = None,
        while_measuring: Callable[[], AbstractContextManager] = nullcontext,
    ) -> Score:
        """Accuracy, cost and latency: cached, else measured, unless ``should_measure(accuracy,
        predicted_ms)`` says the prediction is enough. A candidate scored before (and measured, when
        measuring is asked for) is not scored again. The measurement runs inside
        ``while_measuring()`` (a campaign's background writer pauses there)."""
        known = self._scores.get(arch.arch_hash())
        if known is not None and (known.measured is not None or should_measure is not None):
            return dataclasses.replace(known, cached=True, timings={})
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        model = self.build(arch)
        accuracy = classification_accuracy(model, self.val_data, device=self.eval_device)["accuracy"]
        t1 = time.perf_counter()
        gflops, params_m, extra = self.costs(model, arch)
        t2 = time.perf_counter()
        timings.update(evaluate=t1 - t0, cost=t2 - t1)
        score = Score(
            accuracy=accuracy, gflops=gflops, params_m=params_m, predicted_ms=self.predict(arch), extra=extra
        )
        cached = self.cached_latency(arch, model)
        if cached is not None:
            score.measured, score.cached = cached, True
        elif should_measure is None or should_measure(accuracy, score.predicted_ms):
            with while_measuring():  # the time to get there (a writer finishing its job) is not measuring
                t3 = time.perf_counter()
                score.measured = self.measure(arch, model)
                timings["measure"] = time.perf_counter() - t3
        score.timings = timings
        self._scores[arch.arch_hash()] = score
        return score


def resolve_eval_device(spec: str, target: Target) -> torch.device:
    """Where candidates' accuracy is computed: ``auto`` is the target's device (a CUDA target's GPU
    is there and idle between measurements; a CPU target's machine may have no GPU), else as
    ``resolve_device`` reads ``--eval-device``. ``UserError`` for a device this machine lacks."""
    from nas.training.devices import resolve_device

    if spec == "auto":
        target.require_available()
        return target.torch_device
    return resolve_device(spec, flag="--eval-device")


def make_scorer(
    space,
    *,
    target: str,
    workspace: str,
    cache_url: str | None = None,
    supernet: str | None = None,
    data: str | None = None,
    predictor: str | None = None,
    measure_budget_s: float = 2.0,
    weights: str | None = None,
    eval_device: str = "auto",
    val_subset: int | None = None,
) -> Scorer:
    """The scorer a campaign over ``space`` needs: supernet weights (psvit) or a timm model with
    ``weights`` (timm; default: the space's ``weights:``), frozen under ``workspace``. Accuracy is
    computed on ``eval_device`` (``resolve_eval_device``), on the validation split or its seeded
    class-balanced ``val_subset``."""
    from nas.hardware.cache import ResultCache, default_url
    from nas.hardware.fingerprint import fingerprint
    from nas.hardware.target import Target

    tgt = Target.parse(target)
    device = resolve_eval_device(eval_device, tgt)
    shared = dict(
        target=tgt,
        fingerprint=fingerprint(tgt),
        cache=ResultCache(cache_url or default_url(workspace)),
        measure_budget_s=measure_budget_s,
        eval_device=device,
    )
    if predictor:
        from nas.hardware.predictor import LatencyPredictor

        shared["predictor"] = LatencyPredictor.load(predictor, expect=shared["fingerprint"], target=tgt)
    candidates = family_of(space).candidates(
        space, workspace=workspace, device=device, supernet=supernet, weights=weights, data=data,
        val_subset=val_subset,
    )  # fmt: skip
    return Scorer(candidates, **shared)
