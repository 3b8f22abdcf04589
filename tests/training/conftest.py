"""Shared checks of the training tests."""

from __future__ import annotations

import pytest
import torch


def _comparable(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The tensor without the key part of an attention's qkv bias.

    Softmax ignores a constant added to every logit of a row, and a key bias adds exactly that
    (q . b_k), so its true gradient is zero and what it gets is rounding noise, which Adam's
    normalisation blows up to full-size steps of either sign. It never changes an output, so runs
    that differ only in summation order legitimately disagree there and nowhere else.
    """
    if name.endswith("attn.qkv.bias"):
        dim = tensor.shape[0] // 3
        return torch.cat([tensor[:dim], tensor[2 * dim :]])
    return tensor


@pytest.fixture
def max_weight_diff():
    def diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        assert a.keys() == b.keys()
        return max((_comparable(k, a[k]) - _comparable(k, b[k])).abs().max().item() for k in a)

    return diff
