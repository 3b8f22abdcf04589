"""EViT: keep the attentive tokens, fuse the rest into one weighted token."""

import pytest
import torch
from torch.testing import assert_close

from nas.ops.evit import evit_fuse, evit_keep, fuse_topk


def _data(b=2, n=11, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=g, dtype=torch.float64)
    attn = torch.rand(b, n - 1, generator=g, dtype=torch.float64)
    return x, attn / attn.sum(-1, keepdim=True)


def test_keep_rate_one_is_the_exact_identity():
    x, attn = _data()
    out, size = evit_fuse(x, attn, 1.0)
    assert out is x and size is None
    s = torch.rand(2, 11, 1, dtype=torch.float64)
    assert evit_fuse(x, attn, 1.0, s)[1] is s


def test_fused_token_equals_the_weighted_sum_by_hand():
    x = torch.arange(15, dtype=torch.float64).view(1, 5, 3)  # class + 4 tokens
    attn = torch.tensor([[0.1, 0.4, 0.2, 0.3]], dtype=torch.float64)
    out, size = evit_fuse(x, attn, 0.5)  # keep ceil(0.5 * 4) = 2: tokens 2 and 4 (attn 0.4, 0.3)
    fused = (0.1 * x[0, 1] + 0.2 * x[0, 3]) / 0.3
    assert_close(out[0], torch.stack([x[0, 0], x[0, 2], x[0, 4], fused]))
    assert size.flatten().tolist() == [1, 1, 1, 2]


def test_sizes_weight_the_fused_token_and_add_up():
    x = torch.arange(15, dtype=torch.float64).view(1, 5, 3)
    attn = torch.tensor([[0.1, 0.4, 0.2, 0.3]], dtype=torch.float64)
    size = torch.tensor([1.0, 3, 1, 2, 1], dtype=torch.float64).view(1, 5, 1)
    out, new_size = evit_fuse(x, attn, 0.5, size)
    fused = (0.1 * 3 * x[0, 1] + 0.2 * 2 * x[0, 3]) / (0.3 + 0.4)
    assert_close(out[0, -1], fused)
    assert new_size.flatten().tolist() == [1, 1, 1, 5]


def test_deit_token_counts_and_order_with_registers():
    """196 → 138 (+1 fused) at keep 0.7 (EViT, Liang et al. 2022); prefix tokens stay first, order is kept."""
    x, attn = _data(b=3, n=4 + 196, c=2)
    x[..., 0] = torch.arange(200.0)
    out, size = evit_fuse(x, attn[:, 3:], 0.7, num_prefix=4)
    assert out.shape == (3, 4 + 138 + 1, 2) and size.shape == (3, 143, 1)
    assert torch.equal(out[:, :4], x[:, :4])
    kept = out[:, 4:-1, 0]
    assert (kept[:, 1:] > kept[:, :-1]).all()
    top = attn[:, 3:].topk(138).indices + 4
    assert torch.equal(kept.sort(-1).values, top.sort(-1).values.double())
    assert_close(size.sum(1), torch.full((3, 1), 200.0, dtype=torch.float64))
    assert [evit_keep(n, 0.7) for n in (196, 139, 99)] == [138, 98, 70]


def test_fuse_topk_batched_equals_per_sample():
    x, attn = _data(b=4, n=30)
    out, size = fuse_topk(x, attn, 10)
    for i in range(4):
        o, s = fuse_topk(x[i : i + 1], attn[i : i + 1], 10)
        assert_close(o, out[i : i + 1])
        assert_close(s, size[i : i + 1])


def test_gradients_flow_to_tokens_and_attention():
    x, attn = _data()
    x.requires_grad_()
    attn.requires_grad_()
    out, _ = evit_fuse(x, attn, 0.6)
    out.square().sum().backward()
    assert (x.grad.abs().sum(-1) > 0).all()  # kept and fused tokens all get gradient
    assert attn.grad.abs().sum() > 0


@pytest.mark.parametrize("rate", [0.0, 1.5, -0.1])
def test_bad_keep_rate(rate):
    x, attn = _data()
    with pytest.raises(ValueError, match="keep_rate"):
        evit_fuse(x, attn, rate)


# -- the batch-1 work left every output as it was ----------------------------------------------------
def _previous_evit(x, score, keep, size, p):
    """EViT fusion as vitnas computed it before the batch-1 speed work, spelled out: the `keep`
    best-scoring tokens in sequence order after the prefix, then one token fused from the others
    with weights `w = score * size` (zero for the kept ones), `sum_j w_j x_j / max(sum_j w_j, tiny)`,
    whose size is the fused sizes' sum."""
    b = x.shape[0]
    sizes = x.new_ones(b, x.shape[1], 1) if size is None else size
    kept = score.topk(keep, dim=-1).indices.sort(dim=-1).values
    dropped = torch.ones_like(score).scatter(1, kept, 0.0)
    w = score * sizes[:, p:, 0] * dropped
    total = w.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    fused = (w.unsqueeze(1) @ x[:, p:]) / total.unsqueeze(-1)
    tokens = torch.stack([x[i, p:][kept[i]] for i in range(b)])
    token_sizes = torch.stack([sizes[i, p:][kept[i]] for i in range(b)])
    fused_size = (sizes[:, p:, 0] * dropped).sum(dim=-1).view(b, 1, 1)
    return (
        torch.cat([x[:, :p], tokens, fused], dim=1),
        torch.cat([sizes[:, :p], token_sizes, fused_size], dim=1),
    )


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize(("n", "c", "p", "rate"), [(197, 384, 1, 0.7), (139, 384, 1, 0.7), (67, 32, 3, 0.5)])
def test_fusion_equals_the_previous_implementation_bit_for_bit(batch, n, c, p, rate):
    """Float32 at DeiT-S shapes too: batch 1 runs on one thread (`serial`), batch 8 on all."""
    g = torch.Generator().manual_seed(batch * 100 + n)
    x = torch.randn(batch, n, c, generator=g)
    score = torch.rand(batch, n - p, generator=g).softmax(dim=-1)
    size = torch.randint(1, 5, (batch, n, 1), generator=g).float()
    keep = evit_keep(n - p, rate)
    for sizes in (None, size):
        with torch.inference_mode():
            out, new_size = fuse_topk(x, score, keep, sizes, p)
        expected, expected_size = _previous_evit(x, score, keep, sizes, p)
        assert torch.equal(out, expected) and torch.equal(new_size, expected_size)
        assert out.shape == (batch, p + keep + 1, c)
