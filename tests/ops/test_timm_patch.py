"""ToMe and EViT on timm VisionTransformers: exact identities, agreement with a by-hand forward, state."""

import copy
import pickle

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch.testing import assert_close

from nas.errors import UserError
from nas.hardware.profile import parse_reduce
from nas.ops import timm_patch
from nas.ops.evit import evit_fuse
from nas.ops.tome import bipartite_soft_matching

SMALL = dict(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10)  # 64 patches
CONFIGS = {
    "vit": {},
    "vit_explicit_attn": {"fused": False},
    "registers": {"reg_tokens": 2},
    "deit3_layerscale_qknorm": {"init_values": 0.3, "no_embed_class": True, "qk_norm": True},
    "deit3_explicit_attn": {"init_values": 0.3, "no_embed_class": True, "fused": False},
    "avg_head": {"class_token": False, "global_pool": "avg", "fc_norm": True},
    "avg_head_registers": {"class_token": False, "reg_tokens": 1, "global_pool": "avg"},
}


def _model(fused=True, **kwargs):
    torch.manual_seed(0)
    model = VisionTransformer(**{**SMALL, **kwargs}).eval()
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    return model


def _images(b=2, size=64):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(1))


def _by_hand(model, images, tome_r=0, evit=None, order="reference"):
    """The reduced forward written out with timm's own modules (attention through timm's mask argument)."""
    p = model.num_prefix_tokens
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    size = None
    for i, blk in enumerate(model.blocks):
        h = blk.norm1(x)
        b, n, _ = h.shape
        a = blk.attn
        q, k, _ = a.qkv(h).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k = a.q_norm(q), a.k_norm(k)
        mask = None if size is None or evit else size.log().transpose(1, 2).unsqueeze(1)
        x = x + blk.ls1(a(h, attn_mask=mask))
        if tome_r:
            x, size = bipartite_soft_matching(k.mean(1), tome_r, p, order).merge(x, size)
        elif evit and i in evit[1]:
            cls = (q @ k.transpose(-1, -2) * a.scale).softmax(-1)[:, :, 0, p:].mean(1)
            x, size = evit_fuse(x, cls, evit[0], size, p)
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    x = model.norm(x)
    if model.global_pool == "avg":
        w = size[:, p:]
        x = (x[:, p:] * w).sum(1) / w.sum(1)
    else:
        x = x[:, 0]
    return model.head(model.fc_norm(x))


@pytest.mark.parametrize("config", CONFIGS)
def test_no_reduction_is_exactly_the_unpatched_model_and_remove_restores_it(config):
    model = _model(**CONFIGS[config])
    images = _images()
    with torch.no_grad():
        ref = model(images)
        schedules = [{"kind": "none"}, {"kind": "tome", "r": 0}, {"kind": "tome", "r": [0, 0, 0, 0]}]
        if model.cls_token is not None:
            schedules.append({"kind": "evit", "keep_rate": 1.0, "layers": [1, 2]})
        for schedule in schedules:
            timm_patch.apply(model, schedule)
            assert torch.equal(model(images), ref), schedule
            assert torch.equal(model.forward_head(model.forward_features(images)), ref)
        timm_patch.remove(model)
        assert type(model) is VisionTransformer
        assert all(type(blk).__name__ == "Block" for blk in model.blocks)
        assert torch.equal(model(images), ref)


@pytest.mark.parametrize("order", [None, "reference", "spatial"])
@pytest.mark.parametrize("config", CONFIGS)
def test_tome_equals_the_by_hand_forward(config, order):
    """Without `order` the patch is ToMe's reference matching."""
    model = _model(**CONFIGS[config])
    images = _images()
    schedule = {"kind": "tome", "r": 6} | ({} if order is None else {"order": order})
    with torch.no_grad():
        expected = _by_hand(model, images, tome_r=6, order=order or "reference")
        out = timm_patch.apply(model, schedule)(images)
    assert out.shape == (2, 10)
    assert_close(out, expected, atol=1e-5, rtol=1e-4)
    assert timm_patch.token_sizes(model).shape[1] == 64 + model.num_prefix_tokens - 4 * 6


@pytest.mark.parametrize("config", ["vit", "vit_explicit_attn", "registers", "deit3_layerscale_qknorm"])
def test_evit_equals_the_by_hand_forward(config):
    model = _model(**CONFIGS[config])
    images = _images()
    with torch.no_grad():
        expected = _by_hand(model, images, evit=(0.7, [1, 3]))
        out = timm_patch.apply(model, {"kind": "evit", "keep_rate": 0.7, "layers": [1, 3]})(images)
    assert_close(out, expected, atol=1e-5, rtol=1e-4)
    assert timm_patch.token_sizes(model).shape[1] == model.num_prefix_tokens + 33 + 1  # 64 → 45+1 → 33+1


def test_deit_token_counts_and_prefix_positions():
    """DeiT-S geometry (196 patches, 12 blocks): r=8 leaves 197 - 96 tokens; EViT 3/6/9 at 0.7 leaves 1 + 70 + 1."""
    model = VisionTransformer(
        img_size=224, patch_size=16, embed_dim=16, depth=12, num_heads=2, reg_tokens=2
    ).eval()
    images = _images(1, 224)
    with torch.no_grad():
        timm_patch.apply(model, {"kind": "tome", "r": 8, "trace_source": True})
        features = model.forward_features(images)
        src = timm_patch.source(model)
        assert features.shape == (1, 199 - 96, 16) and src.shape == (1, 199 - 96, 199)
        assert torch.equal(src[0, :3], torch.eye(199)[:3])  # class token and registers first, each alone
        assert torch.equal(src.sum(1), torch.ones(1, 199))
        assert torch.equal(src.sum(-1, keepdim=True), timm_patch.token_sizes(model))
        timm_patch.apply(model, {"kind": "evit", "keep_rate": 0.7, "layers": [3, 6, 9]})
        assert model.forward_features(images).shape == (1, 3 + 70 + 1, 16)
        assert timm_patch.source(model) is None


def test_default_patch_orders_tokens_as_the_reference():
    """One merging block, then the sources say: class token, unmerged even positions, every odd one."""
    model = timm_patch.apply(_model(), {"kind": "tome", "r": [6, 0, 0, 0], "trace_source": True})
    with torch.no_grad():
        model(_images())
    held = timm_patch.source(model)
    idx = torch.arange(65.0)
    anchor = torch.where(held.sum(-1) > 1, (held * idx * (idx % 2)).amax(-1), (held * idx).amax(-1))
    for row in anchor.long().tolist():
        assert row[0] == 0 and row[-32:] == list(range(1, 65, 2))
        assert row[1:-32] == sorted(row[1:-32]) and all(j % 2 == 0 for j in row[1:-32])
    spatial = timm_patch.apply(
        model, {"kind": "tome", "r": [6, 0, 0, 0], "order": "spatial", "trace_source": True}
    )
    with torch.no_grad():
        spatial(_images())
    held = timm_patch.source(spatial)
    in_b = (idx % 2 == 0) & (idx > 0)  # spatial B: odd positions among the patches
    anchor = torch.where(held.sum(-1) > 1, (held * idx * in_b).amax(-1), (held * idx).amax(-1))
    assert (anchor[:, 1:] > anchor[:, :-1]).all()  # survivors in sequence order


def test_reduce_grammar_names_order_and_the_reference_inflection_form():
    assert parse_reduce("tome:r=8,order=spatial") == {"kind": "tome", "r": 8, "order": "spatial"}
    assert parse_reduce("tome:r=8,inflection=-1,order=reference") == {
        "kind": "tome",
        "r": {"rule": "inflection", "r": 8, "inflection": -1.0},
        "order": "reference",
    }
    model = timm_patch.apply(_model(), parse_reduce("tome:r=4,inflection=-1"))  # 8, 5, 2, 0 merges
    with torch.no_grad():
        assert model.forward_features(_images()).shape[1] == 65 - 15
    for spec, match in [
        ("tome:r=8,order=sorted", "order='sorted' is not one of reference, spatial"),
        ("tome:decreasing=8,inflection=-1", "goes with a single r=INT"),
        ("tome:r=8/4,inflection=0", "goes with a single r=INT"),
        ("tome:r=8,inflection=-2", "not a number in"),
        ("tome:r=8,inflection=nan", "not a number in"),
    ]:
        with pytest.raises(UserError, match=match):
            parse_reduce(spec)


def test_forward_features_after_forward_and_repeated_calls():
    model = timm_patch.apply(_model(reg_tokens=1), {"kind": "tome", "r": 5})
    images = _images()
    with torch.no_grad():
        out = model(images)
        features = model.forward_features(images)
        assert features.shape == (2, 66 - 20, 32)
        assert torch.equal(model.forward_head(features), out)
        assert torch.equal(model(images), out)
        assert model(images[:1]).shape == (1, 10)


def test_gradients_flow_through_a_patched_model_in_training():
    model = _model(init_values=0.1, qk_norm=True).train()
    timm_patch.apply(model, {"kind": "tome", "r": [8, 4, 2, 0]})
    model(_images()).square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    evit = timm_patch.apply(_model().train(), {"kind": "evit", "keep_rate": 0.5, "layers": [0, 2]})
    evit(_images()).sum().backward()
    assert evit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_deepcopy_pickle_state_dict_and_reapply():
    model = timm_patch.apply(_model(), {"kind": "tome", "r": 4})
    keys = set(_model().state_dict())
    assert set(model.state_dict()) == keys
    twin, pickled = copy.deepcopy(model), pickle.loads(pickle.dumps(model))
    images = _images()
    with torch.no_grad():
        assert torch.equal(twin(images), model(images))
        assert torch.equal(pickled(images), model(images))
        timm_patch.apply(model, {"kind": "tome", "r": 2})
        assert type(model).__mro__[2] is VisionTransformer  # re-applying replaces, never stacks
        assert model.forward_features(images).shape[1] == 65 - 8


@pytest.mark.parametrize(
    ("kwargs", "schedule", "match"),
    [
        ({}, {"kind": "tomee", "r": 2}, "kind in"),
        ({}, {"kind": "tome"}, "needs r"),
        ({}, {"kind": "tome", "r": 2, "keep_rate": 0.5}, "unknown keys"),
        ({}, {"kind": "tome", "r": [1, 2]}, "4 layers"),
        ({}, {"kind": "evit", "keep_rate": 0.7, "layers": [4]}, r"\[0, 4\)"),
        ({}, {"kind": "evit", "keep_rate": 0, "layers": [1]}, "keep_rate"),
        ({}, {"kind": "tome", "r": 2, "prop_attn": "yes"}, "true or false"),
        ({}, {"kind": "tome", "r": 2, "order": "sorted"}, "order must be one of reference, spatial"),
        (
            {"class_token": False, "global_pool": "avg"},
            {"kind": "evit", "keep_rate": 0.7, "layers": [1]},
            "no class token",
        ),
    ],
)
def test_bad_schedules_raise_clear_errors(kwargs, schedule, match):
    with pytest.raises(ValueError, match=match):
        timm_patch.apply(_model(**kwargs), schedule)


def test_rejects_models_it_cannot_patch():
    with pytest.raises(ValueError, match="VisionTransformer"):
        timm_patch.apply(torch.nn.Linear(2, 2), {"kind": "none"})


@pytest.mark.parametrize("order", ["reference", "spatial"])
@pytest.mark.parametrize("batch", [1, 8])
def test_tome_forward_is_the_by_hand_forward_bit_for_bit(order, batch):
    """The patched block (matching on one thread at small batch, one gather per merge) computes
    exactly what the library functions give when called by hand; the thread count is restored."""
    model = _model(reg_tokens=1)
    images = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
    threads = torch.get_num_threads()
    with torch.inference_mode():
        expected = _by_hand(model, images, tome_r=7, order=order)
        out = timm_patch.apply(model, {"kind": "tome", "r": 7, "order": order})(images)
    assert torch.equal(out, expected)
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize(
    "schedule",
    [
        {"kind": "tome", "r": 5},
        {"kind": "tome", "r": 5, "order": "spatial", "trace_source": True},
        {"kind": "evit", "keep_rate": 0.6, "layers": [1, 2]},
    ],
    ids=["tome", "tome-spatial", "evit"],
)
def test_torch_compile_captures_the_patched_model_in_one_graph(schedule):
    """dynamo (backend "eager": no code generation) refuses graph breaks with fullgraph=True; the
    shape caches and the one-thread switch stay out of the graph."""
    model = timm_patch.apply(_model(reg_tokens=1), schedule)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        for batch in (2, 3, 1):
            images = _images(batch)
            assert_close(compiled(images), model(images), rtol=0, atol=1e-5)


def test_reductions_are_labelled_for_the_profiler():
    model = timm_patch.apply(_model(), {"kind": "tome", "r": [4, 0, 2, 0]})
    evit = timm_patch.apply(_model(), {"kind": "evit", "keep_rate": 0.5, "layers": [1]})
    with torch.no_grad(), torch.profiler.profile() as prof:
        model(_images())
        evit(_images())
    names = [e.name for e in prof.events()]
    assert names.count("vitnas::tome") == 2 and names.count("vitnas::evit") == 1
