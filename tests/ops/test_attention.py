"""Softmax attention: SDPA and explicit paths agree, proportional attention, class row, sharing."""

import pytest
import torch
from torch.testing import assert_close

from nas.ops.attention import Attention, SharedAttention, apply_shared_attention, attention, class_attention


def _qkv(b=2, h=3, n=7, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3)]


def _reference(q, k, v, size=None):
    """softmax(q kᵀ / sqrt(d) + log size) v, written out."""
    logits = torch.einsum("bhnd,bhmd->bhnm", q, k) / q.shape[-1] ** 0.5
    if size is not None:
        logits = logits + size[:, None, None, :, 0].log()
    p = logits.softmax(-1)
    return torch.einsum("bhnm,bhmd->bhnd", p, v), p


def test_sdpa_and_explicit_paths_match_the_formula_with_and_without_size():
    q, k, v = _qkv()
    size = torch.tensor([1.0, 2, 1, 3, 1, 1, 4], dtype=torch.float64).expand(2, 7).unsqueeze(-1)
    for s in (None, size):
        ref, ref_p = _reference(q, k, v, s)
        fused, none = attention(q, k, v, s)
        explicit, p = attention(q, k, v, s, need_attn=True)
        assert none is None
        assert_close(fused, ref)
        assert_close(explicit, ref)
        assert_close(p, ref_p)


def test_proportional_attention_equals_duplicating_a_token():
    """A token of size 2 gets exactly the weight of two copies of it (ToMe's motivation)."""
    q, k, v = _qkv(b=1, n=4)
    dup = [torch.cat([t, t[:, :, 2:3]], dim=2) for t in (k, v)]
    size = torch.tensor([[1.0], [1], [2], [1]], dtype=torch.float64).unsqueeze(0)
    out, _ = attention(q, k, v, size)
    ref, _ = attention(q, *dup)
    assert_close(out, ref)


def test_class_attention_is_row_zero_of_the_full_map_mean_over_heads():
    q, k, v = _qkv()
    size = torch.rand(2, 7, 1, dtype=torch.float64) + 0.5
    _, p = attention(q, k, v, size, need_attn=True)
    assert_close(class_attention(q, k, size), p[:, :, 0, 1:].mean(1))
    assert_close(class_attention(q, k, None, num_prefix=3), _reference(q, k, v)[1][:, :, 0, 3:].mean(1))


def test_attention_module_returns_map_and_mean_keys():
    torch.manual_seed(0)
    m = Attention(16, 4).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    y, attn, metric = m(x, need_attn=True)
    q, k, v = m.qkv(x).view(2, 5, 3, 4, 4).permute(2, 0, 3, 1, 4)
    ref, ref_p = _reference(q, k, v)
    assert_close(y, m.proj(ref.transpose(1, 2).reshape(2, 5, 16)))
    assert_close(attn, ref_p)
    assert_close(metric, k.mean(1))
    y2, none, _ = m(x)
    assert none is None and torch.allclose(y2, y)


def test_share_layer_given_previous_map_equals_recomputing_with_it():
    """PSViT: layer 2 re-uses layer 1's probabilities on its own values."""
    torch.manual_seed(1)
    first, share = Attention(12, 3).double(), SharedAttention(12, 3).double()
    x1, x2 = torch.randn(2, 2, 6, 12, dtype=torch.float64)
    _, attn, _ = first(x1, need_attn=True)
    q, k, _ = first.qkv(x1).view(2, 6, 3, 3, 4).permute(2, 0, 3, 1, 4)
    recomputed = (q @ k.transpose(-1, -2) / 2).softmax(-1)  # sqrt(d) = 2
    v = share.v(x2).view(2, 6, 3, 4).transpose(1, 2)
    expected = share.proj((recomputed @ v).transpose(1, 2).reshape(2, 6, 12))
    assert_close(share(x2, attn), expected)
    assert_close(apply_shared_attention(recomputed, v), recomputed @ v)


def test_share_layer_rejects_a_map_of_another_token_count():
    with pytest.raises(ValueError, match="token count"):
        SharedAttention(8, 2)(torch.randn(1, 5, 8), torch.rand(1, 2, 6, 6))


def test_gradients_flow_through_both_paths_and_sharing():
    q, k, v = (t.requires_grad_() for t in _qkv())
    size = (torch.rand(2, 7, 1, dtype=torch.float64) + 1).requires_grad_()
    out, p = attention(q, k, v, size, need_attn=True)
    (out.sum() + attention(q, k, v, size)[0].sum() + class_attention(q, k, size).sum()).backward()
    for t in (q, k, v, size):
        assert t.grad is not None and t.grad.abs().sum() > 0
    share = SharedAttention(8, 2)
    x = torch.randn(1, 4, 8, requires_grad=True)
    share(x, torch.rand(1, 2, 4, 4).softmax(-1)).sum().backward()
    assert x.grad.abs().sum() > 0 and share.v.weight.grad.abs().sum() > 0
