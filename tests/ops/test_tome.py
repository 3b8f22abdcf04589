"""ToMe bipartite soft matching (reference and spatial orders) and size-weighted merging."""

import pytest
import torch
from torch.testing import assert_close

from nas.ops.tome import ORDERS, bipartite_soft_matching, merge_wavg, tome_schedule


def _data(b=3, n=21, c=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=g, dtype=torch.float64)
    size = torch.randint(1, 5, (b, n, 1), generator=g).double()
    metric = torch.randn(b, n, 6, generator=g, dtype=torch.float64)
    return x, size, metric


@pytest.mark.parametrize("order", ORDERS)
def test_r_zero_is_the_exact_identity(order):
    x, size, metric = _data()
    merge = bipartite_soft_matching(metric, 0, order=order)
    out, new_size = merge.merge(x, size)
    assert torch.equal(out, x) and torch.equal(new_size, size)
    out, new_size = merge.merge(x)
    assert torch.equal(out, x) and torch.equal(new_size, torch.ones_like(size))


@pytest.mark.parametrize("order", ORDERS)
def test_merging_conserves_total_size_and_size_weighted_mean_and_protects_prefix(order):
    x, size, metric = _data()
    out, new_size = bipartite_soft_matching(metric, 7, num_prefix=2, order=order).merge(x, size)
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


# Hand-worked: class token + t1..t6 (2-D keys). Reference sets: A = positions 0, 2, 4, 6 and
# B = 1, 3, 5. The class token's key is parallel to t1 (score 1: it would merge first were it not
# protected); t6 is parallel to t5 (1.0), t2 nearly parallel to t1 (0.995), t4 best at t1 (0.707).
# So r=2 merges t6 into t5 and t2 into t1, and the output is [cls, t4, t1+t2, t3, t5+t6].
# Spatial sets over t1..t6: A = t1, t3, t5 and B = t2, t4, t6: t5→t6 (1.0), t1→t2 (0.995), t3→t6
# (0.707); r=2 gives [cls, t1+t2, t3, t4, t5+t6], every survivor where it was.
HAND_KEYS = [[1.0, 0.0], [1, 0], [1, 0.1], [0, 1], [1, -1], [-1, 1], [-1, 1]]
HAND_SIZE = [1.0, 2, 1, 1, 3, 1, 2]


def _hand(order):
    metric = torch.tensor([HAND_KEYS], dtype=torch.float64)
    x = (torch.arange(7, dtype=torch.float64).view(1, 7, 1) * torch.tensor([1.0, 10.0])).contiguous()
    size = torch.tensor(HAND_SIZE, dtype=torch.float64).view(1, 7, 1)
    merge = bipartite_soft_matching(metric, 2, order=order)
    out, new_size = merge.merge(x, size)
    held = merge.merge_source(torch.eye(7, dtype=torch.float64).unsqueeze(0))
    groups = [sorted(int(j) for j in row.nonzero()) for row in held[0]]
    return x[0], out[0], new_size.flatten().tolist(), groups


def test_hand_worked_reference_order():
    x, out, sizes, groups = _hand("reference")
    assert groups == [[0], [4], [1, 2], [3], [5, 6]]  # prefix, unmerged A, then every B (with its merges)
    assert sizes == [1, 3, 3, 1, 3]
    t12, t56 = (2 * x[1] + x[2]) / 3, (x[5] + 2 * x[6]) / 3
    assert_close(out, torch.stack([x[0], x[4], t12, x[3], t56]))


def test_hand_worked_spatial_order():
    x, out, sizes, groups = _hand("spatial")
    assert groups == [[0], [1, 2], [3], [4], [5, 6]]  # sequence order kept
    assert sizes == [1, 3, 1, 3, 3]
    t12, t56 = (2 * x[1] + x[2]) / 3, (x[5] + 2 * x[6]) / 3
    assert_close(out, torch.stack([x[0], t12, x[3], x[4], t56]))


@pytest.mark.parametrize("p", [0, 1, 2, 3])
def test_reference_order_is_prefix_then_unmerged_a_then_b(p):
    """For any prefix length: prefix tokens alone and first, unmerged even positions, then all odd ones."""
    n, r = 40, 13
    _, _, metric = _data(b=4, n=n)
    merge = bipartite_soft_matching(metric, r, num_prefix=p, order="reference")
    held = merge.merge_source(torch.eye(n).expand(4, n, n))
    idx = torch.arange(float(n))
    odd = idx % 2 == 1
    # a group is anchored at its B (odd) token; an unmerged token at itself
    anchor = torch.where(held.sum(-1) > 1, (held * idx * odd).amax(-1), (held * idx).amax(-1)).long()
    assert torch.equal(held[:, :p], torch.eye(n)[:p].expand(4, p, n))
    b_tokens = [j for j in range(p, n) if j % 2]
    for row, hold in zip(anchor, held):
        a_part = row[p : len(row) - len(b_tokens)].tolist()
        assert row[:p].tolist() == list(range(p))
        assert a_part == sorted(a_part) and all(j % 2 == 0 and j >= p for j in a_part)
        assert row[len(row) - len(b_tokens) :].tolist() == b_tokens
        assert all(int(hold[k].sum()) == 1 for k in range(p))  # prefix never merged nor merged into


def test_unknown_order_is_refused():
    _, _, metric = _data()
    with pytest.raises(ValueError, match="order must be one of reference, spatial"):
        bipartite_soft_matching(metric, 2, order="sorted")


@pytest.mark.parametrize("order", ORDERS)
def test_sources_reproduce_the_merged_tokens_over_several_layers(order):
    """After any chain of merges from unit sizes, x = source @ x0 / size and size = row sums of source."""
    x0, _, _ = _data(b=2, n=33)
    x, size = x0, None
    source = torch.eye(33, dtype=torch.float64).expand(2, 33, 33)
    for r in (8, 5, 6):
        merge = bipartite_soft_matching(x[..., :5], r, order=order)
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


@pytest.mark.parametrize("order", ORDERS)
def test_batched_matching_equals_per_sample(order):
    x, size, metric = _data(b=5)
    out, new_size = bipartite_soft_matching(metric, 6, order=order).merge(x, size)
    for i in range(5):
        one = bipartite_soft_matching(metric[i : i + 1], 6, order=order)
        o, s = merge_wavg(one, x[i : i + 1], size[i : i + 1])
        assert torch.equal(o, out[i : i + 1]) and torch.equal(s, new_size[i : i + 1])


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize(
    ("n", "r", "out"), [(1 + 9, 100, 1 + 5), (1 + 10, 7, 1 + 5), (1 + 1, 3, 2), (1, 1, 1)]
)
def test_r_is_clamped_to_half_the_tokens(n, r, out, order):
    x, _, metric = _data(b=2, n=n)
    assert bipartite_soft_matching(metric, r, order=order).merge(x)[0].shape[1] == out


@pytest.mark.parametrize("order", ORDERS)
def test_gradient_of_a_merge_is_each_tokens_share_of_its_group(order):
    x, size, metric = _data(b=2, n=15)
    x.requires_grad_()
    out, new_size = bipartite_soft_matching(metric, 5, order=order).merge(x, size)
    (out * new_size).sum().backward()  # d/dx_i of sum_groups S * mean = s_i
    assert_close(x.grad, size.expand_as(x))


def test_tome_schedule_forms():
    assert tome_schedule(8, 3) == [8, 8, 8]
    assert tome_schedule([1, 2, 3], 3) == [1, 2, 3]
    assert tome_schedule({"rule": "constant", "r": 4}, 2) == [4, 4]
    assert tome_schedule({"rule": "decreasing", "start": 16}, 5) == [16, 12, 8, 4, 0]
    assert tome_schedule({"rule": "decreasing", "start": 16}, 1) == [16]


def test_inflection_rule_is_the_reference_r_tuple():
    """`(r, inflection)` as ToMe's code reads it; `decreasing start=2r` is it but for rounding."""
    paper = tome_schedule({"rule": "inflection", "r": 8, "inflection": -1}, 12)
    assert paper == [16, 14, 13, 11, 10, 8, 7, 5, 4, 2, 1, 0]  # values truncated, as the reference does
    assert tome_schedule({"rule": "decreasing", "start": 16}, 12) == [16, 15, 13, 12, 10, 9, 7, 6, 4, 3, 1, 0]
    assert tome_schedule({"rule": "inflection", "r": 8, "inflection": 0}, 12) == [8] * 12
    assert tome_schedule({"rule": "inflection", "r": 4, "inflection": 1}, 5) == [0, 2, 4, 6, 8]
    assert tome_schedule({"rule": "inflection", "r": 8, "inflection": -0.5}, 5) == [12, 10, 8, 6, 4]
    assert tome_schedule({"rule": "inflection", "r": 8, "inflection": -1}, 1) == [16]


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
        {"rule": "inflection", "r": 8},
        {"rule": "inflection", "r": 8, "inflection": 1.5},
        {"rule": "inflection", "r": 8, "inflection": float("nan")},
        {"rule": "inflection", "r": 8, "inflection": True},
        {"rule": "inflection", "r": -1, "inflection": 0},
        {"rule": "inflection", "r": 2.5, "inflection": 0},
    ],
)
def test_tome_schedule_rejects_bad_input(bad):
    with pytest.raises(ValueError, match="ToMe r"):
        tome_schedule(bad, 3)


# -- the batch-1 work left every output as it was ----------------------------------------------------
def _previous_tome(metric, x, size, r, p, order):
    """ToMe as vitnas computed it before the batch-1 speed work, one sample at a time and spelled
    out: cosine similarity of the metric rows (normalised as `m / max(|m|, 1e-12)`), each
    mergeable A token's best receiving B token (first on a tie), the r A tokens with the best
    scores (in descending order), survivors in the order of `order`, and each group merged as
    `x_dst + sum_i (x_i - x_dst) * (s_i / S)` with `S = s_dst + s_1 + ...`, summed in that order.

    Returns per sample `(x [M, C], size [M, 1], kept positions, src positions, dst positions)`.
    """
    out = []
    for i in range(metric.shape[0]):
        n = metric.shape[1]
        s = torch.ones(n, 1, dtype=x.dtype) if size is None else size[i]
        if order == "reference":  # A = even positions, B = odd ones, over the whole sequence
            a_tokens, b_tokens = range(p + p % 2, n, 2), range(p + 1 - p % 2, n, 2)
        else:  # over the non-prefix tokens
            a_tokens, b_tokens = range(p, n, 2), range(p + 1, n, 2)
        m = metric[i] / metric[i].norm(dim=-1, keepdim=True).clamp_min(1e-12)
        scores = m[list(a_tokens)] @ m[list(b_tokens)].T
        best, match = scores.max(dim=-1)
        chosen = sorted(range(len(a_tokens)), key=lambda j: -best[j].item())[: min(r, (n - p) // 2)]
        src = [a_tokens[j] for j in chosen]
        dst = [b_tokens[match[j]] for j in chosen]
        total = {d: s[d].clone() for d in dst}
        for a, d in zip(src, dst):
            total[d] = total[d] + s[a]
        rows = {j: x[i, j].clone() for j in range(n) if j not in src}
        for a, d in zip(src, dst):
            rows[d] = rows[d] + (x[i, a] - x[i, d]) * (s[a] / total[d])
        if order == "reference":
            kept = [*range(p), *(j for j in a_tokens if j not in src), *b_tokens]
        else:
            kept = sorted(rows)
        sizes = torch.stack([total.get(j, s[j]) for j in kept])
        out.append((torch.stack([rows[j] for j in kept]), sizes, kept, src, dst))
    return out


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize(
    ("n", "c", "p", "r"), [(197, 384, 1, 13), (197, 384, 1, 16), (66, 32, 2, 9), (40, 16, 0, 7)]
)
def test_merges_equal_the_previous_implementation_bit_for_bit(order, batch, n, c, p, r):
    """Float32 at DeiT-S shapes too: batch 1 runs the matching on one thread (`serial`), batch 8 on all."""
    g = torch.Generator().manual_seed(batch * 1000 + n + r)
    metric = torch.randn(batch, n, 64, generator=g)
    x = torch.randn(batch, n, c, generator=g)
    size = torch.randint(1, 5, (batch, n, 1), generator=g).float()
    for sizes in (None, size):
        with torch.inference_mode():
            merge = bipartite_soft_matching(metric, r, p, order)
            out, new_size = merge.merge(x, sizes)
        expected = _previous_tome(metric, x, sizes, r, p, order)
        m = n - min(r, (n - p) // 2)
        assert out.shape == (batch, m, c) and merge.out_tokens == m
        for i, (x_i, s_i, kept, src, dst) in enumerate(expected):
            assert torch.equal(out[i], x_i) and torch.equal(new_size[i], s_i)
            assert merge.keep.view(batch, m)[i].tolist() == [i * n + j for j in kept]
            assert merge.src.view(batch, -1)[i].tolist() == [i * n + j for j in src]
            assert merge.dst.view(batch, -1)[i].tolist() == [i * n + j for j in dst]
            assert merge.slot.view(batch, -1)[i].tolist() == [i * m + kept.index(j) for j in dst]


@pytest.mark.parametrize("order", ORDERS)
def test_ties_keep_the_choice_of_top_k(order):
    """Identical tokens tie everywhere: the merged ones are still the ones `topk` names first."""
    metric = torch.ones(2, 21, 4)
    merge = bipartite_soft_matching(metric, 5, 1, order)
    n_a = len(range(0 if order == "reference" else 1, 21, 2))
    best = torch.ones(2, n_a)
    if order == "reference":
        best[:, 0] = -torch.inf  # the class token's row
    first = 0 if order == "reference" else 1
    expected = (best.topk(5, dim=-1).indices * 2 + first + torch.tensor([[0], [21]])).view(-1)
    assert torch.equal(merge.src, expected)


def test_serial_runs_small_work_on_one_thread_and_restores_the_count():
    from nas.ops.small_work import SERIAL_BELOW, serial

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with serial(10):
            inside = torch.get_num_threads()
        assert inside == 1 and torch.get_num_threads() == 2
        with serial(SERIAL_BELOW):
            assert torch.get_num_threads() == 2
        with pytest.raises(KeyError), serial(10):
            raise KeyError("restored on errors too")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("order", ORDERS)
def test_index_constants_made_under_inference_mode_serve_training(order):
    """The per-shape index tensors are cached: one built during an inference pass must still work
    in an autograd graph later (inference tensors cannot be saved for backward)."""
    x, size, metric = _data(b=2, n=29)
    with torch.inference_mode():
        bipartite_soft_matching(metric, 4, order=order).merge(x, size)
    x = x.clone().requires_grad_()
    out, _ = bipartite_soft_matching(metric, 4, order=order).merge(x, size)
    out.sum().backward()
    assert x.grad is not None
