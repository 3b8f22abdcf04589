"""FLOP counting: published DeiT figures, attention through SDPA, token operators, reductions."""

import pytest
import timm
import torch

from nas.hardware.flops import flop_analysis, flops, params
from nas.ops import Attention, LinearAttention, TokenPool, cluster_pool, timm_patch
from nas.ops.attention import attention

IMAGE = torch.zeros(1, 3, 224, 224)


def _timm(name):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


def _gflops(model, inputs=IMAGE):
    """GFLOPs, checking that every op was either counted or ignored by name."""
    analysis = flop_analysis(model, inputs)
    total = analysis.total()
    assert not analysis.unsupported_ops(), analysis.unsupported_ops()
    return total / 1e9


@pytest.mark.parametrize(
    ("name", "gflops", "mparams"),
    [
        ("deit_tiny_patch16_224", 1.26, 5.72),
        ("deit_small_patch16_224", 4.6, 22.05),
    ],  # DeiT (Touvron et al. 2021)
)
def test_matches_published_deit_figures(name, gflops, mparams):
    model = _timm(name)
    assert _gflops(model) == pytest.approx(gflops, rel=0.03)
    assert flops(model, IMAGE) == int(_gflops(model) * 1e9)
    assert params(model) / 1e6 == pytest.approx(mparams, rel=0.01)


@pytest.mark.slow
def test_matches_published_vit_base_figure():
    assert flops(_timm("vit_base_patch16_224"), IMAGE) / 1e9 == pytest.approx(17.6, rel=0.03)


def test_reductions_count_fewer_flops_as_published_for_tome_and_evit():
    """ToMe DeiT-S: r=8 3.43 G, r=16 2.30 G (Bolya et al. 2023); EViT 3/6/9 at 0.7: 3.0 G (Liang et al. 2022)."""
    model = _timm("deit_small_patch16_224")
    expected = [({"kind": "tome", "r": 8}, 3.43), ({"kind": "tome", "r": 16}, 2.30)]
    expected.append(({"kind": "evit", "keep_rate": 0.7, "layers": [3, 6, 9]}, 3.0))
    for schedule, gflops in expected:
        timm_patch.apply(model, schedule)
        assert _gflops(model) == pytest.approx(gflops, rel=0.02), schedule


def test_sdpa_is_counted_as_two_matmuls():
    class Sdpa(torch.nn.Module):
        def forward(self, q, k, v):
            return attention(q, k, v, torch.ones(2, 7, 1))[0]

    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 6)
    assert flops(Sdpa(), (q, k, v)) == 2 * 3 * 5 * 7 * (4 + 6)


def test_token_operators_are_counted_without_unsupported_ops():
    x = torch.randn(2, 1 + 64, 16)
    modules = {
        "attention": Attention(16, 2),
        "linear_attention": LinearAttention(16, 2),
        **{
            f"pool_{kind}": TokenPool(kind, 16, 24, 64, 16)
            for kind in ("conv1d", "conv2d", "avg", "tome", "cluster", "evit")
        },
    }
    for module in modules.values():
        assert _gflops(module, x) > 0
    # linear attention is linear in tokens: 2 matmuls of N·d·d per head instead of N·N·d
    lin = flops(LinearAttention(16, 2), x)
    qkv_proj_conv = 2 * 65 * 16 * 16 * 4 + 2 * 64 * 16 * 3
    assert lin - qkv_proj_conv == pytest.approx(2 * 2 * 65 * 8 * 8 * 2, rel=0.2)

    class Pool(torch.nn.Module):
        def forward(self, x):
            return cluster_pool(x, 8, "kmedoids")[0]

    assert flops(Pool(), x) > 2 * 64 * 64 * 16  # the pairwise distances at least
