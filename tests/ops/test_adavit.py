"""AdaViT on timm VisionTransformers: exact identities, real skipping that computes what training
computes, gradients to every decision network, and FLOPs that match fvcore's count."""

import copy
import pickle

import pytest
import torch
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch.testing import assert_close

from nas.hardware.flops import flops
from nas.ops import adavit_patch
from nas.ops.adavit import DecisionNet, budget_logit, index_tensor, keep_decision, usage_loss

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, num_classes=10)  # 16 patches
CONFIGS = {
    "vit": {},
    "vit_explicit_attn": {"fused": False},
    "registers": {"reg_tokens": 2},
    "deit3_layerscale_qknorm": {"init_values": 0.3, "no_embed_class": True, "qk_norm": True},
    "avg_head_with_class_token": {"global_pool": "avg", "fc_norm": True},
    "gated_attention": {"gated": True},
}
ALL = {"patch": 0.7, "head": 0.75, "block": 0.9}


def _model(fused=True, gated=False, **kwargs):
    torch.manual_seed(0)
    model = VisionTransformer(**{**SMALL, **kwargs}).eval()
    for blk in model.blocks:
        if gated:
            a = blk.attn
            blk.attn = Attention(a.qkv.in_features, a.num_heads, qkv_bias=True, gated=True).eval()
        blk.attn.fused_attn = fused
    return model


def _images(b=4, seed=1):
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _randomise(model, seed=0, images=None):
    """Decision networks whose logits are centred over ``images``: each decision goes either way
    depending on the image (a random network's class token barely depends on it otherwise)."""
    g = torch.Generator().manual_seed(seed)
    images = _images(8, seed=seed + 100) if images is None else images
    tokens, hooks = {}, []
    for key, net in model.adavit.items():
        hooks.append(net.norm.register_forward_hook(lambda m, i, o, key=key: tokens.__setitem__(key, o)))
    with torch.no_grad():
        for net in model.adavit.values():
            net.fc.weight.copy_(torch.randn(net.fc.weight.shape, generator=g))
            net.fc.bias.fill_(50.0)
        was = model.training
        model.eval()(images)
        model.train(was)
        for key, net in model.adavit.items():
            z = tokens[key] @ net.fc.weight.T  # [B, outputs]
            net.fc.bias.copy_(-z.mean(0) + 0.3 * z.std(0) * torch.randn(z.shape[1], generator=g))
            net.gain.zero_()  # the budget's bias aside: the decisions are the image's alone
    for h in hooks:
        h.remove()


def _force(model, heads=None):
    """Every decision 'keep' (logit +50), except the heads of ``heads[block]`` (logit -50)."""
    with torch.no_grad():
        for key, net in model.adavit.items():
            net.fc.weight.zero_()
            net.fc.bias.fill_(50.0)
            for h in (heads or {}).get(int(key), []):
                net.fc.bias[net.patches + h] = -50.0


@pytest.mark.parametrize("config", CONFIGS)
def test_every_decision_on_is_exactly_the_unpatched_model_and_remove_restores_it(config):
    model = _model(**CONFIGS[config])
    images = _images()
    with torch.no_grad():
        ref = model(images)
        adavit_patch.apply(model, {"kind": "adavit", "usage": {}})  # nothing decided
        assert torch.equal(model(images), ref)
        adavit_patch.apply(model, {"kind": "adavit", "usage": ALL, "start": 0})
        _force(model)  # decisions taken, all of them "keep"
        assert torch.equal(model(images), ref)
        assert torch.equal(model(images[:1]), model.__class__.__bases__[1].forward(model, images[:1]))
    assert any(k.startswith("adavit.") for k in model.state_dict())
    adavit_patch.remove(model)
    assert type(model) is VisionTransformer and not any(k.startswith("adavit.") for k in model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(images), ref)


def test_full_head_deactivation_equals_the_network_with_those_heads_removed():
    model = _model(init_values=0.3, qk_norm=True)
    images = _images()
    pruned = copy.deepcopy(model)
    drop = {1: [1, 3], 2: [0]}
    for i, heads in drop.items():
        a = pruned.blocks[i].attn
        keep = [h for h in range(a.num_heads) if h not in heads]
        d = a.head_dim
        small = Attention(
            32, len(keep), attn_head_dim=d, qkv_bias=True, qk_norm=True, norm_layer=type(a.q_norm)
        ).eval()
        rows = torch.cat(
            [part * a.num_heads * d + h * d + torch.arange(d) for part in range(3) for h in keep]
        )
        cols = torch.cat([h * d + torch.arange(d) for h in keep])
        with torch.no_grad():
            small.qkv.weight.copy_(a.qkv.weight[rows])
            small.qkv.bias.copy_(a.qkv.bias[rows])
            small.proj.weight.copy_(a.proj.weight[:, cols])
            small.proj.bias.copy_(a.proj.bias)
        small.q_norm.load_state_dict(a.q_norm.state_dict())
        small.k_norm.load_state_dict(a.k_norm.state_dict())
        pruned.blocks[i].attn = small
    adavit_patch.apply(model, {"kind": "adavit", "usage": {"head": 0.5}, "start": 1})
    _force(model, drop)
    with torch.no_grad():
        expected = pruned(images)
        assert_close(model(images), expected, rtol=0, atol=1e-6)  # heads removed from the matmuls
        model._adavit.inference = "masked"  # the training computation: heads zeroed
        assert_close(model(images), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "config, mode, batching",
    [(c, "full", "union") for c in CONFIGS]
    + [("vit", "partial", "union"), ("deit3_layerscale_qknorm", "partial", "union")]
    + [("deit3_layerscale_qknorm", "full", "group"), ("vit", "partial", "group")],
)
def test_real_skipping_computes_what_training_computes_with_the_same_decisions(config, mode, batching):
    model = _model(**CONFIGS[config])
    adavit_patch.apply(model, {"kind": "adavit", "usage": ALL, "head_mode": mode, "batching": batching})
    _randomise(model)
    images = _images(6)
    with torch.no_grad():
        packed = model(images)
        kept = {k: v.clone() for k, v in adavit_patch.usage(model).items()}
        assert 0 < kept["patch"].mean() < 1 and 0 < kept["head"].mean() < 1 and 0 < kept["block"].mean() < 1
        model._adavit.inference = "masked"
        masked = model(images)
    assert_close(packed, masked, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("config", ["registers", "avg_head_with_class_token"])
def test_an_image_alone_gets_the_output_and_decisions_it_gets_inside_a_batch(config):
    model = _model(**CONFIGS[config])
    adavit_patch.apply(model, {"kind": "adavit", "usage": ALL})
    images = _images(6, seed=2)
    _randomise(model, seed=3, images=images)
    with torch.no_grad():
        batched = model(images)
        stats = model._adavit.stats
        alone = []
        for i in range(len(images)):
            alone.append(model(images[i : i + 1]))
            for block, s in enumerate(model._adavit.stats):
                for key in ("tokens", "heads", "attn", "ffn"):
                    assert s[key][0] == stats[block][key][i], (i, block, key)
        reference = model.__class__.__bases__[1]  # timm itself differs this much between batch sizes
        spread = (reference.forward(model, images[:1]) - reference.forward(model, images)[:1]).abs().max()
    assert_close(torch.cat(alone), batched, rtol=0, atol=max(1e-5, 10 * float(spread)))
    assert any(max(s["tokens"]) > min(s["tokens"]) for s in stats)  # images kept different counts


def test_straight_through_gradients_reach_every_decision_network_from_the_task_loss():
    model = _model()
    adavit_patch.apply(model, {"kind": "adavit", "usage": ALL, "start": 0})
    adavit_patch.set_generator(model, torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model.eval()(_images(2))  # what inference caches must not get in training's way
    model.train()
    logits = model(_images(8))
    torch.nn.functional.cross_entropy(logits, torch.arange(8) % 10).backward()  # no usage loss
    for key, net in model.adavit.items():
        g = net.fc.weight.grad
        patches, heads = net.patches, net.heads
        for name, rows in (
            ("patch", slice(0, patches)),
            ("head", slice(patches, patches + heads)),
            ("block", slice(patches + heads, None)),
        ):
            assert g[rows].abs().sum() > 0, (key, name)
        assert net.gain.grad is not None and net.gain.grad.abs().sum() > 0
    used = adavit_patch.usage(model)
    assert set(used) == {"patch", "head", "block"} and all(u.requires_grad for u in used.values())


def test_usage_loss_is_zero_at_the_budget_and_grows_away_from_it():
    budget = {"patch": 0.6, "head": 0.8}
    grid = torch.linspace(0.0, 1.0, 101)
    losses = torch.stack(
        [usage_loss({"patch": torch.full((4,), t), "head": torch.full((4,), 0.8)}, budget) for t in grid]
    )
    assert grid[losses.argmin()] == pytest.approx(0.6) and losses.min() == pytest.approx(0.0, abs=1e-12)
    assert torch.all(losses[:60].diff() < 0) and torch.all(losses[60:].diff() > 0)
    # the mean over the batch is what meets the budget: one image may use more, another less
    assert usage_loss({"patch": torch.tensor([0.4, 0.8]), "head": torch.tensor([0.8, 0.8])}, budget) < 1e-12


def test_decisions_start_at_the_budget_and_follow_it():
    net = DecisionNet(32, 16, 4)
    with torch.no_grad():
        net.fc.weight.zero_()
        token = torch.randn(3, 32)
        for b in (0.3, 0.7):
            patch, head, block = net(token, net.budget_bias({"patch": b, "head": b, "block": b}))
            assert torch.allclose(torch.sigmoid(patch), torch.tensor(b), atol=1e-6)
    assert budget_logit(1.0) > 6 and budget_logit(0.5) == 0
    g = torch.Generator().manual_seed(0)
    samples = torch.stack(
        [keep_decision(torch.full((1000,), budget_logit(0.7)), True, generator=g) for _ in range(5)]
    )
    assert set(samples.unique().tolist()) <= {0.0, 1.0} and samples.mean() == pytest.approx(0.7, abs=0.03)
    assert torch.equal(keep_decision(torch.tensor([-0.1, 0.1]), False), torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize(
    "config, mode",
    [("deit3_layerscale_qknorm", "full"), ("gated_attention", "full"), ("registers", "partial")],
)
def test_inference_flops_equal_the_analytic_count_of_the_kept_parts(config, mode):
    model = _model(**CONFIGS[config])
    adavit_patch.apply(model, {"kind": "adavit", "usage": ALL, "head_mode": mode})
    images = _images(2, seed=4)
    _randomise(model, seed=5, images=images)
    analytic = model.sample_flops(images)
    counted = [flops(model, images[i : i + 1]) for i in range(len(images))]
    # fvcore's trace drops the decision networks (their result goes to Python, not to the output)
    decisions = sum(adavit_patch.decision_flops(model, i) for i in range(1, 3))
    assert (analytic - decisions).tolist() == counted
    adavit_patch.apply(model, {"kind": "adavit", "usage": {}})
    assert model.sample_flops(images[:1]).item() == flops(model, images[:1])  # the whole model too
    assert len(set(counted)) > 1  # the images took different paths


def test_bad_schedules_and_models_are_refused_in_one_line():
    model = _model()
    bad = [
        ({"kind": "tome"}, "kind 'adavit'"),
        ({"kind": "adavit", "usage": {"patches": 0.5}}, "usage must map"),
        ({"kind": "adavit", "usage": {"patch": 0}}, r"in \(0, 1\]"),
        ({"kind": "adavit", "head_mode": "half"}, "head_mode"),
        ({"kind": "adavit", "start": 3}, r"start must be a block index in \[0, 3\)"),
        ({"kind": "adavit", "speed": 1}, "unknown keys"),
    ]
    for schedule, message in bad:
        with pytest.raises(ValueError, match=message):
            adavit_patch.apply(model, schedule)
    with pytest.raises(ValueError, match="no class token"):
        adavit_patch.apply(_model(class_token=False, global_pool="avg"), {"kind": "adavit", "usage": ALL})
    with pytest.raises(ValueError, match="scale norm"):
        adavit_patch.apply(_model(scale_attn_norm=True), {"kind": "adavit", "usage": {"head": 0.5}})
    adavit_patch.apply(
        _model(scale_attn_norm=True), {"kind": "adavit", "usage": {"head": 0.5}, "head_mode": "partial"}
    )


def test_reapplying_keeps_trained_decision_networks_and_a_patched_model_pickles():
    model = adavit_patch.apply(_model(), {"kind": "adavit", "usage": ALL})
    _randomise(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adavit_patch.apply(model, {"kind": "adavit", "usage": {"patch": 0.5}})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    images = _images(2)
    with torch.no_grad():
        out = model(images)
        copied = pickle.loads(pickle.dumps(model))
        assert torch.equal(copied(images), out)
        assert torch.equal(copy.deepcopy(model)(images), out)
    adavit_patch.apply(model, {"kind": "adavit", "usage": ALL, "start": 2})  # another shape: fresh networks
    assert sorted(model.adavit) == ["2"]


def test_timm_patch_takes_the_adavit_kind_and_one_model_carries_one_patch():
    """``timm_patch.apply(model, {"kind": "adavit", ...})`` is AdaViT (the issue's spelling); a
    token-reduction schedule replaces it and back; ``timm_patch.remove`` undoes either."""
    from nas.ops import timm_patch

    model = _model()
    images = _images()
    with torch.no_grad():
        ref = model(images)
        timm_patch.apply(model, {"kind": "tome", "r": 2})
        timm_patch.apply(model, {"kind": "adavit", "usage": ALL})
        assert adavit_patch.is_adaptive(model)
        assert all(type(b).__module__ != "nas.ops.timm_patch" for b in model.blocks)
        _force(model)
        assert torch.equal(model(images), ref)
        timm_patch.apply(model, {"kind": "tome", "r": 2})
        assert not adavit_patch.is_adaptive(model) and not any(k.startswith("adavit.") for k in model.state_dict())
        reduced = model(images)
        assert not torch.equal(reduced, ref)
        timm_patch.apply(model, {"kind": "adavit", "usage": ALL})
        with pytest.raises(ValueError, match="unknown keys"):  # a bad schedule keeps the current patch
            timm_patch.apply(model, {"kind": "tome", "r": 2, "ratio": 0.5})
        assert adavit_patch.is_adaptive(model)
        timm_patch.remove(model)
        assert type(model) is VisionTransformer and all(type(b).__module__.startswith("timm.") for b in model.blocks)
        assert torch.equal(model(images), ref)


@pytest.mark.parametrize("values", [[], [0], [5, 2, 2**40, 7]])
def test_index_tensor_is_torch_tensor_of_the_list(values):
    got = index_tensor(values, "cpu")
    assert got.dtype == torch.int64 and got.tolist() == values
    values.append(1)  # built from a copy: the list may change after
    assert got.tolist() == values[:-1]
