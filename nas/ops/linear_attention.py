"""ReLU linear attention with a depthwise convolution for local detail (EfficientViT, Cai et al. 2023 ICCV).

ReLU feature maps make attention linear in the token count: `phi(Q) (phi(K)ᵀ V)` is evaluated
right to left (a `d x d` summary of keys and values per head) and normalised by
`phi(Q) sum_j phi(K_j)ᵀ`. Linear attention is weak at local detail, which EfficientViT restores
with depthwise convolutions; see `LinearAttention` for why ours runs over the token sequence.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from nas.ops.attention import merge_heads


def relu_linear_attention(
    q: Tensor, k: Tensor, v: Tensor, size: Tensor | None = None, eps: float = 1e-6
) -> Tensor:
    """`[B, H, N, d]` inputs → `[B, H, N, dv]`; a key of size `s` counts `s` times."""
    q, k = F.relu(q), F.relu(k)
    if size is not None:
        k = k * size.unsqueeze(1)  # [B, 1, N, 1]: scales both the numerator and the normaliser
    kv = k.transpose(-2, -1) @ v  # [B, H, d, dv]
    norm = q @ k.sum(dim=-2).unsqueeze(-1)  # [B, H, N, 1]
    return (q @ kv) / (norm + eps)


class LinearAttention(nn.Module):
    """Multi-head ReLU linear attention plus a depthwise conv of the values for local detail.

    The tokens need not lie on a grid (ToMe and EViT leave an unordered set of merged tokens), so
    the depthwise conv is 1D over the token sequence rather than 2D over an image grid. On an
    unreduced sequence it sees row neighbours; ToMe in this package keeps surviving tokens in
    their original order, so the conv still sees near neighbours after merging. Prefix tokens
    (class, registers) get no local term. forward returns `(y, None, metric)` like `Attention`:
    there is no N x N map to share, and the keys averaged over heads serve as the ToMe metric.
    """

    def __init__(
        self, dim: int, heads: int, kernel_size: int = 3, qkv_bias: bool = True, num_prefix: int = 1
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention dim {dim} is not divisible by heads {heads}")
        if kernel_size % 2 == 0:
            raise ValueError(f"depthwise kernel_size must be odd to keep the token count, got {kernel_size}")
        self.heads = heads
        self.num_prefix = num_prefix
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.local = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: Tensor, size: Tensor | None = None, need_attn: bool = False
    ) -> tuple[Tensor, None, Tensor]:
        if need_attn:
            raise ValueError("linear attention forms no attention map to share; use softmax attention")
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = merge_heads(relu_linear_attention(q, k, v, size))
        y = y + local_term(merge_heads(v), self.local.weight, self.local.bias, self.num_prefix)
        return self.proj(y), None, k.mean(dim=1)


def local_term(v: Tensor, weight: Tensor, bias: Tensor | None, num_prefix: int = 1) -> Tensor:
    """The local detail term: a depthwise 1D conv over the non-prefix value tokens ``v [B, N, C]``
    (prefix rows get zero). Weights are passed in, so the supernet runs it on its slices too."""
    k = weight.shape[-1]
    y = F.conv1d(v[:, num_prefix:].transpose(1, 2), weight, bias, padding=k // 2, groups=v.shape[-1])
    return F.pad(y.transpose(1, 2), (0, 0, num_prefix, 0))
