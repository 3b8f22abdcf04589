"""Pooling between stages: fewer tokens and a new embedding dim.

Strided convolutions (1D over the token sequence, 2D over the patch grid), average pooling, or any
token reduction of this package (ToMe merging, k-medoids clustering, EViT-style fusion) followed by
a linear projection. Counts are non-prefix tokens; prefix tokens (class, registers) are never
pooled, only projected. Strided kinds use `stride = ceil(in / out)` with zero padding on the right
(and bottom) up to exactly `out` windows; `check_pool` rejects counts that would leave a window
made only of padding. Every function returns `(x, size)`; for the strided kinds a `None` size stays
`None` (equal windows), otherwise a window's size is the sum of its sizes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nas.ops.cluster import cluster_pool
from nas.ops.evit import fuse_topk
from nas.ops.tome import bipartite_soft_matching

KINDS = ("conv1d", "conv2d", "avg", "tome", "cluster", "evit")


def pool_stride(in_tokens: int, out_tokens: int) -> int:
    """The stride (and default kernel) that takes `in_tokens` to `out_tokens`: ceil(in / out)."""
    return math.ceil(in_tokens / out_tokens)


def _grid_side(tokens: int, what: str) -> int:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"conv2d pooling needs a square grid, but {what} is {tokens} tokens (not a square)")
    return side


def check_pool(kind: str, in_tokens: int, out_tokens: int) -> None:
    """Raise ValueError, naming the numbers, when `kind` cannot take `in_tokens` to `out_tokens`."""
    if kind not in KINDS:
        raise ValueError(f"pooling kind {kind!r} is not one of {KINDS}")
    if not 1 <= out_tokens <= in_tokens:
        raise ValueError(
            f"{kind} pooling cannot go from {in_tokens} to {out_tokens} tokens: need 1 <= out <= in"
        )
    if kind not in ("conv1d", "conv2d", "avg"):
        return
    n, m = in_tokens, out_tokens
    if kind == "conv2d":
        n, m = _grid_side(in_tokens, "the input"), _grid_side(out_tokens, "the output")
    stride = pool_stride(n, m)
    if math.ceil(n / stride) != m:
        per = "per side " if kind == "conv2d" else ""
        raise ValueError(
            f"{kind} pooling cannot go from {in_tokens} to {out_tokens} tokens: stride ceil({n}/{m}) = {stride} "
            f"gives {math.ceil(n / stride)} windows {per}and the last {m - math.ceil(n / stride)} would be padding only"
        )


def _project_prefix(prefix: Tensor, weight: Tensor | None, bias: Tensor | None, out_dim: int) -> Tensor:
    if weight is not None:
        return F.linear(prefix, weight, bias)
    if prefix.shape[1] and prefix.shape[-1] != out_dim:
        raise ValueError(
            f"prefix tokens have dim {prefix.shape[-1]} but the pooled tokens {out_dim}: pass prefix_weight"
        )
    return prefix


def _fit(t: Tensor, length: int, dims: int) -> Tensor:
    """Right-pad with zeros (or crop) the last `dims` dims of `t` to `length`."""
    for d in range(1, dims + 1):
        extra = length - t.shape[-d]
        if extra < 0:
            t = t.narrow(-d, 0, length)
        elif extra > 0:
            t = F.pad(t, (0, 0) * (d - 1) + (0, extra))
    return t


def conv1d_pool(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: int,
    out_tokens: int,
    num_prefix: int = 1,
    prefix_weight: Tensor | None = None,
    prefix_bias: Tensor | None = None,
    size: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Strided conv (`weight [out_dim, in_dim, K]`) over the non-prefix sequence, exactly `out_tokens` out."""
    p, k = num_prefix, weight.shape[-1]
    length = (out_tokens - 1) * stride + k
    y = F.conv1d(_fit(x[:, p:].transpose(1, 2), length, 1), weight, bias, stride).transpose(1, 2)
    out = torch.cat([_project_prefix(x[:, :p], prefix_weight, prefix_bias, y.shape[-1]), y], dim=1)
    if size is None:
        return out, None
    windows = F.avg_pool1d(_fit(size[:, p:].transpose(1, 2), length, 1), k, stride) * k
    return out, torch.cat([size[:, :p], windows.transpose(1, 2)], dim=1)


def conv2d_pool(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: int,
    out_tokens: int,
    num_prefix: int = 1,
    prefix_weight: Tensor | None = None,
    prefix_bias: Tensor | None = None,
    size: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Strided conv (`weight [out_dim, in_dim, K, K]`) over the square patch grid (row-major tokens)."""
    p, k = num_prefix, weight.shape[-1]
    b, n, c = x.shape
    side, out_side = _grid_side(n - p, "the input"), _grid_side(out_tokens, "the output")
    length = (out_side - 1) * stride + k

    def grid(t: Tensor) -> Tensor:
        return _fit(t[:, p:].transpose(1, 2).reshape(b, t.shape[-1], side, side), length, 2)

    y = F.conv2d(grid(x), weight, bias, stride).flatten(2).transpose(1, 2)
    out = torch.cat([_project_prefix(x[:, :p], prefix_weight, prefix_bias, y.shape[-1]), y], dim=1)
    if size is None:
        return out, None
    windows = F.avg_pool2d(grid(size), k, stride) * (k * k)
    return out, torch.cat([size[:, :p], windows.flatten(2).transpose(1, 2)], dim=1)


def avg_pool(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    out_tokens: int,
    num_prefix: int = 1,
    size: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Size-weighted average over windows of `ceil(n / out_tokens)` tokens, then `F.linear(weight, bias)` on all tokens."""
    p = num_prefix
    b, n, c = x.shape
    s = pool_stride(n - p, out_tokens)
    sizes = x.new_ones(b, n - p, 1) if size is None else size[:, p:]
    num = _fit((x[:, p:] * sizes).transpose(1, 2), out_tokens * s, 1).view(b, c, out_tokens, s).sum(-1)
    den = _fit(sizes.transpose(1, 2), out_tokens * s, 1).view(b, 1, out_tokens, s).sum(-1)
    pooled = torch.cat([x[:, :p], (num / den).transpose(1, 2)], dim=1)
    new_size = None if size is None else torch.cat([size[:, :p], den.transpose(1, 2)], dim=1)
    return F.linear(pooled, weight, bias), new_size


def tome_pool(
    x: Tensor, out_tokens: int, size: Tensor | None = None, num_prefix: int = 1
) -> tuple[Tensor, Tensor | None]:
    """Merge in bipartite rounds (at most half the tokens a round) down to `out_tokens`; the tokens are the metric."""
    while x.shape[1] - num_prefix > out_tokens:
        x, size = bipartite_soft_matching(x, x.shape[1] - num_prefix - out_tokens, num_prefix).merge(x, size)
    return x, size


def evit_pool(
    x: Tensor, out_tokens: int, size: Tensor | None = None, num_prefix: int = 1
) -> tuple[Tensor, Tensor | None]:
    """Keep `out_tokens - 1` tokens and fuse the rest into one, EViT-style.

    A pooling layer has no attention of its own, so the score is class attention with identity
    projections: softmax over tokens of `ref · x_j / sqrt(C)`, where `ref` is the class token (the
    mean token when there is no prefix).
    """
    p = num_prefix
    if x.shape[1] - p <= out_tokens:
        return x, size
    ref = x[:, :1] if p else x.mean(dim=1, keepdim=True)
    score = ((x[:, p:] @ ref.transpose(1, 2)).squeeze(-1) * x.shape[-1] ** -0.5).softmax(dim=-1)
    return fuse_topk(x, score, out_tokens - 1, size, p)


class TokenPool(nn.Module):
    """Inter-stage pooling module: `forward(x, size=None) -> (x, size)` with `out_tokens` non-prefix tokens and `out_dim`.

    conv1d/conv2d: kernel = stride = ceil(in / out) (per side for conv2d), prefix tokens through
    their own Linear; avg: size-weighted window means then a Linear; tome/cluster/evit: the
    reduction (ToMe rounds, k-medoids, EViT-style fusion; see `evit_pool` for its score) then a Linear.
    """

    def __init__(
        self, kind: str, in_dim: int, out_dim: int, in_tokens: int, out_tokens: int, num_prefix: int = 1
    ) -> None:
        super().__init__()
        check_pool(kind, in_tokens, out_tokens)
        self.kind, self.in_tokens, self.out_tokens, self.num_prefix = kind, in_tokens, out_tokens, num_prefix
        if kind == "conv1d":
            self.stride = pool_stride(in_tokens, out_tokens)
            self.conv = nn.Conv1d(in_dim, out_dim, self.stride, self.stride)
        elif kind == "conv2d":
            self.stride = pool_stride(math.isqrt(in_tokens), math.isqrt(out_tokens))
            self.conv = nn.Conv2d(in_dim, out_dim, self.stride, self.stride)
        self.proj = nn.Linear(in_dim, out_dim)  # all tokens for avg and the reductions; prefix only for convs

    def forward(self, x: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        p = self.num_prefix
        if x.shape[1] - p != self.in_tokens:
            raise ValueError(f"TokenPool expects {self.in_tokens} non-prefix tokens, got {x.shape[1] - p}")
        if self.kind in ("conv1d", "conv2d"):
            pool = conv1d_pool if self.kind == "conv1d" else conv2d_pool
            w, b = self.conv.weight, self.conv.bias
            return pool(x, w, b, self.stride, self.out_tokens, p, self.proj.weight, self.proj.bias, size)
        if self.kind == "avg":
            return avg_pool(x, self.proj.weight, self.proj.bias, self.out_tokens, p, size)
        if self.kind == "tome":
            x, size = tome_pool(x, self.out_tokens, size, p)
        elif self.kind == "cluster":
            x, size = cluster_pool(x, self.out_tokens, "kmedoids", size=size, num_prefix=p)
        else:
            x, size = evit_pool(x, self.out_tokens, size, p)
        return self.proj(x), size
