"""``vitnas profile`` for a model whose work depends on its input (an adaptive architecture).

Its FLOPs and latency are taken over a fixed, seeded sample of validation images
(``nas.hardware.input_cost``) instead of one blank image: ``flops`` is the mean per image,
``flops_p90`` beside it, and the latency the mean per batch over the images with p10/p90 over them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from nas.errors import UserError
from nas.hardware.input_cost import SAMPLES, fixed_sample, input_flops, measure_over_inputs
from nas.hardware.profile import Model, Profile
from nas.hardware.target import Target


@dataclass(frozen=True)
class InputProfile(Profile):
    """A ``Profile`` whose FLOPs and latency are over a sample of images."""

    flops_p90: int = 0
    samples: int = 0
    data: str = ""
    inputs_hash: str = ""

    def to_dict(self) -> dict:
        extra = {"flops_p90": self.flops_p90, "gflops_p90": self.flops_p90 / 1e9, "samples": self.samples,
                 "data": self.data, "inputs_hash": self.inputs_hash}  # fmt: skip
        return {**super().to_dict(), **extra}

    def row(self) -> dict:
        row = super().row()
        row["GFLOPs"] = (
            f"{self.gflops:.4g} mean, {self.flops_p90 / 1e9:.4g} p90 ({self.samples} {self.data} images)"
        )
        return row


def profile_over_inputs(
    model: Model,
    target: Target | None,
    *,
    time_budget_s: float = 3.0,
    data: str = "digits",
    samples: int = SAMPLES,
) -> InputProfile:
    """Parameters, FLOPs over ``samples`` validation images of ``data`` and latency over them."""
    from nas.data import load_splits
    from nas.hardware.flops import params

    chw = model.chw
    if target is not None and target.resolution not in (None, chw[-1]):
        raise UserError(
            f"{model.name} decides per patch of a {chw[-1]}px image: resolution={target.resolution} cannot apply"
        )
    images = fixed_sample(load_splits(data, chw[-1]).val, samples)
    if tuple(images.shape[1:]) != tuple(chw):
        raise UserError(f"{model.name} takes {chw} images, data {data} gives {tuple(images.shape[1:])}")
    module = model.module.eval()
    counted = input_flops(module, images)
    result = InputProfile(
        model=model.name, input_shape=chw, params=params(module), flops=round(counted.mean * 1e9),
        flops_p90=round(counted.p90 * 1e9), samples=counted.samples, data=data, inputs_hash=counted.inputs_hash,
    )  # fmt: skip
    if target is None:
        return result
    measured = measure_over_inputs(module, images, target, time_budget_s=time_budget_s)
    if not measured.ok:
        raise UserError(f"{model.name}: latency measurement failed: {measured.error}")
    return replace(result, target=str(target), latency=measured.latency)
