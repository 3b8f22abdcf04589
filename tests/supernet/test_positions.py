"""Position-aware pooling: after an in-stage reduction a sequence pool sees the stage's positions."""

from __future__ import annotations

import torch

from nas.ops.cluster import cluster_pool_assign
from nas.ops.evit import evit_fuse, evit_keep
from nas.ops.tome import bipartite_soft_matching
from nas.space import load_space
from nas.supernet import VitnasSubnet
from nas.supernet.blocks import _fuse_index, _merge_index, restore_positions, stage_forward


def _with_class(tokens: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros(tokens.shape[0], 1, tokens.shape[-1]), tokens], dim=1)


def test_merging_identical_neighbours_is_invisible_to_a_sequence_pool():
    # each A token (even position) has an exact copy right after it (odd position): ToMe merges
    # copies, and restoring puts every merged token back at both of its positions
    torch.manual_seed(0)
    x = _with_class(torch.randn(3, 8, 16).repeat_interleave(2, dim=1))
    merge = bipartite_soft_matching(x, 5)
    merged, _ = merge.merge(x)
    assert merged.shape[1] == x.shape[1] - 5
    owner = _merge_index(merge)[:, 1:]
    torch.testing.assert_close(restore_positions(merged, owner), x)


def test_evit_keeps_kept_tokens_in_place_and_puts_the_fused_token_where_the_others_were():
    torch.manual_seed(1)
    x = _with_class(torch.randn(2, 12, 8))
    score = torch.rand(2, 12).softmax(-1)
    fused, _ = evit_fuse(x, score, 0.5)
    restored = restore_positions(fused, _fuse_index(score, evit_keep(12, 0.5))[:, 1:])
    kept = torch.zeros(2, 12, dtype=torch.bool).scatter_(1, score.topk(6, dim=-1).indices, True)
    torch.testing.assert_close(restored[:, 1:][kept], x[:, 1:][kept])
    assert torch.equal(restored[:, 1:][~kept].view(2, 6, 8), fused[:, -1:].expand(-1, 6, -1))


def test_cluster_positions_hold_their_cluster_mean():
    torch.manual_seed(2)
    x = _with_class(torch.randn(2, 10, 4))
    pooled, _, assign = cluster_pool_assign(x, 3)
    restored = restore_positions(pooled, assign + 1)
    for b in range(2):
        for j in range(10):
            torch.testing.assert_close(restored[b, 1 + j], x[b, 1:][assign[b] == assign[b, j]].mean(0))


def test_a_stage_without_reduction_reports_no_owner_and_a_reducing_one_covers_every_token():
    space = load_space("psvit-digits")
    torch.manual_seed(3)
    plain, reducing = space.largest(), space.smallest()
    for arch, reduces in ((plain, False), (reducing, True)):
        st = arch.stages[0]
        net = VitnasSubnet(arch).eval()
        y, owner = stage_forward(st, net.stages[0].cells, torch.randn(2, st.tokens, st.dim))
        assert (owner is not None) == reduces
        if reduces:
            assert owner.shape == (2, st.tokens - 1)
            for b in range(2):  # every non-class output token holds at least one position
                assert set(owner[b].tolist()) == set(range(1, y.shape[1]))
