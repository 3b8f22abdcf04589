"""Scoring one candidate: accuracy, FLOPs, params and latency on the target.

``Scorer`` holds what every trial of a campaign shares (the data, the weights, the target, the
latency cache) and turns an architecture into a ``Score``. Two families:

- ``SupernetScorer``: a PSViT architecture evaluated with weights inherited from the supernet;
  its latency is that of the extracted stand-alone subnet (no supernet machinery in the timing).
- ``TimmScorer``: a timm ViT patched with a reduction schedule, evaluated with the space's weights.

Latency is measured unless the campaign's policy says the prediction is enough (a candidate
clearly over the budget or off the front); then the predictor's estimate stands in, and the
score says so. Measurements go through the shared
result cache, so an architecture is never measured twice on one machine and target, unless its
cached latency was flagged noisy: that one is measured again (a later session may be quieter).
A reference probe (``nas.hardware.measure.ReferenceProbe``, its baseline taken at the scorer's first
measurement) is timed around every measurement; ``latency_noisy`` and ``latency_probe_ratio`` in
the metrics say how far the number can be trusted.

Accuracy is computed on the campaign's eval device (``--eval-device``): the supernet or base
model is moved there once, each validation batch as it is used. Latency is still measured on the
target, whatever the eval device.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from nas.arch import ArchConfig, TimmArch
from nas.errors import UserError
from nas.evaluation import classification_accuracy
from nas.hardware.cache import ResultCache
from nas.hardware.fingerprint import Fingerprint
from nas.hardware.flops import flops, params
from nas.hardware.measure import MeasureResult, ReferenceProbe, measure_safely
from nas.hardware.target import Target
from nas.ops import timm_patch


@dataclass
class Score:
    accuracy: float
    gflops: float
    params_m: float
    measured: MeasureResult | None = None  # None: not measured (predicted only)
    predicted_ms: float | None = None
    cached: bool = False
    timings: dict[str, float] = field(default_factory=dict)

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
        out = {"val_accuracy": self.accuracy, "gflops": self.gflops, "params_m": self.params_m}
        if self.latency_ms is not None:
            out["latency_ms"] = self.latency_ms
        if self.measured is not None and self.measured.ok:
            lat = self.measured.latency
            out.update(latency_p90_ms=lat.p90_ms, latency_p10_ms=lat.p10_ms, latency_cv=lat.cv)
            # 1.0: every attempt was noisy (nas.hardware.measure.noisy_reason); rank it with care
            out.update(latency_noisy=float(lat.noisy), latency_attempts=float(lat.attempts))
            if lat.probe_ratio is not None:
                out["latency_probe_ratio"] = lat.probe_ratio
        if self.predicted_ms is not None:
            out["predicted_latency_ms"] = self.predicted_ms
        out.update({f"time_{k}_s": v for k, v in self.timings.items()})
        return out


class Scorer(ABC):
    """What all trials of a campaign share; ``score`` is called once per candidate."""

    data_spec: str | None = None  # the validation data's spec, for the campaign's record
    weights_hash: str | None = None  # the weights' file hash, for the campaign's record
    weights_tag = "weights_hash"  # the tag it is recorded under
    probe: ReferenceProbe | None = None  # made at the first measurement: its baseline is the session's start

    def __init__(
        self,
        val_data,
        target: Target,
        fingerprint: Fingerprint,
        cache: ResultCache,
        predictor=None,
        measure_budget_s: float = 2.0,
        eval_device: torch.device | str = "cpu",
    ):
        self.val_data = val_data
        self.target, self.fingerprint, self.cache = target, fingerprint, cache
        self.predictor = predictor
        self.measure_budget_s = measure_budget_s
        self.eval_device = torch.device(eval_device)  # where ``build`` puts a candidate to score it
        self._scores: dict[str, Score] = {}  # by arch hash: samplers propose the same candidate again

    @abstractmethod
    def build(self, arch) -> nn.Module:
        """The stand-alone network whose latency is measured."""

    def image_size(self, arch) -> int:
        return self.target.resolution or arch.image_size

    def predict(self, arch) -> float | None:
        return None if self.predictor is None else self.predictor.predict(arch)

    def cost(self, model: nn.Module, arch) -> tuple[float, float]:
        """(GFLOPs, params in millions) at batch 1 and the target's resolution (on the eval device,
        where ``model`` is: the counts do not depend on it)."""
        x = torch.zeros((1, *self.target.input_shape(self.image_size(arch))[1:]), device=self.eval_device)
        return flops(model, x) / 1e9, params(model) / 1e6

    def cached_latency(self, arch) -> MeasureResult | None:
        """The cached result, unless it was flagged noisy: that one is measured again (and replaced)."""
        cached = self.cache.get(arch.arch_hash(), self.fingerprint, self.target)
        if cached is not None and cached.ok and cached.latency.noisy:
            return None
        return cached

    def measure(self, arch, model: nn.Module) -> MeasureResult:
        """Measured with the scorer's reference probe around it, re-measured (bounded) when noisy."""
        if self.probe is None:
            self.probe = ReferenceProbe(self.target)
        shape = self.target.input_shape(self.image_size(arch))
        result = measure_safely(
            model, self.target, input_shape=shape, time_budget_s=self.measure_budget_s, rel_precision=0.02,
            probe=self.probe,
        )  # fmt: skip
        self.cache.put(arch.arch_hash(), self.fingerprint, self.target, result)
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
        gflops, params_m = self.cost(model, arch)
        t2 = time.perf_counter()
        timings.update(evaluate=t1 - t0, cost=t2 - t1)
        score = Score(accuracy=accuracy, gflops=gflops, params_m=params_m, predicted_ms=self.predict(arch))
        cached = self.cached_latency(arch)
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


class SupernetScorer(Scorer):
    """PSViT architectures with weights inherited from a trained supernet.

    The extracted subnet's outputs equal the supernet's for its architecture, so accuracy and
    latency are both taken on the stand-alone network that export would write.
    """

    weights_tag = "supernet_hash"

    def __init__(self, supernet, **kwargs):
        super().__init__(**kwargs)
        self.supernet = supernet.to(self.eval_device)  # subnets are extracted where the supernet is

    def build(self, arch: ArchConfig) -> nn.Module:
        return self.supernet.extract(arch).eval()


class TimmScorer(Scorer):
    """A timm ViT patched in place with the candidate's reduction schedule."""

    def __init__(self, base_model: nn.Module, **kwargs):
        super().__init__(**kwargs)
        self.base_model = base_model.to(self.eval_device)  # each candidate is a copy, made there

    def build(self, arch: TimmArch) -> nn.Module:
        model = copy.deepcopy(self.base_model).eval()
        timm_patch.apply(model, arch.schedule)
        return model


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
    ``weights`` (timm; default: the space's ``weights:``). Accuracy is computed on ``eval_device``
    (``resolve_eval_device``), on the validation split or its seeded class-balanced ``val_subset``."""
    from nas.data import load_splits
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
    if space.family == "timm":
        from nas.timm_base import timm_base_model, weights_file
        from nas.weights import file_hash

        splits = load_splits(data or "digits", space.spec.image_size, val_subset=val_subset)
        scorer = TimmScorer(base_model=timm_base_model(space, weights), val_data=splits.val, **shared)
        scorer.data_spec = splits.spec.spec
        path = weights_file(space, weights)
        scorer.weights_hash = None if path is None else file_hash(path)
        return scorer
    if weights:
        raise UserError(f"space {space.name} is a supernet space: --weights is for timm spaces, pass --supernet")
    if not supernet:
        raise UserError(
            f"space {space.name} is a supernet space: pass --supernet CHECKPOINT (from vitnas train-supernet)"
        )
    from nas.supernet import load_checkpoint
    from nas.supernet.checkpoint import WEIGHTS, resolve
    from nas.weights import file_hash

    net, meta = load_checkpoint(supernet, space)
    spec, seed = data or meta["data"]["spec"], meta["data"].get("seed")
    splits = load_splits(spec, space.spec.image_size, seed=seed, val_subset=val_subset)
    scorer = SupernetScorer(supernet=net.eval(), val_data=splits.val, **shared)
    scorer.data_spec = splits.spec.spec
    scorer.weights_hash = file_hash(resolve(supernet) / WEIGHTS)
    return scorer
