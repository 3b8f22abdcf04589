"""Token pooling by clustering (Token Pooling, Marin et al. 2023 WACV).

Tokens are clustered into `k` groups by k-means, k-medoids, or weighted k-medoids (weights =
token significance, e.g. class attention), and each group is replaced by its weighted mean.
Everything is batched: assignments come from `[B, N, k]` distance tables and updates from one-hot
matrix products, so the only Python loop is over the fixed number of iterations. The start is
deterministic: `k` evenly spaced tokens, which on a patch sequence are spread over the image.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nas.ops.small_work import register_constants, serial, shape_constants

METHODS = ("kmeans", "kmedoids")


def _sq_dist(x: Tensor, y: Tensor) -> Tensor:
    """Squared Euclidean distances `[B, N, M]` by the matmul expansion (no `[B, N, M, C]` tensor)."""
    d = (x * x).sum(-1, keepdim=True) - 2 * x @ y.transpose(1, 2) + (y * y).sum(-1).unsqueeze(1)
    return d.clamp_min_(0)


def _spread(n: int, k: int, device: torch.device) -> Tensor:
    if not 1 <= k <= n:
        raise ValueError(f"cannot cluster {n} tokens into k={k} groups: need 1 <= k <= {n}")
    return shape_constants("cluster_spread", device, n, k)[0]


def _spread_constants(device: torch.device, n: int, k: int) -> tuple[Tensor]:
    return (torch.linspace(0, n - 1, k, device=device).round().long(),)


def _eye_constants(device: torch.device, n: int) -> tuple[Tensor]:
    return (torch.eye(n, dtype=torch.bool, device=device),)


register_constants("cluster_spread", _spread_constants)
register_constants("cluster_eye", _eye_constants)


def _onehot(assign: Tensor, k: int, dtype: torch.dtype) -> Tensor:
    """`F.one_hot(assign, k).to(dtype)` in one scatter: `one_hot` also checks the range of `assign`
    with two reductions and builds int64 first, which at small sizes cost more than the step."""
    return assign.new_zeros(*assign.shape, k, dtype=dtype).scatter_(-1, assign.unsqueeze(-1), 1)


def _weighted(onehot: Tensor, weights: Tensor | None) -> Tensor:
    """Each token's one-hot row `[B, N, k]` times its weight `[B, N]` (unchanged without weights)."""
    return onehot if weights is None else onehot * weights.unsqueeze(-1)


@torch.no_grad()
def kmeans(x: Tensor, k: int, iters: int = 5, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Weighted k-means of `x [B, N, C]`: returns `(assign [B, N], centres [B, k, C])`.

    `iters` Lloyd updates, then a final assignment so that every token is with its nearest centre.
    A cluster that empties keeps its previous centre.
    """
    centres = x[:, _spread(x.shape[1], k, x.device)]
    for _ in range(iters):
        w = _weighted(_onehot(_sq_dist(x, centres).argmin(-1), k, x.dtype), weights)  # [B, N, k]
        total = w.sum(1).unsqueeze(-1)  # [B, k, 1]
        centres = torch.where(total > 0, (w.transpose(1, 2) @ x) / total.clamp_min(1e-12), centres)
    return _sq_dist(x, centres).argmin(-1), centres


@torch.no_grad()
def kmedoids(x: Tensor, k: int, iters: int = 5, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(Weighted) k-medoids of `x [B, N, C]`: returns `(assign [B, N], medoids [B, k])` (token indices).

    Alternating updates: assign to the nearest medoid, then make each cluster's medoid the member
    with the least weighted distance to the other members (on a tie, the first). A cluster that
    empties keeps its medoid.

    The distance table is made exactly symmetric with an exactly zero diagonal: the matmul
    expansion leaves rounding noise there (amplified by the square root), and the two members of a
    two-token cluster tie exactly (each is at distance d from the other), so that noise, not the
    data, would pick the medoid (and differently on another runtime, e.g. ONNX Runtime).
    """
    b, n, _ = x.shape
    dist = _sq_dist(x, x).sqrt_()
    dist = ((dist + dist.transpose(1, 2)) * 0.5).masked_fill(shape_constants("cluster_eye", x.device, n)[0], 0.0)
    medoids = _spread(n, k, x.device).expand(b, k)
    for _ in range(iters):
        assign = dist.gather(2, medoids.unsqueeze(1).expand(b, n, k)).argmin(-1)
        onehot = _onehot(assign, k, x.dtype)  # [B, N, k]
        weighted = _weighted(onehot, weights)
        member = onehot.bool()
        cost = dist @ weighted  # [B, N candidates, k]: weighted distance to each cluster's members
        best = cost.masked_fill(~member, float("inf")).argmin(1)  # [B, k]
        medoids = torch.where(member.any(1), best, medoids)
    return dist.gather(2, medoids.unsqueeze(1).expand(b, n, k)).argmin(-1), medoids


def cluster_pool(x: Tensor, k: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
    """``cluster_pool_assign`` (same arguments) without the assignment: ``(tokens, sizes)``."""
    return cluster_pool_assign(x, k, *args, **kwargs)[:2]


def cluster_pool_assign(
    x: Tensor,
    k: int,
    method: str = "kmedoids",
    iters: int = 5,
    size: Tensor | None = None,
    weights: Tensor | None = None,
    num_prefix: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """Cluster the non-prefix tokens into `k` and replace each cluster by its weighted mean.

    Weights (for clustering and for the means) are size times `weights [B, N - num_prefix]` when
    given; the new sizes are the summed sizes. Returns `([B, num_prefix + k, C], [B, num_prefix + k, 1],
    assign [B, N - num_prefix])`: the cluster of each non-prefix input token, for callers that
    follow token positions through the pooling.
    """
    if method not in METHODS:
        raise ValueError(f"clustering method {method!r} is not one of {METHODS}")
    with serial(x.numel()):  # a chain of small ops at small batch: one thread
        return _cluster_pool_assign(x, k, method, iters, size, weights, num_prefix)


def _cluster_pool_assign(
    x: Tensor, k: int, method: str, iters: int, size: Tensor | None, weights: Tensor | None, num_prefix: int
) -> tuple[Tensor, Tensor, Tensor]:
    p = num_prefix
    tokens = x[:, p:]
    sizes = x.new_ones(x.shape[0], x.shape[1], 1) if size is None else size
    w = sizes[:, p:, 0] if weights is None else sizes[:, p:, 0] * weights
    if method == "kmeans":
        assign, centres = kmeans(tokens.detach(), k, iters, w)
    else:
        assign, medoids = kmedoids(tokens.detach(), k, iters, w)
        centres = tokens.gather(1, medoids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    onehot = _onehot(assign, k, x.dtype).transpose(1, 2)  # [B, k, n]
    weighted = onehot * w.unsqueeze(1)
    total = weighted.sum(-1, keepdim=True)  # [B, k, 1]
    means = (weighted @ tokens) / total.clamp_min(1e-12)
    pooled = torch.where(total > 0, means, centres)  # an empty cluster (duplicate tokens) keeps its centre
    new_size = torch.cat([sizes[:, :p], onehot @ sizes[:, p:]], dim=1)
    return torch.cat([x[:, :p], pooled], dim=1), new_size, assign
