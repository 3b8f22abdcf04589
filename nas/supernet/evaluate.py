"""Accuracy of a subnet with weights inherited from the supernet: what search scores candidates by.

The arch's slices are taken once, then the split runs through in large batches under
``torch.inference_mode`` (no autograd bookkeeping); tensor datasets are sliced directly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from nas.arch import ArchConfig
from nas.data import DataSpec, Splits, load_splits
from nas.evaluation import classification_accuracy
from nas.supernet import blocks
from nas.supernet.supernet import Supernet


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    loss: float
    count: int


def evaluate(
    checkpoint: str | Path | Supernet,
    arch: ArchConfig,
    data: Dataset | Splits | DataSpec | str | None = None,
    split: str = "val",
    batch_size: int = 512,
) -> EvalResult:
    """Top-1 accuracy and mean cross-entropy of ``arch`` with inherited weights on a data split.

    ``checkpoint``: a loaded ``Supernet`` or a checkpoint path (loaded once and cached).
    ``data``: a dataset, a ``Splits`` (``split`` picks the part), a data spec, or None for the
    data the checkpoint was trained on.
    """
    net, meta = (checkpoint, None) if isinstance(checkpoint, Supernet) else _load(*_identity(checkpoint))
    dataset = _dataset(data, split, net.space.spec.image_size, meta)
    with torch.inference_mode():
        bound = _Bound(arch, blocks.ParamTree(net.sliced_state(arch)))
    result = classification_accuracy(bound, dataset, batch_size, device=net.head.weight.device)
    return EvalResult(result["accuracy"], result["loss"], result["count"])


class _Bound(nn.Module):
    """One arch's slices, taken once, as a model for ``classification_accuracy``."""

    def __init__(self, arch: ArchConfig, params: blocks.ParamTree):
        super().__init__()
        self.arch, self.params = arch, params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return blocks.forward_logits(self.arch, self.params, x)


def _identity(checkpoint: str | Path) -> tuple[str, float]:
    """A checkpoint's folder and its sidecar's mtime: a checkpoint rewritten by training reloads."""
    from nas.supernet.checkpoint import SIDECAR, resolve

    folder = resolve(checkpoint)
    return str(folder.resolve()), (folder / SIDECAR).stat().st_mtime


@functools.lru_cache(maxsize=2)
def _load(path: str, _mtime: float) -> tuple[Supernet, dict]:
    from nas.supernet.checkpoint import load_checkpoint

    net, meta = load_checkpoint(path)
    return net.eval(), meta


def _dataset(data, split: str, image_size: int, meta: dict | None) -> Dataset:
    if data is None:
        if meta is None:
            raise ValueError("evaluate needs data when given a Supernet rather than a checkpoint path")
        data = DataSpec.from_dict(meta["data"])
    if isinstance(data, (str, DataSpec)):
        data = _splits(
            data if isinstance(data, str) else data.spec,
            image_size,
            None if isinstance(data, str) else data.seed,
        )
    if isinstance(data, Splits):
        return getattr(data, split)
    return data


@functools.lru_cache(maxsize=4)
def _splits(spec: str, image_size: int, seed: int | None) -> Splits:
    return load_splits(spec, image_size, seed)
