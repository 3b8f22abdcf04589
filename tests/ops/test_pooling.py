"""Inter-stage pooling: strided convs, average pooling, reductions, count checks."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from nas.ops.cluster import cluster_pool
from nas.ops.pooling import (
    TokenPool,
    avg_pool,
    check_pool,
    conv1d_pool,
    conv2d_pool,
    evit_pool,
    pool_stride,
    tome_pool,
)


def _x(b=2, n=1 + 10, c=3, seed=0):
    return torch.randn(b, n, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_conv1d_pool_by_hand_with_right_padding():
    """10 tokens to 4: stride ceil(10/4) = 3, windows [0-2] [3-5] [6-8] [9 + two zeros]."""
    x = _x()
    w = torch.randn(5, 3, 3, dtype=torch.float64)
    bias = torch.randn(5, dtype=torch.float64)
    pw, pb = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    out, size = conv1d_pool(x, w, bias, 3, 4, prefix_weight=pw, prefix_bias=pb)
    tokens = torch.cat([x[:, 1:], torch.zeros(2, 2, 3, dtype=torch.float64)], dim=1)
    windows = [torch.einsum("btc,oct->bo", tokens[:, 3 * i : 3 * i + 3], w) + bias for i in range(4)]
    assert_close(out, torch.stack([x[:, 0] @ pw.T + pb, *windows], dim=1))
    assert size is None
    sized = conv1d_pool(x, w, bias, 3, 4, prefix_weight=pw, prefix_bias=pb, size=torch.ones(2, 11, 1))[1]
    assert sized.flatten(1).tolist() == [[1, 3, 3, 3, 1]] * 2


def test_conv2d_pool_equals_conv_over_the_grid():
    x = _x(n=1 + 36, c=4)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    out, _ = conv2d_pool(x, w, None, 3, 4, prefix_weight=torch.eye(6, 4, dtype=torch.float64))
    grid = x[:, 1:].transpose(1, 2).reshape(2, 4, 6, 6)
    ref = F.conv2d(grid, w, stride=3).flatten(2).transpose(1, 2)
    assert out.shape == (2, 5, 6)
    assert_close(out[:, 1:], ref)
    assert_close(out[:, 0], F.pad(x[:, 0], (0, 2)))


def test_conv2d_pool_pads_right_and_bottom_to_the_output_grid():
    x = _x(n=1 + 25, c=2)  # 5x5 grid to 2x2: stride 3, padded to 6x6
    w = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    out, size = conv2d_pool(x, w, None, 3, 4, size=torch.ones(2, 26, 1, dtype=torch.float64))
    grid = F.pad(x[:, 1:].transpose(1, 2).reshape(2, 2, 5, 5), (0, 1, 0, 1))
    assert_close(out[:, 1:], F.conv2d(grid, w, stride=3).flatten(2).transpose(1, 2))
    assert size.flatten(1).tolist() == [[1, 9, 6, 6, 4]] * 2


def test_avg_pool_is_size_weighted_window_mean_then_linear():
    x = _x(n=1 + 7)
    size = torch.tensor([1.0, 1, 2, 1, 1, 3, 1, 1], dtype=torch.float64).expand(2, 8).unsqueeze(-1)
    w = torch.randn(4, 3, dtype=torch.float64)
    out, new_size = avg_pool(x, w, None, 3, size=size)  # windows of 3: [0-2] [3-5] [6]
    t, s = x[:, 1:], size[:, 1:]
    means = [(t[:, a:b] * s[:, a:b]).sum(1) / s[:, a:b].sum(1) for a, b in ((0, 3), (3, 6), (6, 7))]
    assert_close(out, torch.stack([x[:, 0], *means], dim=1) @ w.T)
    assert new_size[0].flatten().tolist() == [1, 4, 5, 1]
    plain, none = avg_pool(x, w, None, 3)
    assert none is None
    assert_close(plain[:, -1], x[:, -1] @ w.T)  # a one-token window is that token, not diluted by padding


@pytest.mark.parametrize(
    ("kind", "n", "m", "match"),
    [
        ("conv2d", 196, 50, "not a square"),
        ("conv2d", 195, 49, "not a square"),
        ("conv1d", 10, 6, "padding only"),
        ("avg", 196, 64, "padding only"),
        ("conv2d", 25, 16, "padding only"),
        ("tome", 10, 11, "1 <= out <= in"),
        ("cluster", 10, 0, "1 <= out <= in"),
        ("maxpool", 10, 5, "not one of"),
    ],
)
def test_check_pool_rejects_impossible_counts(kind, n, m, match):
    with pytest.raises(ValueError, match=match):
        check_pool(kind, n, m)


def test_check_pool_accepts_the_usual_counts():
    for kind, n, m in [
        ("conv2d", 196, 49),
        ("conv1d", 196, 98),
        ("avg", 196, 49),
        ("conv2d", 196, 16),
        ("tome", 196, 61),
    ]:
        check_pool(kind, n, m)
    assert pool_stride(196, 49) == 4


@pytest.mark.parametrize("kind", ["conv1d", "conv2d", "avg", "tome", "cluster", "evit"])
def test_token_pool_kinds_give_the_counts_and_dims_and_gradients(kind):
    torch.manual_seed(0)
    pool = TokenPool(kind, 8, 12, 64, 16, num_prefix=2)
    x = torch.randn(3, 2 + 64, 8, requires_grad=True)
    out, size = pool(x, torch.ones(3, 66, 1))
    assert out.shape == (3, 2 + 16, 12)
    assert_close(size.sum(1), torch.full((3, 1), 66.0))
    out.square().sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None for n, p in pool.named_parameters())
    with pytest.raises(ValueError, match="expects 64"):
        pool(torch.randn(1, 2 + 63, 8))


def test_reduction_kinds_are_the_functional_reduction_then_a_linear():
    torch.manual_seed(1)
    x, size = torch.randn(2, 1 + 20, 4), torch.randint(1, 3, (2, 21, 1)).float()
    reductions = {
        "tome": tome_pool(x, 7, size),
        "cluster": cluster_pool(x, 7, "kmedoids", size=size),
        "evit": evit_pool(x, 7, size),
    }
    for kind, (reduced, reduced_size) in reductions.items():
        pool = TokenPool(kind, 4, 6, 20, 7)
        out, new_size = pool(x, size)
        assert_close(out, pool.proj(reduced))
        assert torch.equal(new_size, reduced_size)
        assert reduced.shape == (2, 8, 4)


def test_evit_pool_scores_by_similarity_to_the_class_token():
    x = torch.tensor([[[1.0, 0], [5, 0], [-5, 0], [4, 0], [0, 1]]])
    out, size = evit_pool(x, 3)  # keep the 2 tokens most aligned with the class token, fuse the others
    assert_close(out[0, :3], x[0, [0, 1, 3]])
    assert size.flatten().tolist() == [1, 1, 1, 2]
