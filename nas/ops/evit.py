"""Keep the attentive tokens, fuse the rest (EViT, Liang et al. 2022 ICLR).

The non-prefix tokens are ranked by the class token's attention (mean over heads); the top
`ceil(keep_rate * n)` stay, in their original order, and the others are fused into one extra
token appended last. The fused token is the attention-weighted average `sum w_i x_i / sum w_i`
(w = class attention, times size when tokens carry sizes), so it stays on the scale of the tokens
it replaces; the reference code takes the unnormalised sum `sum w_i x_i`, which shrinks it by the
attention mass of the fused tokens. The fused token's size is the sum of the fused sizes.

At small batch it runs on one thread (`nas.ops.small_work.serial`), builds its rows from cached index
constants and writes every output row with one gather; outputs are bit-for-bit unchanged by that.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from nas.ops.small_work import register_constants, serial, shape_constants


def evit_keep(tokens: int, keep_rate: float) -> int:
    """Non-prefix tokens kept out of `tokens`: ceil(keep_rate * tokens) (196 → 138 at 0.7)."""
    if not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"EViT keep_rate must be in (0, 1], got {keep_rate}")
    tokens = int(tokens)  # a traced shape (fvcore) is a tensor
    return min(tokens, max(1, math.ceil(round(keep_rate * tokens, 9))))  # round: 0.7 * 100 is 70, not 71


def top_tokens(score: Tensor, keep: int) -> Tensor:
    """Indices `[B, keep]` of the `keep` best-scoring tokens of `score [B, N]`, in original order
    (what `fuse_topk` keeps; callers that follow token positions through a fusion use it too)."""
    return score.topk(keep, dim=-1, sorted=False).indices.sort(dim=-1).values


def fuse_topk(
    x: Tensor, score: Tensor, keep: int, size: Tensor | None = None, num_prefix: int = 1
) -> tuple[Tensor, Tensor | None]:
    """Keep the `keep` best-scoring non-prefix tokens of `x [B, N, C]` and fuse the others.

    `score [B, N - num_prefix]` is non-negative (an attention row). Returns `[B, num_prefix + keep
    + 1, C]` and matching sizes; when nothing is left to fuse the inputs come back unchanged.

    One gather writes every output row (the fused token's row is then overwritten), and without
    sizes the new sizes are known from the shapes alone.
    """
    b, n, c = x.shape
    p = num_prefix
    if keep >= n - p:
        return x, size
    with serial(b * n * c):
        kept = top_tokens(score, keep)
        dtype = torch.promote_types(score.dtype, (x if size is None else size).dtype)  # as `score * size`
        dropped = torch.ones_like(score, dtype=dtype).scatter_(1, kept, 0.0)  # 1 for the fused tokens
        # weights of the fused tokens
        w = score * dropped if size is None else score * size[:, p:, 0] * dropped
        total = w.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
        fused = (w.unsqueeze(1) @ x[:, p:]) / total.unsqueeze(-1)  # [B, 1, C]
        zeros, one, base = shape_constants("evit", x.device, b, n, p, keep)
        rows = torch.cat([zeros.expand(b, -1), kept, one.expand(b, -1)], dim=1).view(-1) + base
        out = x.reshape(b * n, c).index_select(0, rows).view(b, p + keep + 1, c)
        out[:, -1:] = fused
        if size is None:
            new_size = x.new_ones(b, p + keep + 1, 1)
            new_size[:, -1] = n - p - keep  # the count of fused tokens: the same as summing their sizes
        else:
            new_size = size.reshape(b * n, 1).index_select(0, rows).view(b, p + keep + 1, 1)
            fused_size = size[:, p:, 0] * dropped.to(size.dtype)  # `.to` is free when the dtype matches
            new_size[:, -1:] = fused_size.sum(dim=-1, keepdim=True).unsqueeze(-1)
    return out, new_size


def _evit_constants(device: torch.device, b: int, n: int, p: int, keep: int) -> tuple[Tensor, ...]:
    """`zeros [p]`, `zero [1]` and `base` such that `base + [zeros, kept, zero]` (per sample,
    flattened) are the flat rows of `[B * n, C]` to gather: the prefix, the kept tokens and any
    row for the fused token (overwritten)."""
    zeros = torch.zeros(p + 1, dtype=torch.long, device=device)
    local = torch.cat([torch.arange(p, device=device), torch.full((keep,), p, device=device), zeros[:1]])
    base = (local + n * torch.arange(b, device=device).unsqueeze(1)).view(-1)
    return zeros[:p], zeros[p:], base


register_constants("evit", _evit_constants)


def evit_fuse(
    x: Tensor, cls_attn: Tensor, keep_rate: float, size: Tensor | None = None, num_prefix: int = 1
) -> tuple[Tensor, Tensor | None]:
    """EViT at one layer: keep ceil(keep_rate * n) tokens by `cls_attn [B, N - num_prefix]`, fuse the rest.

    keep_rate = 1 is the identity (no fused token is added).
    """
    return fuse_topk(x, cls_attn, evit_keep(x.shape[1] - num_prefix, keep_rate), size, num_prefix)
