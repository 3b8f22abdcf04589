"""Keep the attentive tokens, fuse the rest (EViT, Liang et al. 2022 ICLR).

The non-prefix tokens are ranked by the class token's attention (mean over heads); the top
`ceil(keep_rate * n)` stay, in their original order, and the others are fused into one extra
token appended last. The fused token is the attention-weighted average `sum w_i x_i / sum w_i`
(w = class attention, times size when tokens carry sizes), so it stays on the scale of the tokens
it replaces; the reference code takes the unnormalised sum `sum w_i x_i`, which shrinks it by the
attention mass of the fused tokens. The fused token's size is the sum of the fused sizes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


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
    """
    b, n, c = x.shape
    p = num_prefix
    if keep >= n - p:
        return x, size
    kept = top_tokens(score, keep)
    dropped = torch.ones_like(score, dtype=torch.bool).scatter_(
        1, kept, torch.zeros_like(kept, dtype=torch.bool)
    )
    sizes = x.new_ones(b, n, 1) if size is None else size
    w = score * sizes[:, p:, 0] * dropped  # weights of the fused tokens only
    total = w.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    fused = (w.unsqueeze(1) @ x[:, p:]) / total.unsqueeze(-1)  # [B, 1, C]
    fused_size = (sizes[:, p:, 0] * dropped).sum(dim=-1, keepdim=True).unsqueeze(-1)
    rows = torch.cat([torch.arange(p, device=x.device).expand(b, p), kept + p], dim=1)
    rows = (rows + n * torch.arange(b, device=x.device).unsqueeze(1)).view(-1)  # flat: one index_select
    out = torch.cat([x.reshape(b * n, c).index_select(0, rows).view(b, -1, c), fused], dim=1)
    return out, torch.cat([sizes.reshape(b * n, 1).index_select(0, rows).view(b, -1, 1), fused_size], dim=1)


def evit_fuse(
    x: Tensor, cls_attn: Tensor, keep_rate: float, size: Tensor | None = None, num_prefix: int = 1
) -> tuple[Tensor, Tensor | None]:
    """EViT at one layer: keep ceil(keep_rate * n) tokens by `cls_attn [B, N - num_prefix]`, fuse the rest.

    keep_rate = 1 is the identity (no fused token is added).
    """
    return fuse_topk(x, cls_attn, evit_keep(x.shape[1] - num_prefix, keep_rate), size, num_prefix)
