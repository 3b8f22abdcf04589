"""FLOPs and parameters as fvcore counts them: one multiply-add is one FLOP.

fvcore skips `scaled_dot_product_attention` (what timm and nas.ops call for attention), so DeiT-Ti
would count 1.08 G instead of 1.26 G; `flops` adds a handle for it. Matmuls (ToMe matching, EViT
fusion, clustering, linear attention) are counted by fvcore's own handles; the element-wise,
indexing and sorting ops that token reduction adds are ignored explicitly, by name.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from math import prod
from typing import Any

import torch
from torch import nn

with warnings.catch_warnings():  # fvcore scripts a loss at import: torch's jit.script deprecation, not ours
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

# Ops that cost no multiply-adds worth counting (element-wise, shape, indexing, sorting, RNG).
IGNORED_OPS = (
    "aten::add", "aten::add_", "aten::sub", "aten::rsub", "aten::mul", "aten::mul_", "aten::div", "aten::div_",
    "aten::neg", "aten::log", "aten::exp", "aten::sqrt", "aten::sqrt_", "aten::pow", "aten::reciprocal",
    "aten::sigmoid", "aten::gelu", "aten::relu", "aten::silu", "aten::softmax", "aten::dropout", "aten::clamp",
    "aten::clamp_min", "aten::clamp_min_", "aten::sum", "aten::mean", "aten::amax", "aten::max", "aten::argmin",
    "aten::topk", "aten::sort", "aten::cumsum", "aten::nonzero", "aten::gather", "aten::scatter", "aten::scatter_",
    "aten::index_select", "aten::index_add_", "aten::index_put_", "aten::index_fill_", "aten::masked_fill", "aten::where", "aten::one_hot", "aten::eye",
    "aten::ones", "aten::ones_like", "aten::new_ones", "aten::zeros", "aten::zeros_like", "aten::new_zeros",
    "aten::arange", "aten::numel", "aten::linspace", "aten::round", "aten::any", "aten::norm",
    "aten::linalg_vector_norm", "aten::expand_as", "aten::type_as", "aten::fill_", "aten::constant_pad_nd",
    "aten::pad", "aten::avg_pool1d", "aten::avg_pool2d", "aten::scaled_dot_product_attention_math",
    "profiler::_record_function_enter_new", "profiler::_record_function_exit",
)  # fmt: skip


def sdpa_flop(inputs: list[Any], outputs: list[Any]) -> int:
    """q kᵀ and p v: B·H·N·S·(d + dv) multiply-adds (softmax and masks ignored, as for other element-wise ops)."""
    q, k, v = (get_shape(t) for t in inputs[:3])
    return prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def flop_analysis(model: nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor]) -> FlopCountAnalysis:
    """An fvcore analysis with the handles above; use it for per-module or per-op breakdowns."""
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    analysis = FlopCountAnalysis(model, inputs)
    analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop)
    analysis.set_op_handle(**dict.fromkeys(IGNORED_OPS))
    return analysis.uncalled_modules_warnings(False)


def flops(model: nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor]) -> int:
    """Total FLOPs (multiply-adds) of one forward of `model` on `inputs`, in eval mode, without gradients."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return int(flop_analysis(model, inputs).total())
    finally:
        model.train(training)


def params(model: nn.Module) -> int:
    """Number of parameters (shared parameters once)."""
    return sum(p.numel() for p in model.parameters())
