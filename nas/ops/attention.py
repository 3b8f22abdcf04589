"""Softmax attention with proportional attention and a shareable attention map.

Proportional attention (ToMe, Bolya et al. 2023 ICLR): a token that stands for `s` patches adds
`log s` to every logit that uses it as a key, so after merging it keeps the weight of the `s`
tokens it replaced. Attention sharing (PSViT, Chen et al. 2021): a `share` layer re-uses the
probabilities of the layer before it and only computes values and the output projection.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from nas.ops.small_work import serial


def size_bias(size: Tensor | None) -> Tensor | None:
    """`log(size)` shaped `[B, 1, 1, N]` to add to attention logits over keys (None: no bias).

    On one thread when small: `log` of a few hundred sizes is otherwise a parallel math-library
    call that pays a thread wake-up (about 0.1 ms on 2 cores with passive waiting) for no work.
    """
    if size is None:
        return None
    with serial(size.numel()):
        return size.log().reshape(size.shape[0], 1, 1, size.shape[1])


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    size: Tensor | None = None,
    need_attn: bool = False,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor | None]:
    """softmax(q kᵀ d^-0.5 + log size) v for `[B, H, N, d]` inputs.

    Without `need_attn` this is one `scaled_dot_product_attention` call (the fused kernel, with
    `log size` as a float mask); with it the probabilities are formed explicitly and returned so
    that a `share` layer can re-use them. Both give the same result.
    """
    bias = size_bias(size)
    if not need_attn:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p), None
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    attn = logits.softmax(dim=-1)
    return F.dropout(attn, dropout_p) @ v if dropout_p else attn @ v, attn


def apply_shared_attention(attn: Tensor, v: Tensor) -> Tensor:
    """Apply another layer's probabilities `[B, H, N, N]` to this layer's values `[B, H, N, d]`."""
    return attn @ v


def class_attention(q: Tensor, k: Tensor, size: Tensor | None = None, num_prefix: int = 1) -> Tensor:
    """The class token's attention over the non-prefix tokens, mean over heads: `[B, N - num_prefix]`.

    Computed on its own (one query row, O(N)) for EViT when the fused kernel does not expose the
    probabilities; the values equal row 0 of the full softmax.
    """
    logits = (q[:, :, :1] * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # [B, H, 1, N]
    bias = size_bias(size)
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1)[:, :, 0, num_prefix:].mean(dim=1)


def split_heads(x: Tensor, heads: int) -> Tensor:
    """`[B, N, H*d]` → `[B, H, N, d]`."""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """`[B, H, N, d]` → `[B, N, H*d]`."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class Attention(nn.Module):
    """Multi-head softmax attention that also hands out what token reduction needs.

    forward returns `(y, attn, metric)`: the output, the probabilities when `need_attn` (else
    None), and the keys averaged over heads `[B, N, d]`, the ToMe matching metric.
    """

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: Tensor, size: Tensor | None = None, need_attn: bool = False
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out, attn = attention(q, k, v, size, need_attn)
        return self.proj(merge_heads(out)), attn, k.mean(dim=1)


class SharedAttention(nn.Module):
    """A PSViT `share` layer: values and projection only; the map comes from the layer before."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, attn: Tensor) -> Tensor:
        if attn.shape[-1] != x.shape[1]:
            raise ValueError(
                f"shared attention map covers {attn.shape[-1]} tokens but the input has {x.shape[1]}: "
                "a share layer cannot follow a layer that changed the token count"
            )
        return self.proj(merge_heads(apply_shared_attention(attn, split_heads(self.v(x), self.heads))))
