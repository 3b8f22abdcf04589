"""Cost of a model whose work depends on its input (AdaViT): FLOPs and latency over real images.

A zero image tells nothing about such a model: an adaptive ViT drops patches, heads and
sub-layers per image. A model says its cost depends on the input with ``input_dependent_cost =
True`` and a ``sample_flops(x) -> [B]`` method (each image's multiply-adds, as fvcore counts them;
``nas.ops.adavit_patch`` provides both). Its cost is then taken over a fixed, seeded sample of
validation images (``fixed_sample``): the mean and p90 of the per-image GFLOPs, and the latency of
running through the sample batch after batch (``measure_over_inputs``): each timed pass runs every
batch of the sample once, so the median pass over the number of batches is the mean latency over
the inputs, and each batch's own median time gives the p10/p90 over inputs. Results are keyed by
``inputs_hash`` so a cache never mixes samples.

This module knows no family: only the two attributes above.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from nas.hardware.measure import Latency, MeasureResult, measure_safely
from nas.hardware.target import Target

SAMPLES = 64  # images in the fixed sample (scorer and profile)
SEED = 0


def is_input_dependent(model: nn.Module) -> bool:
    return bool(getattr(model, "input_dependent_cost", False)) and callable(
        getattr(model, "sample_flops", None)
    )


def fixed_sample(data: Dataset, n: int = SAMPLES, seed: int = SEED) -> torch.Tensor:
    """``n`` images of ``data`` (all when it has fewer), chosen by a seeded permutation: the same
    images in every process and session."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[: min(n, len(data))]
    order = order.sort().values
    if isinstance(data, TensorDataset):
        return data.tensors[0][order].clone()
    return torch.stack([data[int(i)][0] for i in order])


def inputs_hash(images: torch.Tensor) -> str:
    """16 hex digits of SHA-256 over the images' shape, dtype and bytes."""
    x = images.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{tuple(x.shape)}:{x.dtype}".encode())
    digest.update(x.numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class InputFlops:
    """Per-image GFLOPs over a sample: mean, p90, extremes."""

    mean: float
    p90: float
    min: float
    max: float
    samples: int
    inputs_hash: str

    def metrics(self) -> dict[str, float]:
        return {
            "gflops_p90": self.p90,
            "gflops_min": self.min,
            "gflops_max": self.max,
            "cost_samples": float(self.samples),
        }


def input_flops(model: nn.Module, images: torch.Tensor, batch: int = 64) -> InputFlops:
    """``model.sample_flops`` over ``images`` (on the model's device), in chunks of ``batch``."""
    device = next(model.parameters()).device
    values = torch.cat(
        [model.sample_flops(images[i : i + batch].to(device)).cpu() for i in range(0, len(images), batch)]
    )
    g = values.double().numpy() / 1e9
    return InputFlops(
        float(g.mean()),
        float(np.percentile(g, 90)),
        float(g.min()),
        float(g.max()),
        len(g),
        inputs_hash(images),
    )


class CyclingInputs(nn.Module):
    """Runs ``model`` once over every batch of the fixed images, whatever it is called with, and
    times each batch (so a latency measurement times the model on real inputs)."""

    def __init__(self, model: nn.Module, images: torch.Tensor, batch: int):
        super().__init__()
        self.model, self.batch = model, batch
        self.register_buffer(
            "images", images[: len(images) - len(images) % batch] if len(images) >= batch else images
        )
        self.chunks = max(1, len(self.images) // batch)
        self.times: list[list[float]] = [[] for _ in range(self.chunks)]
        self.recording = False

    def forward(self, _x: torch.Tensor) -> torch.Tensor:
        out = None
        cuda = self.images.is_cuda
        for j in range(self.chunks):
            x = self.images[j * self.batch : (j + 1) * self.batch]
            t0 = time.perf_counter_ns()
            out = self.model(x)
            if cuda:
                torch.cuda.synchronize(self.images.device)
            if self.recording:
                self.times[j].append((time.perf_counter_ns() - t0) / 1e6)
        return out


def measure_over_inputs(model: nn.Module, images: torch.Tensor, target: Target, **kwargs) -> MeasureResult:
    """Latency per batch of ``target.batch`` images of ``images`` (see the module docstring):
    ``median_ms`` is the mean over the inputs (median over passes), ``p10_ms``/``p90_ms``/``mean_ms``
    are over the inputs (each batch's median over passes); a failure is returned as its reason."""
    wrapper = CyclingInputs(model, images, target.batch)
    wrapper.recording = True
    shape = (target.batch, *images.shape[1:])
    result = measure_safely(wrapper, target, input_shape=shape, **kwargs)
    if not result.ok:
        return result
    lat, k = result.latency, wrapper.chunks
    per_input = (
        np.array([np.median(t) for t in wrapper.times if t])
        if any(wrapper.times)
        else np.array([lat.median_ms / k])
    )
    p10, p90 = (float(v) for v in np.percentile(per_input, [10, 90]))
    scaled = dataclasses.replace(
        lat, median_ms=lat.median_ms / k, mean_ms=float(per_input.mean()), p10_ms=p10, p90_ms=p90,
        std_ms=float(per_input.std()), cv=float(per_input.std() / per_input.mean()) if per_input.mean() else 0.0,
    )  # fmt: skip
    return MeasureResult(ok=True, latency=scaled)


def cost_key(arch_hash: str, images: torch.Tensor, weights_hash: str | None) -> str:
    """The cache key of an input-dependent latency: the architecture, the inputs and the weights
    (which decide what runs)."""
    return f"{arch_hash}@{inputs_hash(images)}@{weights_hash or 'random'}"


__all__ = [
    "SAMPLES",
    "CyclingInputs",
    "InputFlops",
    "Latency",
    "cost_key",
    "fixed_sample",
    "input_flops",
    "inputs_hash",
    "is_input_dependent",
    "measure_over_inputs",
]
