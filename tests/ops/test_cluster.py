"""Clustering token pooling: k-means, (weighted) k-medoids, cluster_pool."""

import pytest
import torch
from torch.testing import assert_close

from nas.ops.cluster import cluster_pool, cluster_pool_assign, kmeans, kmedoids


def _blobs(b=2, k=4, per=5, c=3, seed=0):
    """k well separated blobs, tokens interleaved so that evenly spaced starts are not already right."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(b, k, 1, c, generator=g, dtype=torch.float64) * 20
    x = centres + torch.randn(b, k, per, c, generator=g, dtype=torch.float64) * 0.1
    label = torch.arange(k).repeat_interleave(per)
    perm = torch.randperm(k * per, generator=g)
    return x.reshape(b, k * per, c)[:, perm], label[perm]


def _same_partition(a, b):
    return torch.equal(a.unsqueeze(-1) == a.unsqueeze(-2), b.unsqueeze(-1) == b.unsqueeze(-2))


@pytest.mark.parametrize("method", [kmeans, kmedoids])
def test_recovers_separated_blobs_deterministically(method):
    x, label = _blobs()
    assign, centres = method(x, 4, iters=10)
    for i in range(2):
        assert _same_partition(assign[i], label)
    again = method(x, 4, iters=10)
    assert torch.equal(assign, again[0]) and torch.equal(centres, again[1])


def test_kmedoids_returns_members_of_the_input_and_each_is_in_its_own_cluster():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 40, 5, generator=g)
    assign, medoids = kmedoids(x, 6, iters=5)
    assert medoids.shape == (3, 6) and medoids.dtype == torch.long
    assert ((medoids >= 0) & (medoids < 40)).all()
    assert torch.equal(assign.gather(1, medoids), torch.arange(6).expand(3, 6))
    # each medoid minimises the summed distance to its cluster's members (one more update changes nothing)
    d = torch.cdist(x, x)
    for b in range(3):
        for c in range(6):
            members = (assign[b] == c).nonzero().squeeze(1)
            costs = d[b][members][:, members].sum(0)
            assert medoids[b, c] == members[costs.argmin()]


def test_kmeans_centres_are_weighted_means_of_their_clusters():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 30, 3, generator=g, dtype=torch.float64)
    w = torch.rand(2, 30, generator=g, dtype=torch.float64) + 0.1
    _, centres = kmeans(x, 5, iters=4, weights=w)
    assign = kmeans(x, 5, iters=3, weights=w)[0]  # the assignment the 4th update used
    for b in range(2):
        for c in range(5):
            m = assign[b] == c
            if m.any():
                assert_close(centres[b, c], (w[b, m, None] * x[b, m]).sum(0) / w[b, m].sum())


def test_weighted_kmedoids_moves_the_medoid_to_the_heavy_token():
    """Three tokens on a line, one cluster: unweighted medoid is the middle, a heavy end token wins."""
    x = torch.tensor([[[0.0], [1.0], [3.0]]])
    assert kmedoids(x, 1)[1].item() == 1
    assert kmedoids(x, 1, weights=torch.tensor([[1.0, 1.0, 10.0]]))[1].item() == 2


def test_batched_equals_per_sample():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 25, 6, generator=g)
    w = torch.rand(4, 25, generator=g)
    for method in (kmeans, kmedoids):
        assign, centres = method(x, 5, weights=w)
        for i in range(4):
            a, c = method(x[i : i + 1], 5, weights=w[i : i + 1])
            assert torch.equal(a, assign[i : i + 1])
            assert_close(c, centres[i : i + 1])


@pytest.mark.parametrize("method", ["kmeans", "kmedoids"])
def test_cluster_pool_conserves_size_and_weighted_sum(method):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 1 + 30, 4, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (2, 31, 1), generator=g).double()
    out, new_size = cluster_pool(x, 7, method, size=size)
    assert out.shape == (2, 8, 4) and new_size.shape == (2, 8, 1)
    assert torch.equal(out[:, 0], x[:, 0]) and torch.equal(new_size[:, 0], size[:, 0])
    assert_close(new_size.sum(1), size.sum(1))
    assert_close((out * new_size).sum(1), (x * size).sum(1))


def test_cluster_pool_with_significance_weights_by_hand():
    x = torch.tensor([[[9.0], [0.0], [1.0], [10.0], [11.0]]])  # class token, then two groups
    w = torch.tensor([[1.0, 3.0, 1.0, 1.0]])
    out, size = cluster_pool(x, 2, "kmedoids", weights=w)
    assert_close(out[0, :, 0], torch.tensor([9.0, 0.75, 10.5]))
    assert size.flatten().tolist() == [1, 2, 2]


def test_duplicate_tokens_leave_no_nan():
    x = torch.zeros(1, 1 + 6, 2)
    out, size = cluster_pool(x, 3, "kmedoids")
    assert torch.isfinite(out).all() and size.sum() == 7


def test_gradients_flow_and_bad_k_raises():
    x = torch.randn(2, 1 + 12, 4, requires_grad=True)
    for method in ("kmeans", "kmedoids"):
        out, _ = cluster_pool(x, 4, method)
        out.square().sum().backward()
        assert (x.grad.abs().sum(-1) > 0).all()
        x.grad = None
    with pytest.raises(ValueError, match="k=13"):
        cluster_pool(x, 13)
    with pytest.raises(ValueError, match="not one of"):
        cluster_pool(x, 3, "dbscan")


# -- the batch-1 work left every output as it was ----------------------------------------------------
def _previous_kmedoids(x, k, iters, w):
    """(Weighted) k-medoids of one sample as vitnas computed it before the batch-1 speed work,
    spelled out: symmetric distances with a zero diagonal, evenly spaced first medoids, then
    `iters` rounds of nearest-medoid assignment and, per non-empty cluster, the member with the least
    weighted distance to the members (first on a tie); returns the final assignment and medoids."""
    n = x.shape[0]
    sq = (x * x).sum(-1, keepdim=True)
    dist = (sq - 2 * x @ x.T + sq.T).clamp_min(0).sqrt()
    dist = ((dist + dist.T) * 0.5).masked_fill(torch.eye(n, dtype=torch.bool), 0.0)
    medoids = torch.linspace(0, n - 1, k).round().long()
    for _ in range(iters):
        assign = dist[:, medoids].argmin(-1)
        for j in range(k):
            members = (assign == j).nonzero().flatten()
            if len(members):
                cost = dist[members][:, members] @ w[members]
                medoids[j] = members[cost.argmin()]
    return dist[:, medoids].argmin(-1), medoids


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize(("n", "c", "k"), [(65, 64, 16), (197, 48, 138)])
@pytest.mark.parametrize("weighted", [False, True])
def test_kmedoids_pooling_equals_the_previous_implementation(batch, n, c, k, weighted):
    """Assignments, medoids and sizes exactly; the pooled means (a weighted sum per cluster, here
    summed in another order than the implementation's matrix product) to 1e-6."""
    g = torch.Generator().manual_seed(batch + n + k)
    x = torch.randn(batch, n, c, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (batch, n, 1), generator=g).double()
    weights = torch.rand(batch, n - 1, generator=g, dtype=torch.float64) if weighted else None
    with torch.inference_mode():
        pooled, new_size, assign = cluster_pool_assign(x, k, "kmedoids", 5, size, weights)
    for i in range(batch):
        w = size[i, 1:, 0] * (1 if weights is None else weights[i])
        expected_assign, medoids = _previous_kmedoids(x[i, 1:], k, 5, w)
        assert torch.equal(assign[i], expected_assign)
        for j in range(k):
            members = expected_assign == j
            assert new_size[i, 1 + j, 0] == size[i, 1:][members].sum()
            expected = (
                (w[members, None] * x[i, 1:][members]).sum(0) / w[members].sum()
                if members.any()
                else x[i, 1 + medoids[j]]
            )
            assert_close(pooled[i, 1 + j], expected, atol=1e-6, rtol=0)
        assert torch.equal(pooled[i, 0], x[i, 0])


def _previous_kmeans(x, k, iters, w):
    """Weighted k-means of one sample as before the batch-1 work: evenly spaced first centres,
    `iters` Lloyd rounds (an emptied cluster keeps its centre), a final nearest-centre assignment."""

    def nearest(centres):
        return (
            ((x * x).sum(-1, keepdim=True) - 2 * x @ centres.T + (centres * centres).sum(-1))
            .clamp_min(0)
            .argmin(-1)
        )

    centres = x[torch.linspace(0, x.shape[0] - 1, k).round().long()]
    for _ in range(iters):
        assign = nearest(centres)
        centres = torch.stack(
            [
                (w[assign == j, None] * x[assign == j]).sum(0) / w[assign == j].sum()
                if (assign == j).any()
                else centres[j]
                for j in range(k)
            ]
        )
    return nearest(centres), centres


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize(("n", "c", "k"), [(65, 64, 16), (197, 48, 98)])
def test_kmeans_pooling_equals_the_previous_implementation(batch, n, c, k):
    """Assignments and sizes exactly; means to 1e-6 (the reference sums in another order)."""
    g = torch.Generator().manual_seed(batch + n + k)
    x = torch.randn(batch, n, c, generator=g, dtype=torch.float64)
    weights = torch.rand(batch, n - 1, generator=g, dtype=torch.float64)
    with torch.inference_mode():
        pooled, new_size, assign = cluster_pool_assign(x, k, "kmeans", 5, None, weights)
    for i in range(batch):
        expected_assign, centres = _previous_kmeans(x[i, 1:], k, 5, weights[i])
        assert torch.equal(assign[i], expected_assign)
        assert torch.equal(new_size[i, 1:, 0], torch.bincount(expected_assign, minlength=k).double())
        for j in range(k):
            members = expected_assign == j
            w = weights[i, members, None]
            expected = (w * x[i, 1:][members]).sum(0) / w.sum() if members.any() else centres[j]
            assert_close(pooled[i, 1 + j], expected, atol=1e-6, rtol=0)
