"""vitnas_subnet keeps timm's model conventions: a port of the checks of timm's tests/test_models.py.

Over ``MEMBERS`` seeded random members of every shipped psvit space and the hand-made architectures
that cover the op kinds no shipped space draws (``vitnas_archs``). Each check says which of timm's
tests it ports; what does not apply is said where it would be (spatial ``NCHW`` outputs: the tokens
of a reduced network are not a patch grid; TorchScript: vitnas never scripts its models).
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import timm
import torch
from timm.models import FeatureInfo
from vitnas_archs import ALL_KINDS, KIND_ARCHS, cases, kinds, members, psvit_spaces

import nas  # noqa: F401  (registers vitnas_subnet with timm)
from nas.arch import arch_from_dict
from nas.errors import UserError
from nas.supernet import Supernet
from nas.supernet.subnet import VitnasSubnet
from nas.weights import save_weights

CASES = cases()
IDS = [f"{name}-{i}" for name, i in CASES]


def _some_slow(every_case: list[tuple[str, int]], fast_224px: int, every: int = 1) -> list:
    """Every case, the costlier ones marked slow: 224 px members (psvit-tiny) after the first
    ``fast_224px``, and of the other spaces' members all but every ``every``-th. The fast run
    keeps each space and both hand-made architectures; ``-m slow`` runs the rest."""
    out = []
    for name, i in every_case:
        big = members(name)[i].image_size >= 224
        slow = i >= fast_224px if big else i % every != 0
        out.append(pytest.param(name, i, id=f"{name}-{i}", marks=[pytest.mark.slow] if slow else []))
    return out


pytestmark = pytest.mark.usefixtures("one_thread")


def _arch(name: str, i: int):
    return members(name)[i]


def _input(arch, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, arch.in_chans, arch.image_size, arch.image_size, generator=g)


def _create(arch, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model("vitnas_subnet", arch=arch, **kwargs)


@functools.cache
def _built(name: str, i: int):
    """One ``timm.create_model("vitnas_subnet", arch=...)`` per case for the whole module (building
    the 224 px members costs more than checking them); tests get copies."""
    return _create(_arch(name, i)).eval()


def _model(name: str, i: int):
    return copy.deepcopy(_built(name, i))


def test_the_cases_cover_every_op_kind_and_every_shipped_psvit_space():
    assert psvit_spaces() and all(len(members(name)) == 10 for name in psvit_spaces())
    seen = set().union(*(kinds(a) for name in [*psvit_spaces(), *KIND_ARCHS] for a in members(name)))
    assert ALL_KINDS <= seen, ALL_KINDS - seen


# -- test_model_forward / test_model_default_cfgs(_non_std) ------------------------------------------
@pytest.mark.parametrize("name, i", CASES, ids=IDS)
def test_forward_default_cfg_features_head_and_classifier_resets(name, i):
    arch = _arch(name, i)
    model = _model(name, i)
    size = (arch.in_chans, arch.image_size, arch.image_size)
    cfg = model.pretrained_cfg
    assert model.default_cfg == cfg
    assert cfg["input_size"] == size and cfg["num_classes"] == arch.num_classes and cfg["fixed_input_size"]
    assert len(cfg["mean"]) == len(cfg["std"]) == arch.in_chans
    state = model.state_dict()
    assert cfg["first_conv"] + ".weight" in state and cfg["classifier"] + ".weight" in state
    data = timm.data.resolve_data_config({}, model=model)
    assert data["input_size"] == size and data["mean"] == cfg["mean"] and data["std"] == cfg["std"]
    assert model.num_classes == arch.num_classes and model.num_features == model.head_hidden_size > 0

    x = _input(arch)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, arch.num_classes) and torch.isfinite(out).all()
        features = model.forward_features(x)
        assert features.shape == (2, arch.stages[-1].exit_tokens, model.num_features)
        pre = model.forward_head(features, pre_logits=True)
        assert pre.shape == (2, model.head_hidden_size)
        assert torch.equal(model.forward_head(features), out)
        model.reset_classifier(0)
        assert model.num_classes == 0
        pooled = model(x)
        assert pooled.shape == (2, model.head_hidden_size) and torch.equal(pooled, pre)
        model.reset_classifier(0, "")
        assert torch.equal(model(x), features)
        unpooled = _create(arch, num_classes=0, global_pool="").eval()
        assert unpooled(x).shape == features.shape
        model.reset_classifier(7, "token")
        assert model(x).shape == (2, 7) and model.num_classes == 7


def test_the_subnet_forward_is_the_supernet_forward():
    # forward_features + forward_head (timm's split) computes what the supernet's logits are
    name = psvit_spaces()[0]
    from nas.space import load_space, shipped_space_path

    net = Supernet(load_space(shipped_space_path(name))).eval()
    for arch in members(name)[:3]:
        x = _input(arch)
        with torch.no_grad():
            assert (net.extract(arch).eval()(x) - net(x, arch)).abs().max() < 1e-5


# -- test_model_backward -----------------------------------------------------------------------------
@pytest.mark.parametrize("name, i", CASES, ids=IDS)
def test_backward_reaches_every_parameter(name, i):
    arch = _arch(name, i)
    model = _model(name, i)
    model.reset_classifier(42)
    model.train()
    out = model(_input(arch))
    assert out.shape == (2, 42) and torch.isfinite(out).all()
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


# -- create_model kwargs that timm's train script passes ----------------------------------------------
@pytest.mark.parametrize("name, i", _some_slow(CASES, fast_224px=1, every=3))
def test_drop_rate_drop_path_rate_global_pool_and_in_chans(name, i):
    arch = _arch(name, i)
    x = _input(arch)
    plain = _create(arch, seed=1).eval()
    dropping = _create(arch, seed=1, drop_rate=0.5, drop_path_rate=0.3, in_chans=arch.in_chans).eval()
    rates = dropping.drop_path_rates
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.3) and list(rates) == sorted(rates)
    assert len(rates) == len(dropping.feature_info)
    with torch.no_grad():
        assert torch.equal(dropping(x), plain(x))  # eval: no dropout, no drop-path
        dropping.train()
        torch.manual_seed(0)
        first = dropping(x)
        second = dropping(x)
        assert not torch.equal(first, second)  # random per forward in training
    avg = _create(arch, seed=1, global_pool="avg").eval()
    with torch.no_grad():
        features = avg.forward_features(x)
        torch.testing.assert_close(avg.forward_head(features, pre_logits=True), features[:, 1:].mean(1))
    with pytest.raises(UserError, match=f"in_chans={arch.in_chans + 1}.*{arch.in_chans}-channel"):
        _create(arch, in_chans=arch.in_chans + 1)
    with pytest.raises(UserError, match="global_pool 'map'"):
        _create(arch, global_pool="map")
    with pytest.raises(TypeError, match="unexpected arguments: bogus"):
        _create(arch, bogus=1)


def test_supernet_never_drops_paths_so_train_and_eval_agree():
    name = psvit_spaces()[0]
    from nas.space import load_space, shipped_space_path

    net = Supernet(load_space(shipped_space_path(name)))
    arch = members(name)[0]
    x = _input(arch)
    with torch.no_grad():
        assert torch.equal(net.train()(x, arch), net.eval()(x, arch))


def test_pretrained_file_metadata_sets_mean_std_and_overlay_wins(tmp_path):
    arch = members(psvit_spaces()[0])[0]
    source = _create(arch).eval()
    file = tmp_path / "weights.safetensors"
    save_weights(source, file, metadata={"mean": "[0.1, 0.2, 0.3]", "std": "[0.5]"})
    model = _create(arch, pretrained_file=str(file)).eval()
    assert model.pretrained_cfg["mean"] == (0.1, 0.2, 0.3) and model.pretrained_cfg["std"] == (0.5,) * 3
    data = timm.data.resolve_data_config({}, model=model)
    assert data["mean"] == (0.1, 0.2, 0.3) and data["input_size"] == (3, arch.image_size, arch.image_size)
    x = _input(arch)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))
        checkpoint = _create(arch, checkpoint_path=str(file)).eval()  # timm's own loader
        assert torch.equal(checkpoint(x), source(x))
        # train.py --pretrained-path: pretrained=True, the file in the cfg overlay (num_classes -1: keep)
        overlay = {"file": str(file), "num_classes": -1}
        assert torch.equal(_create(arch, pretrained=True, pretrained_cfg_overlay=overlay).eval()(x), source(x))
    overlaid = _create(arch, pretrained_file=str(file), pretrained_cfg_overlay={"mean": (0.0, 0.0, 0.0)})
    assert overlaid.pretrained_cfg["mean"] == (0.0, 0.0, 0.0) and overlaid.pretrained_cfg["std"] == (0.5,) * 3
    plain = tmp_path / "plain.safetensors"
    save_weights(source, plain)
    assert _create(arch, pretrained_file=str(plain)).pretrained_cfg["mean"] == (0.485, 0.456, 0.406)
    bad = tmp_path / "bad.safetensors"
    save_weights(source, bad, metadata={"mean": "[0.1, 0.2]", "std": "[1, 1, 1]"})
    with pytest.raises(UserError, match="bad.safetensors: metadata mean"):
        _create(arch, pretrained_file=str(bad))
    # a new head on the loaded trunk; features_only loads before pruning
    with torch.no_grad():
        headless = _create(arch, pretrained_file=str(file), num_classes=0).eval()
        torch.testing.assert_close(
            headless(x), source.forward_head(source.forward_features(x), pre_logits=True)
        )
        features = _create(arch, pretrained_file=str(file), features_only=True).eval()
        expected = source.forward_intermediates(x, indices=features.out_indices, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(features(x), expected))


def test_weights_come_from_local_files_only_and_a_url_or_hub_id_is_one_line():
    """Nothing is fetched at run time: a URL in place of the file, or a hub id without a file, is
    refused in one line before any network is touched."""
    arch = members(psvit_spaces()[0])[0]
    for overlay, match in (
        ({"file": "https://example.com/weights.safetensors"}, "no such weights file .*local files only"),
        ({"hf_hub_id": "timm/deit_tiny_patch16_224"}, "no hub weights"),
    ):
        with pytest.raises(UserError, match=match) as err:
            _create(arch, pretrained=True, pretrained_cfg_overlay=overlay)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="no such weights file"):
        _create(arch, pretrained_file="missing.safetensors")


def test_direct_construction_has_the_cfg_and_the_registry_has_one():
    arch = _arch("kinds-b", 0)
    model = VitnasSubnet(arch)
    assert model.pretrained_cfg["input_size"] == (1, 16, 16) and len(model.pretrained_cfg["mean"]) == 1
    assert timm.models.get_pretrained_cfg("vitnas_subnet").first_conv == "patch_embed.proj"
    assert "vitnas_subnet" in timm.list_models("vitnas*")


# -- test_model_forward (grad checkpointing part) -----------------------------------------------------
@pytest.mark.parametrize("name, i", _some_slow(CASES, fast_224px=1, every=2))
def test_grad_checkpointing_gives_the_same_outputs_and_gradients(name, i):
    arch = _arch(name, i)
    model = _model(name, i).train()
    x = _input(arch)

    def run():
        model.zero_grad()
        out = model(x)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out, grads = run()
    model.set_grad_checkpointing()
    out2, grads2 = run()
    torch.testing.assert_close(out2, out, rtol=1e-4, atol=1e-5)
    for n, g in grads.items():
        torch.testing.assert_close(grads2[n], g, rtol=1e-4, atol=1e-5, msg=n)


# -- test_model_forward_intermediates(_features) / test_model_forward_features ------------------------
@pytest.mark.parametrize("name, i", CASES, ids=IDS)
def test_forward_intermediates_and_feature_info(name, i):
    arch = _arch(name, i)
    model = _model(name, i)
    x = _input(arch)
    info = FeatureInfo(model.feature_info, len(model.feature_info))  # checks reductions never decrease
    computing = sum(st.depth for st in arch.stages)
    assert len(model.feature_info) == computing
    assert info.reduction()[0] >= arch.patch_size
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        assert len(inter) == computing
        for o, chs, entry in zip(inter, info.channels(), model.feature_info):
            assert o.shape == (2, entry["tokens"] - 1, chs) and torch.isfinite(o).all()
            assert o.shape[1] <= math.ceil((arch.image_size / entry["reduction"]) ** 2 * 2)
        assert torch.equal(final[:, 1:], model.norm(inter[-1]))  # the last intermediate, normalised

        pairs = model.forward_intermediates(
            x, indices=[0, -1], return_prefix_tokens=True, intermediates_only=True
        )
        assert len(pairs) == 2 and pairs[0][1].shape == (2, 1, arch.stages[0].dim)
        assert torch.equal(pairs[1][0], inter[-1])
        normed = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
        assert torch.equal(normed[0], final[:, 1:])
        early, only_first = model.forward_intermediates(x, indices=[0], stop_early=True)
        assert torch.equal(only_first[0], inter[0]) and early.shape[-1] == info.channels()[0]
        with pytest.raises(ValueError, match="NLC"):
            model.forward_intermediates(x, output_fmt="NCHW")


@pytest.mark.parametrize("name, i", _some_slow(CASES, fast_224px=2))
def test_features_only_gives_the_intermediates_of_each_stage(name, i):
    arch = _arch(name, i)
    model = _model(name, i)
    x = _input(arch)
    with torch.no_grad():
        inter = model.forward_intermediates(x, intermediates_only=True)
        features = _create(arch, features_only=True).eval()
        model.load_state_dict(features.model.state_dict(), strict=False)  # same weights (head, norm pruned)
        outs = features(x)
        default = tuple(p - 1 for p in _stage_ends(arch))
        assert tuple(features.out_indices) == default and len(outs) == len(features.feature_info.channels())
        expected = model.forward_intermediates(x, indices=default, intermediates_only=True)
        for o, e, chs in zip(outs, expected, features.feature_info.channels()):
            assert torch.equal(o, e) and o.shape[-1] == chs

        first = _create(arch, features_only=True, out_indices=(0,)).eval()
        assert len(first(x)) == 1 and first(x)[0].shape == inter[0].shape
        assert first.model.head_hidden_size == arch.stages[0].dim


def _stage_ends(arch) -> list[int]:
    ends, total = [], 0
    for st in arch.stages:
        total += st.depth
        if st.depth:
            ends.append(total)
    return ends


def test_prune_intermediate_layers_keeps_what_runs_and_drops_the_rest():
    arch = members(psvit_spaces()[0])[1]
    model = _create(arch).eval()
    x = _input(arch)
    with torch.no_grad():
        _, inter = model.forward_intermediates(x)
        kept = model.prune_intermediate_layers([0])
        assert kept == [0]
        assert torch.equal(model.forward_features(x)[:, 1:], inter[0])  # later cells, norm and head gone
        assert not any(k.startswith("stages.2.") for k in model.state_dict())
        assert model.forward_intermediates(x, indices=1, intermediates_only=True)[0].shape == inter[0].shape


def test_a_last_stage_of_identity_cells_still_pools_and_normalises():
    arch = arch_from_dict(
        {
            "image_size": 8,
            "patch_size": 2,
            "num_classes": 4,
            "stages": [
                {"tokens": 17, "dim": 16, "heads": 2, "mlp_ratio": 2.0, "cells": ["basic", "basic"]},
                {
                    "tokens": 5,
                    "pool": "conv1d",
                    "dim": 24,
                    "heads": 2,
                    "mlp_ratio": 2.0,
                    "cells": ["identity"],
                },
            ],
        }
    )
    model = _create(arch).eval()
    x = _input(arch)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 5, 24)
        for stop_early in (False, True):
            final, inter = model.forward_intermediates(x, indices=[1], stop_early=stop_early)
            assert torch.equal(final, features) and inter[0].shape == (2, 16, 16)
        assert [f["num_chs"] for f in model.feature_info] == [16, 16]
        model.prune_intermediate_layers([1])  # the last computing cell: the whole network still runs
        assert torch.equal(model.forward_features(x), features)
        model.prune_intermediate_layers([0])
        assert model.forward_features(x).shape == (2, 17, 16) and model.num_features == 16


# -- test_model_forward_fx / test_model_backward_fx ---------------------------------------------------
def _fx_model(model):
    """timm's ``_create_fx_model``: torchvision's feature extractor with timm's tracer settings."""
    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    tracer_kwargs = dict(
        leaf_modules=get_notrace_modules(),
        autowrap_functions=get_notrace_functions(),
        param_shapes_constant=True,
    )
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(
        model,
        train_return_nodes=[train_nodes[-1]],
        eval_return_nodes=[eval_nodes[-1]],
        tracer_kwargs=tracer_kwargs,
    )


@pytest.mark.parametrize("name, i", _some_slow(CASES, fast_224px=3))
def test_fx_symbolic_trace_computes_what_eager_does(name, i):
    arch = _arch(name, i)
    model = _model(name, i)
    x = _input(arch)
    with torch.inference_mode():
        assert torch.equal(torch.fx.symbolic_trace(model)(x), model(x))


@pytest.mark.parametrize("name, i", _some_slow(CASES, fast_224px=1, every=3))
def test_fx_feature_extractor_forward_equals_eager_and_backward_reaches_every_parameter(name, i):
    # timm's test_model_forward_fx (eval graph, exact equality) and test_model_backward_fx (train graph)
    arch = _arch(name, i)
    model = _create(arch, num_classes=42, drop_path_rate=0.1)  # drop-path ops in the train graph
    x = _input(arch)
    fx = _fx_model(model)  # traces the train and the eval graph
    with torch.inference_mode():
        assert torch.equal(tuple(fx.eval()(x).values())[0], model.eval()(x))
    fx.train()
    out = tuple(fx(x).values())[0]
    out.mean().backward()
    assert out.shape == (2, 42)
    assert all(p.grad is not None for p in fx.parameters())


# -- torch.compile ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(KIND_ARCHS))
def test_torch_compile_captures_every_op_kind_in_one_graph(name):
    # dynamo's capture (backend "eager": no code generation) refuses graph breaks with fullgraph=True
    arch = _arch(name, 0)
    model = _model(name, 0)
    x = _input(arch)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, i",
    [(n, 0) for n in psvit_spaces()] + [(n, 0) for n in KIND_ARCHS],  # inductor: ~1 min a model on 2 cores
)
def test_torch_compile_inductor_fullgraph_equals_eager_at_any_batch(name, i):
    arch = _arch(name, i)
    model = _model(name, i)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True)
        for batch in (2, 3):  # the second batch size recompiles with a dynamic batch dimension
            x = _input(arch, batch=batch, seed=batch)
            torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(KIND_ARCHS))
def test_torch_compile_training_step_equals_eager(name):
    arch = _arch(name, 0)
    model = _create(arch).train()
    x = _input(arch)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    expected = model(x)
    expected.square().mean().backward()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)
