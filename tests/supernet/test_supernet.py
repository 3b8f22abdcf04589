"""The supernet: any member runs through it, extraction copies it exactly, slices are views."""

from __future__ import annotations

import random

import pytest
import torch

from nas.arch import kept_tokens, tome_max_r
from nas.errors import UserError
from nas.ops.evit import evit_keep
from nas.ops.tome import clamp_r
from nas.space import load_space, shipped_spaces, space_from_dict
from nas.supernet import Supernet, VitnasSubnet, extract
from nas.supernet.subnet import subnet_shapes
from nas.supernet.supernet import source_key

# Reductions and pools psvit-digits does not have: clustering inside a stage (all three methods),
# EViT, conv2d pooling, a linear-attention stage with a ToMe reduction.
CLUSTER_SPACE = {
    "name": "test-cluster",
    "image_size": 16,
    "patch_size": 4,
    "num_classes": 10,
    "stages": [
        {
            "dim": [16, 24],
            "heads": [2],
            "mlp_ratio": [2.0],
            "attention": ["softmax", "linear"],
            "depth": [1, 2],
            "cells": ["basic", "share"],
            "reduction": {
                "kind": ["none", "cluster"],
                "keep_rate": [0.5, 0.75],
                "at": [0, 1],
                "method": ["kmeans", "kmedoids", "weighted_kmedoids"],
            },
        },
        {
            "tokens": [9, 5],
            "pool": ["conv1d", "avg", "tome", "cluster"],
            "dim": [32, 48],
            "heads": [2, 4],
            "mlp_ratio": [2.0, 3.0],
            "attention": ["softmax", "linear"],
            "depth": [1, 2],
            "cells": ["basic", "share"],
            "reduction": {"kind": ["none", "evit", "tome"], "r": [1, 2], "keep_rate": [0.5], "at": [0, 1]},
        },
    ],
}
GRID_SPACE = {
    "name": "test-grid",
    "image_size": 16,
    "patch_size": 2,
    "num_classes": 10,
    "stages": [
        {"dim": [16, 32], "heads": [2, 4], "depth": [1, 2], "cells": ["basic", "share"]},
        {"tokens": [17, 5], "pool": ["conv2d"], "dim": [32], "heads": [4], "depth": [1, 2]},
        {"tokens": [5, 2], "pool": ["conv2d", "avg"], "dim": [48], "heads": [4], "depth": [1]},
    ],
}


def _draws(space, n: int, seed: int = 0):
    rng = random.Random(seed)
    return [space.largest(), space.smallest()] + [space.sample(rng) for _ in range(n)]


def _features(arch) -> set[str]:
    out = set()
    for i, st in enumerate(arch.stages):
        out |= {st.attention, st.reduction.kind, *st.cells}
        if st.reduction.kind == "cluster":
            out.add(f"cluster:{st.reduction.method}")
        if i:
            out.add(f"pool:{st.pool}")
    return out


@pytest.mark.parametrize(
    "spec, n, needed",
    [
        (
            "psvit-digits",
            40,
            {"linear", "share", "tome", "evit", "pool:conv1d", "pool:avg", "pool:tome", "pool:cluster"},
        ),
        (
            CLUSTER_SPACE,
            40,
            {
                "linear",
                "share",
                "cluster:kmeans",
                "cluster:kmedoids",
                "cluster:weighted_kmedoids",
                "evit",
                "tome",
            },
        ),
        (GRID_SPACE, 12, {"share", "pool:conv2d", "pool:avg"}),
    ],
    ids=["psvit-digits", "cluster", "grid"],
)
def test_extracted_subnet_computes_what_the_supernet_computes(spec, n, needed):
    space = load_space(spec) if isinstance(spec, str) else space_from_dict(spec)
    torch.manual_seed(0)
    net = Supernet(space).eval()
    x = torch.randn(3, space.spec.in_chans, space.spec.image_size, space.spec.image_size)
    seen = set()
    with torch.no_grad():
        for arch in _draws(space, n):
            sub = net.extract(arch).eval()
            y, z = net(x, arch), sub(x)
            assert y.shape == (3, space.spec.num_classes)
            assert torch.isfinite(y).all(), arch.to_json()
            assert (y - z).abs().max().item() < 1e-5, arch.to_json()
            assert not any(isinstance(m, Supernet) for m in sub.modules())
            seen |= _features(arch)
    assert needed <= seen, f"draws never covered {needed - seen}"


def test_subnet_built_from_the_arch_alone_takes_the_extracted_weights():
    space = load_space("psvit-digits")
    net = Supernet(space).eval()
    x = torch.randn(2, 3, 32, 32)
    for arch in _draws(space, 6, seed=3):
        extracted = extract(net, arch)
        fresh = VitnasSubnet(arch)
        assert {k: v.shape for k, v in fresh.state_dict().items()} == dict(subnet_shapes(arch))
        fresh.load_state_dict(extracted.state_dict())  # strict: same keys, same shapes
        with torch.no_grad():
            assert torch.equal(fresh.eval()(x), extracted.eval()(x))


def test_extracted_subnet_holds_only_its_own_sizes():
    space = load_space("psvit-digits")
    net = Supernet(space)
    small, large = net.extract(space.smallest()), net.extract(space.largest())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(small) < count(large) < count(net)
    # a share cell holds values and projection only, no queries or keys
    arch = next(a for a in _draws(space, 50) if "share" in a.stages[1].cells)
    sub = net.extract(arch)
    j = arch.stages[1].cells.index("share")
    names = {n for n, _ in sub.stages[1].cells[j].named_parameters()}
    assert "attn.v.weight" in names and "attn.qkv.weight" not in names


@pytest.mark.parametrize("name", shipped_spaces())
def test_every_shipped_psvit_space_builds_and_runs_its_extremes(name):
    space = load_space(name)
    if space.family != "psvit":
        with pytest.raises(UserError, match="psvit"):
            Supernet(space)
        return
    net = Supernet(space).eval()
    x = torch.randn(1, space.spec.in_chans, space.spec.image_size, space.spec.image_size)
    with torch.inference_mode():
        for arch in (space.largest(), space.smallest()):
            y = net(x, arch)
            assert y.shape == (1, space.spec.num_classes) and torch.isfinite(y).all()
            assert (net.extract(arch).eval()(x) - y).abs().max().item() < 1e-5


def test_gradients_reach_exactly_the_leading_slices():
    space = load_space("psvit-digits")
    net = Supernet(space)
    arch = space.smallest()
    net(torch.randn(4, 3, 32, 32), arch).logsumexp(-1).sum().backward()
    st = arch.stages[0]
    d, hidden = st.dim, int(st.dim * st.mlp_ratio)
    fc1 = net.stages[0].cells[0].mlp.fc1.weight.grad
    assert fc1[:hidden, :d].abs().sum() > 0
    assert fc1[hidden:].abs().sum() == 0 and fc1[:, d:].abs().sum() == 0
    d_max = net.maxima[0].dim
    qkv_name = "linear_qkv" if st.attention == "linear" else "qkv"
    qkv = getattr(net.stages[0].cells[0].attn, qkv_name).weight.grad.view(3, d_max, d_max)
    assert qkv[:, :d, :d].abs().sum(dim=(1, 2)).gt(0).all()  # q, k and v parts all
    assert qkv[:, d:].abs().sum() == 0 and qkv[:, :, d:].abs().sum() == 0
    assert net.stages[0].cells[1].mlp.fc1.weight.grad is None  # an identity cell is never touched


def test_training_a_subnet_moves_only_its_slices():
    space = load_space("psvit-digits")
    net = Supernet(space)
    arch = space.smallest()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    net(torch.randn(4, 3, 32, 32), arch).logsumexp(-1).sum().backward()
    opt.step()
    after = net.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and changed <= {source_key(k, arch) for k, _ in subnet_shapes(arch)}
    for key, shape in subnet_shapes(arch):  # outside the subnet's slice nothing moved
        name = source_key(key, arch)
        delta = (after[name] - before[name]).abs()
        if ".attn.qkv." in key:  # q, k and v each keep their leading block
            delta, shape = delta.view(3, -1, *delta.shape[1:]), (3, shape[0] // 3, *shape[1:])
        mask = torch.ones_like(delta, dtype=torch.bool)
        mask[tuple(slice(0, s) for s in shape)] = False
        assert delta[mask].sum() == 0, key
    ptrs = {p.untyped_storage().data_ptr() for p in net.parameters()}
    for key, view in net.sliced_state(arch).items():  # views of the supernet's memory (qkv: stacked views)
        if ".attn.qkv." not in key:
            assert view.untyped_storage().data_ptr() in ptrs, key


def test_architecture_beyond_the_supernet_is_a_user_error():
    space = load_space("psvit-digits")
    net = Supernet(space)
    big = space.largest()
    wider = big.model_copy(
        update={"stages": (big.stages[0].model_copy(update={"dim": 128, "heads": 4}), *big.stages[1:])}
    )
    with pytest.raises(UserError, match=r"stages\[0\]: dim 128 > 64"):
        net(torch.randn(1, 3, 32, 32), wider)
    with pytest.raises(UserError, match="num_classes"):
        net.sliced_state(big.model_copy(update={"num_classes": 7}))


def test_ops_and_arch_agree_on_token_counts():
    for m in range(1, 400):
        assert clamp_r(10_000, m + 1) == tome_max_r(m)
        for keep in (0.1, 0.25, 0.3, 0.5, 0.6, 0.7, 0.75, 0.9, 1.0):
            assert evit_keep(m, keep) == kept_tokens(keep, m), (m, keep)


def test_extracting_under_inference_mode_gives_a_trainable_subnet():
    space = load_space("psvit-digits")
    net = Supernet(space)
    with torch.inference_mode():
        sub = net.extract(space.smallest())
    sub(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in sub.parameters())
