"""Deployment runtimes as measurement backends: ONNX Runtime and OpenVINO time the exported model,
after checking its outputs against PyTorch's; their name and version key the cache; a runtime that
is missing, or a model it cannot run, is one line naming the runtime."""

from __future__ import annotations

import importlib.metadata

import pytest
import timm
import torch
from torch import nn

from nas.errors import UserError
from nas.hardware import runtimes
from nas.hardware.cache import ResultCache
from nas.hardware.fingerprint import fingerprint
from nas.hardware.measure import measure_safely
from nas.hardware.target import Target
from nas.ops import timm_patch
from nas.space import load_space
from nas.supernet.subnet import VitnasSubnet

BACKENDS = ("onnxruntime", "openvino")
#: psvit-digits members that hold every op kind between them: linear attention, share cells, ToMe,
#: EViT and cluster reductions, conv1d and avg pooling (asserted below)
SEEDS = (0, 5, 11)


def target(backend: str) -> Target:
    return Target.parse(f"cpu:threads=1,batch=1,backend={backend}")


def subnet(seed: int) -> tuple[nn.Module, tuple[int, ...]]:
    arch = load_space("psvit-digits").sample(seed)
    torch.manual_seed(seed)
    return VitnasSubnet(arch).eval(), (1, 3, arch.image_size, arch.image_size)


def tiny_deit(schedule: dict) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(
        "deit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, depth=3, embed_dim=48,
        num_heads=3, num_classes=10,
    )  # fmt: skip
    return timm_patch.apply(model.eval(), schedule)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_runtime_measures_a_positive_latency_cached_under_its_own_key(backend, tmp_path):
    model, shape = subnet(SEEDS[0])
    result = measure_safely(model, target(backend), input_shape=shape, time_budget_s=0.2)
    assert result.ok and result.latency.median_ms > 0 and result.latency.backend == backend
    eager = target("eager")
    fp, fp_eager = fingerprint(target(backend)), fingerprint(eager)
    assert fp.runtime.startswith(f"{backend} ") and fp_eager.runtime is None and fp.digest() != fp_eager.digest()
    assert "runtime" not in fp_eager.to_dict()  # eager digests are the ones cached before runtimes existed
    cache = ResultCache(f"sqlite:///{tmp_path / 'cache.db'}")
    cache.put("arch", fp, target(backend), result)
    assert cache.get("arch", fp, target(backend)).latency.median_ms == result.latency.median_ms
    assert cache.get("arch", fp_eager, eager) is None


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_op_kind_runs_on_the_runtime_as_in_pytorch(backend):
    kinds = set()
    models = []
    for seed in SEEDS:
        model, shape = subnet(seed)
        for st in model.arch.stages:
            kinds |= {st.attention, st.pool, st.reduction.kind, *st.cells}
        models.append((model, shape))
    assert {"linear", "share", "tome", "evit", "cluster", "conv1d", "avg"} <= kinds
    for schedule in ({"kind": "tome", "r": 2}, {"kind": "evit", "keep_rate": 0.5, "layers": [1]}):
        models.append((tiny_deit(schedule), (1, 3, 16, 16)))
    for model, shape in models:
        result = measure_safely(model, target(backend), input_shape=shape, time_budget_s=0.1)
        assert result.ok, result.error  # prepare() compared the runtime's outputs with PyTorch's (1e-4)


class Eig(nn.Module):
    """An op no ONNX exporter lowers (complex eigenvalues)."""

    def forward(self, x):
        return torch.linalg.eigvals(x.flatten(1)[:, :4].reshape(-1, 2, 2)).real


def test_an_op_the_runtime_cannot_take_fails_the_candidate_in_one_line():
    result = measure_safely(Eig(), target("onnxruntime"), input_shape=(1, 3, 2, 2), time_budget_s=0.1)
    assert not result.ok and "\n" not in result.error
    assert "eig" in result.error.lower() and ("onnx" in result.error.lower())


def test_a_missing_runtime_is_a_user_error_before_anything_runs(monkeypatch):
    real = importlib.metadata.version

    def version(name):
        if name.startswith("openvino"):
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(UserError, match=r"backend=openvino needs openvino, which is not installed: pip install"):
        target("openvino").require_available()


def test_runtimes_refuse_what_they_cannot_measure():
    with pytest.raises(UserError, match="measures float32"):
        Target.parse("cpu:threads=1,dtype=bfloat16,backend=onnxruntime").require_available()
    with pytest.raises(UserError, match="backend='tvm'"):
        Target.parse("cpu:backend=tvm")
    assert runtimes.BACKENDS == ("eager", "compile", "onnxruntime", "openvino", "tensorrt")
