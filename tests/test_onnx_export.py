"""ONNX export with a dynamic batch, checked against PyTorch with ONNX Runtime (nas.onnx_export).

Fast (an export costs seconds): one small architecture (linear attention with ToMe, avg pooling, a
share cell, EViT), the error messages, and that the architectures the slow tests export cover
every op kind. Slow: random members of every shipped psvit space, the hand-made architectures that
hold the kinds no shipped space draws (clustering with each method, conv2d pooling), a
``features_only`` model, and timm ViTs patched with ToMe (both orders) and EViT.
"""

from __future__ import annotations

import sys

import onnx
import onnx.helper
import pytest
import timm
import torch
from onnx import TensorProto
from vitnas_archs import ALL_KINDS, KIND_ARCHS, kinds, members, psvit_spaces

import nas  # noqa: F401  (registers vitnas_subnet with timm)
from nas.arch import arch_from_dict
from nas.errors import UserError
from nas.onnx_export import ONNX_EXTRA, OnnxCheck, check_onnx, export_onnx, open_session, run_session
from nas.ops import timm_patch

ATOL = 1e-4
SLOW_MEMBERS = 4  # per shipped space: with the hand-made archs, every kind (checked below)
SMALL = arch_from_dict(
    {
        "image_size": 8,
        "patch_size": 2,
        "in_chans": 1,
        "num_classes": 3,
        "stages": [
            {
                "tokens": 17,
                "dim": 16,
                "heads": 2,
                "mlp_ratio": 2.0,
                "attention": "linear",
                "cells": ["basic", "basic"],
                "reduction": {"kind": "tome", "r": [2, 2]},
            },
            {
                "tokens": 9,
                "pool": "avg",
                "dim": 24,
                "heads": 2,
                "mlp_ratio": 2.0,
                "cells": ["basic", "share", "basic"],
                "reduction": {"kind": "evit", "keep_rate": 0.5, "at": [2]},
            },
        ],
    }
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(arch, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model("vitnas_subnet", arch=arch, **kwargs).eval()


def _shape(arch) -> tuple[int, int, int]:
    return (arch.in_chans, arch.image_size, arch.image_size)


def _vit(depth: int = 4):
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=depth, num_classes=10
    ).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """SMALL exported once: its model, its check and the folder it was written to."""
    model = _model(SMALL)
    folder = tmp_path_factory.mktemp("onnx")
    return model, export_onnx(model, folder, threads=1), folder


def test_export_writes_a_batch_dynamic_model_that_onnx_runtime_runs_like_pytorch(exported):
    model, check, folder = exported
    assert isinstance(check, OnnxCheck)
    assert check.path == folder / "model.onnx" and check.path.is_file()
    assert check.opset == 18 and check.runtime.startswith("onnxruntime ")
    assert check.batches == (2, 3) and check.input_shape == (1, 8, 8)
    assert 0 <= check.max_abs_diff <= ATOL
    graph = onnx.load(str(check.path)).graph
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value  # symbolic: any batch size
    # the runtime half on its own (what latency measurement reuses): a session with chosen threads
    session = open_session(check.path, threads=1)
    x = torch.randn(5, 1, 8, 8)
    with torch.inference_mode():
        expected = model(x)
    (out,) = run_session(session, x)
    assert out.shape == (5, 3) and (torch.from_numpy(out) - expected).abs().max() <= ATOL


def test_outputs_that_differ_are_a_one_line_user_error(exported):
    model, check, _ = exported
    other = _model(SMALL, seed=1)
    with pytest.raises(UserError) as err:
        check_onnx(check.path, other, (1, 8, 8))
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(f"{check.runtime}: output 0 differs from PyTorch's by ")
    assert f"> atol {ATOL:g}" in str(err.value)


def test_an_op_the_exporter_cannot_handle_is_named_in_one_line(tmp_path):
    class Eigen(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.eigvals(x[:, 0, :4, :4]).real

    with pytest.raises(UserError) as err:
        export_onnx(Eigen(), tmp_path / "eig.onnx", (3, 8, 8))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(
        f"torch.onnx (torch {torch.__version__}, opset 18): cannot export op aten.linalg_eig"
    )
    assert not (tmp_path / "eig.onnx").exists()  # nothing half-written is left


def _onnx_file(path, node, inputs, outputs, opsets=(("", 17),)):
    graph = onnx.helper.make_graph([node], "g", inputs, outputs)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_an_op_the_runtime_cannot_run_is_named_in_one_line(tmp_path):
    import onnxruntime

    runtime = f"onnxruntime {onnxruntime.__version__}"
    value = onnx.helper.make_tensor_value_info
    bad_type = _onnx_file(
        tmp_path / "cos.onnx",
        onnx.helper.make_node("Cos", ["x"], ["y"], name="n0"),
        [value("x", TensorProto.INT64, [2])],
        [value("y", TensorProto.INT64, [2])],
    )
    with pytest.raises(UserError) as err:
        open_session(bad_type)
    assert "\n" not in str(err.value) and str(err.value).startswith(
        f"{runtime}: cannot run op Cos (node 'n0')"
    )
    unknown = _onnx_file(
        tmp_path / "foo.onnx",
        onnx.helper.make_node("Foo", ["x"], ["y"], domain="com.example"),
        [value("x", TensorProto.FLOAT, [2])],
        [value("y", TensorProto.FLOAT, [2])],
        opsets=(("", 17), ("com.example", 1)),
    )
    with pytest.raises(UserError, match=rf"^{runtime}: cannot run op com.example:Foo: not a registered op"):
        open_session(unknown)


@pytest.mark.parametrize("missing", ["onnxruntime", "onnxscript", "onnx"])
def test_without_the_onnx_extra_the_error_says_how_to_install_it(monkeypatch, tmp_path, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # import raises ImportError
    with pytest.raises(UserError) as err:
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "m.onnx", (1, 1, 2))
    assert str(err.value) == ONNX_EXTRA == "ONNX export needs the onnx extra: pip install 'vitnas[onnx]'"
    with pytest.raises(UserError, match="vitnas\\[onnx\\]"):
        open_session(tmp_path / "m.onnx")


def test_a_block_of_tokens_exports_with_its_own_sample_shape(tmp_path):
    """What the latency table times on a deployment runtime: one cell of tokens ``(N, C)``, not images."""
    from nas.hardware.parts import CellPart, decompose

    cell, n = next((part, n) for part, n in decompose(SMALL) if isinstance(part, CellPart))
    module, shape = cell.module(n)
    assert len(shape) == 2  # (N, C)
    check = export_onnx(module, tmp_path / "cell.onnx", shape)
    assert check.input_shape == shape and check.max_abs_diff <= ATOL and check.batches == (2, 3)
    assert [i.name for i in onnx.load(str(check.path)).graph.input] == ["input"]


def test_bad_arguments_are_user_errors(tmp_path):
    model = _model(SMALL)
    with pytest.raises(UserError, match="opset 16: must be an integer >= 17"):
        export_onnx(model, tmp_path, opset=16)
    for bad in ((), (16, 0), (16, 2.5), (True, 16)):
        with pytest.raises(UserError, match="expected one sample's shape, positive integers"):
            export_onnx(model, tmp_path, bad)


def _slow_archs() -> list:
    out = [(name, i) for name in psvit_spaces() for i in range(SLOW_MEMBERS)]
    return out + [(name, 0) for name in KIND_ARCHS]


def test_the_small_architecture_has_the_kinds_it_claims():
    assert {"attention:linear", "reduction:tome", "pool:avg", "cell:share", "reduction:evit"} <= kinds(SMALL)


def test_the_exported_architectures_cover_every_op_kind():
    seen = set().union(*(kinds(members(name)[i]) for name, i in _slow_archs()))
    assert ALL_KINDS <= seen, ALL_KINDS - seen


@pytest.mark.slow
@pytest.mark.parametrize("name, i", _slow_archs(), ids=[f"{n}-{i}" for n, i in _slow_archs()])
def test_every_member_exports_and_runs_like_pytorch(tmp_path, name, i):
    arch = members(name)[i]
    check = export_onnx(_model(arch), tmp_path / "model.onnx", threads=2)
    assert check.max_abs_diff <= ATOL and check.input_shape == _shape(arch)


@pytest.mark.slow
def test_features_only_models_export_every_stage_output(tmp_path):
    arch = members("kinds-a")[0]
    model = _model(arch, features_only=True)
    check = export_onnx(model, tmp_path, threads=2)
    assert check.max_abs_diff <= ATOL
    assert len(onnx.load(str(check.path)).graph.output) == len(model.feature_info.channels())


@pytest.mark.slow
@pytest.mark.parametrize(
    "schedule",
    [
        {"kind": "tome", "r": 4},
        {"kind": "tome", "r": 4, "order": "spatial"},
        {"kind": "evit", "keep_rate": 0.7, "layers": [1, 2]},
    ],
    ids=["tome", "tome-spatial", "evit"],
)
def test_patched_timm_vits_export_and_run_like_pytorch(tmp_path, schedule):
    model = timm_patch.apply(_vit(), schedule)
    with torch.inference_mode():
        tokens = model.forward_features(torch.randn(2, 3, 32, 32)).shape[1]
    assert tokens < 65  # the patch reduces tokens in the exported graph too
    check = export_onnx(model, tmp_path / "vit.onnx", threads=2)
    assert check.max_abs_diff <= ATOL and check.input_shape == (3, 32, 32)
    assert isinstance(model, timm_patch.ReducingVisionTransformer)  # still patched afterwards
