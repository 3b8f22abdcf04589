"""Accuracy of a classifier on a dataset: batched, inference mode, no shuffling, on the model's device."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset


@torch.inference_mode()
def classification_accuracy(
    model: nn.Module, data: Dataset, batch_size: int = 256, device: torch.device | str | None = None
) -> dict[str, float]:
    """``{"accuracy", "loss", "count"}`` of ``model`` (put in eval mode, restored after) on ``data``.

    ``device``: where the model is; each batch is moved there (the data stays where it is, in host
    memory for a large split). None: the batches are used where they are.
    """
    was_training = model.training
    model.eval()
    correct, loss, count = 0, 0.0, 0
    try:
        for x, y in _batches(data, batch_size):
            if device is not None:
                x, y = x.to(device), y.to(device)
            logits = model(x)
            correct += (logits.argmax(-1) == y).sum().item()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            count += len(y)
    finally:
        model.train(was_training)
    return {"accuracy": correct / max(count, 1), "loss": loss / max(count, 1), "count": count}


def _batches(data: Dataset, batch_size: int):
    """Tensor datasets are sliced directly (no per-item collation); others go through a loader."""
    if isinstance(data, TensorDataset):
        x, y = data.tensors[:2]
        for start in range(0, len(y), batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]
    else:
        yield from DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0)
