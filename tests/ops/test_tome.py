"""ToMe bipartite soft matching and size-weighted merging."""

import pytest
import torch
from torch.testing import assert_close

from nas.ops.tome import bipartite_soft_matching, merge_wavg, tome_schedule


def _data(b=3, n=21, c=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=g, dtype=torch.float64)
    size = torch.randint(1, 5, (b, n, 1), generator=g).double()
    metric = torch.randn(b, n, 6, generator=g, dtype=torch.float64)
    return x, size, metric


def test_r_zero_is_the_exact_identity():
    x, size, metric = _data()
    merge = bipartite_soft_matching(metric, 0)
    out, new_size = merge.merge(x, size)
    assert torch.equal(out, x) and torch.equal(new_size, size)
    out, new_size = merge.merge(x)
    assert torch.equal(out, x) and torch.equal(new_size, torch.ones_like(size))


def test_merging_conserves_total_size_and_size_weighted_mean_and_protects_prefix():
    x, size, metric = _data()
    out, new_size = bipartite_soft_matching(metric, 7, num_prefix=2).merge(x, size)
    assert out.shape == (3, 21 - 7, 8) and new_size.shape == (3, 14, 1)
    assert_close(new_size.sum(1), size.sum(1))
    assert_close((out * new_size).sum(1), (x * size).sum(1))  # so the size-weighted mean is conserved too
    assert torch.equal(out[:, :2], x[:, :2]) and torch.equal(new_size[:, :2], size[:, :2])


def test_hand_computed_merge():
    """Prefix + [A0, B0, A1, B1]: A0 is parallel to B1 (best score), so r=1 merges A0 into B1."""
    metric = torch.tensor([[[5.0, 5], [1, 0], [0, 1], [1, 1], [1, 0.01]]], dtype=torch.float64)
    x = torch.arange(10, dtype=torch.float64).view(1, 5, 2)
    size = torch.tensor([1.0, 2, 1, 1, 3], dtype=torch.float64).view(1, 5, 1)
    out, new_size = bipartite_soft_matching(metric, 1).merge(x, size)
    merged = (2 * x[0, 1] + 3 * x[0, 4]) / 5
    assert_close(out[0], torch.stack([x[0, 0], x[0, 2], x[0, 3], merged]))  # original order kept
    assert new_size.flatten().tolist() == [1, 1, 1, 5]


def test_sources_reproduce_the_merged_tokens_over_several_layers():
    """After any chain of merges from unit sizes, x = source @ x0 / size and size = row sums of source."""
    x0, _, _ = _data(b=2, n=33)
    x, size = x0, None
    source = torch.eye(33, dtype=torch.float64).expand(2, 33, 33)
    for r in (8, 5, 6):
        merge = bipartite_soft_matching(x[..., :5], r)
        x, size = merge.merge(x, size)
        source = merge.merge_source(source)
    assert x.shape[1] == 33 - 19
    assert_close(size[..., 0], source.sum(-1))
    assert_close(x, source @ x0 / size)
    assert torch.equal(source[:, 0], torch.eye(33, dtype=torch.float64)[0].expand(2, 33))  # class token alone
    assert torch.equal(source.sum(1), torch.ones(2, 33, dtype=torch.float64))  # every patch held exactly once


def test_kept_tokens_stay_in_original_order():
    x, _, metric = _data(b=4, n=41)
    source = torch.eye(41).expand(4, 41, 41)
    merge = bipartite_soft_matching(metric, 12)
    held = merge.merge_source(source)
    idx = torch.arange(41.0)
    in_b = (idx % 2 == 0) & (idx > 0)  # B = odd non-prefix positions = even absolute indices here
    # a merged group sits where its B token was; an unmerged token where it was
    anchor = torch.where(held.sum(-1) > 1, (held * idx * in_b).amax(-1), (held * idx).amax(-1))
    assert (anchor[:, 1:] > anchor[:, :-1]).all()


def test_batched_matching_equals_per_sample():
    x, size, metric = _data(b=5)
    out, new_size = bipartite_soft_matching(metric, 6).merge(x, size)
    for i in range(5):
        o, s = merge_wavg(bipartite_soft_matching(metric[i : i + 1], 6), x[i : i + 1], size[i : i + 1])
        assert torch.equal(o, out[i : i + 1]) and torch.equal(s, new_size[i : i + 1])


@pytest.mark.parametrize(
    ("n", "r", "out"), [(1 + 9, 100, 1 + 5), (1 + 10, 7, 1 + 5), (1 + 1, 3, 2), (1, 1, 1)]
)
def test_r_is_clamped_to_half_the_tokens(n, r, out):
    x, _, metric = _data(b=2, n=n)
    assert bipartite_soft_matching(metric, r).merge(x)[0].shape[1] == out


def test_gradient_of_a_merge_is_each_tokens_share_of_its_group():
    x, size, metric = _data(b=2, n=15)
    x.requires_grad_()
    out, new_size = bipartite_soft_matching(metric, 5).merge(x, size)
    (out * new_size).sum().backward()  # d/dx_i of sum_groups S * mean = s_i
    assert_close(x.grad, size.expand_as(x))


def test_tome_schedule_forms():
    assert tome_schedule(8, 3) == [8, 8, 8]
    assert tome_schedule([1, 2, 3], 3) == [1, 2, 3]
    assert tome_schedule({"rule": "constant", "r": 4}, 2) == [4, 4]
    assert tome_schedule({"rule": "decreasing", "start": 16}, 5) == [16, 12, 8, 4, 0]
    assert tome_schedule({"rule": "decreasing", "start": 16}, 1) == [16]


@pytest.mark.parametrize(
    "bad",
    [
        [1, 2],
        [1, -1, 2],
        {"rule": "decreasing"},
        {"rule": "linear", "start": 3},
        True,
        [1.5, 1, 1],
        {"rule": "decreasing", "start": 2.5},
    ],
)
def test_tome_schedule_rejects_bad_input(bad):
    with pytest.raises(ValueError, match="ToMe r"):
        tome_schedule(bad, 3)
