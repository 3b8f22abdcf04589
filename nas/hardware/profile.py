"""What ``vitnas profile`` computes: parameters, GFLOPs and measured latency of one model.

The model is a vitnas architecture file (``arch.yaml``: a psvit subnet, or a timm model with its
reduction schedule) or a timm model by name, built without downloading anything and optionally
patched with a token-reduction schedule in the ``--reduce`` mini-grammar of
``nas.hardware.reduce_grammar``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import nn

from nas.arch import load_arch
from nas.errors import UserError
from nas.hardware.measure import Latency, measure
from nas.hardware.reduce_grammar import parse_reduce
from nas.hardware.target import Target


@dataclass(frozen=True)
class Profile:
    """Cost of one model: FLOPs at batch 1 (per image), latency at the target's batch."""

    model: str
    input_shape: tuple[int, int, int]  # C, H, W of one image
    params: int
    flops: int
    target: str | None = None
    latency: Latency | None = None

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "input_shape": list(self.input_shape),
            "params": self.params,
            "flops": self.flops,
            "gflops": self.gflops,
            "target": self.target,
            "latency": None if self.latency is None else self.latency.to_dict(),
        }

    def row(self) -> dict:
        """The columns ``vitnas profile`` prints."""
        row = {
            "model": self.model,
            "input": "x".join(map(str, self.input_shape)),
            "params_M": self.params / 1e6,
            "GFLOPs": self.gflops,
        }
        if self.latency is not None:
            lat = self.latency
            row.update(latency_ms=lat.median_ms, p10_ms=lat.p10_ms, p90_ms=lat.p90_ms, target=self.target)
        return row


class Model(NamedTuple):
    """A model to profile: a display name, the module, and one input image's (C, H, W)."""

    name: str
    module: nn.Module
    chw: tuple[int, int, int]


def load_model(arch: str | None = None, timm_name: str | None = None, reduce: str | None = None) -> Model:
    """An architecture file (built by its family, ``nas.families``) or a timm model name, with the
    reduction applied. ``reduce`` replaces a timm architecture's own schedule; psvit architectures
    carry theirs."""
    from nas.families import family_of
    from nas.families import timm as timm_family

    if (arch is None) == (timm_name is None):
        raise UserError("give exactly one of --arch FILE or --timm NAME")
    schedule = parse_reduce(reduce) if reduce else None
    suffix = f" [{reduce}]" if reduce else ""
    if timm_name is not None:
        model = timm_family.patch(timm_family.create(timm_name), schedule or {"kind": "none"}, timm_name)
        return Model(timm_name + suffix, model, tuple(model.pretrained_cfg.get("input_size", (3, 224, 224))))
    spec = load_arch(arch)
    family = family_of(spec)
    try:
        module = family.build(spec, reduce=schedule)
    except UserError as err:
        raise UserError(f"{arch}: {err}") from None
    return Model(f"{arch} ({spec.arch_hash()}){suffix}", module, family.input_chw(spec))


def profile(model: Model, target: Target | None = None, *, time_budget_s: float = 3.0) -> Profile:
    """Parameters and FLOPs (batch 1), and the latency on ``target`` unless it is None (at the
    target's resolution when it sets one)."""
    from nas.hardware.flops import flops, params  # fvcore: imported only when counting (slow, noisy import)

    if getattr(model.module, "input_dependent_cost", False):  # AdaViT: cost over real images
        from nas.hardware.input_profile import profile_over_inputs

        return profile_over_inputs(model, target, time_budget_s=time_budget_s)
    side = (target.resolution if target else None) or model.chw[-1]
    chw = (model.chw[0], side, side)
    x = torch.zeros(1, *chw)
    module = model.module.eval()
    try:
        with torch.inference_mode():
            module(x)
    except Exception as err:
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        raise UserError(f"{model.name} fails on input {tuple(x.shape)}: {reason}") from None
    result = Profile(model=model.name, input_shape=chw, params=params(module), flops=flops(module, x))
    if target is None:
        return result
    latency = measure(module, target, input_shape=(target.batch, *chw), time_budget_s=time_budget_s)
    return replace(result, target=str(target), latency=latency)
