"""ReLU linear attention equals the explicit quadratic formula; the module's local conv."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from nas.ops.linear_attention import LinearAttention, relu_linear_attention


def _quadratic(q, k, v, size=None):
    """sum_j s_j phi(q_i)·phi(k_j) v_j / sum_j s_j phi(q_i)·phi(k_j), as an N x N matrix."""
    a = F.relu(q) @ F.relu(k).transpose(-1, -2)  # [B, H, N, N]
    if size is not None:
        a = a * size[:, None, None, :, 0]
    return (a @ v) / a.sum(-1, keepdim=True)


def test_equals_quadratic_formula_on_small_inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 5, generator=g, dtype=torch.float64) for _ in range(3))
    for t in (q, k):  # one positive feature each, so that no normaliser is 0 (0/0 is undefined either way)
        t[..., 0] = t[..., 0].abs() + 0.1
    size = torch.rand(2, 6, 1, generator=g, dtype=torch.float64) * 3 + 1
    assert_close(relu_linear_attention(q, k, v, eps=0), _quadratic(q, k, v))
    assert_close(relu_linear_attention(q, k, v, size, eps=0), _quadratic(q, k, v, size))
    assert_close(relu_linear_attention(q, k, v), _quadratic(q, k, v), atol=1e-5, rtol=1e-5)


def test_size_two_counts_like_two_copies():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 4, 3, generator=g, dtype=torch.float64) for _ in range(3))
    size = torch.tensor([1.0, 2, 1, 1], dtype=torch.float64).view(1, 4, 1)
    dup_k, dup_v = (torch.cat([t, t[:, :, 1:2]], dim=2) for t in (k, v))
    assert_close(relu_linear_attention(q, k, v, size), relu_linear_attention(q, dup_k, dup_v))


def test_module_adds_depthwise_conv_of_values_to_non_prefix_tokens_only():
    torch.manual_seed(0)
    m = LinearAttention(8, 2, kernel_size=3).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    y, attn, metric = m(x)
    q, k, v = m.qkv(x).view(2, 6, 3, 2, 4).permute(2, 0, 3, 1, 4)
    glob = relu_linear_attention(q, k, v).transpose(1, 2).reshape(2, 6, 8)
    vv = v.transpose(1, 2).reshape(2, 6, 8)[:, 1:]  # non-prefix values
    pad = F.pad(vv, (0, 0, 1, 1))
    w = m.local.weight[:, 0]  # [C, 3]
    local = pad[:, :-2] * w[:, 0] + pad[:, 1:-1] * w[:, 1] + pad[:, 2:] * w[:, 2] + m.local.bias
    expected = m.proj(glob + F.pad(local, (0, 0, 1, 0)))
    assert attn is None
    assert_close(y, expected)
    assert_close(metric, k.mean(1))


def test_module_refuses_to_share_and_rejects_even_kernels():
    with pytest.raises(ValueError, match="no attention map"):
        LinearAttention(8, 2)(torch.randn(1, 4, 8), need_attn=True)
    with pytest.raises(ValueError, match="odd"):
        LinearAttention(8, 2, kernel_size=4)


def test_gradients_flow():
    m = LinearAttention(8, 2)
    x = torch.randn(2, 5, 8, requires_grad=True)
    size = torch.rand(2, 5, 1) + 1
    y, _, _ = m(x, size)
    y.square().sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
