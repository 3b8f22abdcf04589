"""``vitnas profile``: params and FLOPs agree with their definitions, the CLI speaks JSON, and a bad
``--reduce`` is one line on stderr and exit status 2."""

from __future__ import annotations

import json

import pytest
import torch

from nas.arch import ArchConfig, TimmArch
from nas.cli import main
from nas.errors import UserError
from nas.hardware.flops import flops
from nas.hardware.profile import load_model, parse_reduce, profile
from nas.hardware.target import Target
from nas.space import load_space
from nas.supernet.subnet import VitnasSubnet


@pytest.fixture
def arch_file(tmp_path):
    path = tmp_path / "arch.yaml"
    path.write_text(load_space("psvit-digits").sample(4).to_yaml())
    return path


def test_profile_counts_params_and_flops(arch_file):
    loaded = load_model(arch=str(arch_file))
    model = loaded.module
    assert isinstance(model, VitnasSubnet)
    result = profile(loaded, Target.parse("cpu:threads=1,batch=2"), time_budget_s=0.05)
    assert result.params == sum(p.numel() for p in model.parameters())
    assert result.flops == flops(model, torch.zeros(1, 3, 32, 32)) > 0
    assert result.input_shape == (3, 32, 32)
    assert result.latency.median_ms > 0 and result.latency.repeats >= 1
    assert result.to_dict()["target"] == "cpu:threads=1,dtype=float32,batch=2,backend=eager"


def test_cli_no_latency_json_parses(arch_file, capsys):
    assert main(["profile", "--arch", str(arch_file), "--no-latency", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    arch = ArchConfig.model_validate(load_space("psvit-digits").sample(4).to_dict())
    assert out["params"] == sum(p.numel() for p in VitnasSubnet(arch).parameters())
    assert out["latency"] is None and out["gflops"] == pytest.approx(out["flops"] / 1e9)


def test_cli_prints_a_table(arch_file, capsys):
    assert main(["profile", "--arch", str(arch_file), "--target", "cpu:threads=1", "--budget-s", "0.05"]) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header[:4] == ["model", "input", "params_M", "GFLOPs"] and "latency_ms" in header


@pytest.mark.parametrize(
    "spec",
    ["tome", "tome:r=x", "tome:r=8,decreasing=4", "tome:q=1", "evit:keep=1.5,layers=3", "evit:keep=0.7",
     "evit:keep=0.7,layers=a/b", "merge:r=8", "tome:r=8,r=4", "tome:r=8,prop_attn=maybe"],
)  # fmt: skip
def test_bad_reduce_is_one_line_and_exit_2(spec, capsys):
    assert main(["profile", "--timm", "deit_tiny_patch16_224", "--reduce", spec, "--no-latency"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"vitnas: error: bad --reduce {spec!r}:")


def test_reduce_grammar():
    assert parse_reduce("none") == {"kind": "none"}
    assert parse_reduce("tome:r=8") == {"kind": "tome", "r": 8}
    assert parse_reduce("tome:r=4/2/0") == {"kind": "tome", "r": [4, 2, 0]}
    assert parse_reduce("tome:decreasing=16,prop_attn=false") == {
        "kind": "tome",
        "r": {"rule": "decreasing", "start": 16},
        "prop_attn": False,
    }
    assert parse_reduce("evit:keep=0.7,layers=3/6/9") == {
        "kind": "evit",
        "keep_rate": 0.7,
        "layers": [3, 6, 9],
    }


def test_reduce_on_a_psvit_arch_is_refused(arch_file):
    with pytest.raises(UserError, match="--reduce applies to timm models"):
        load_model(arch=str(arch_file), reduce="tome:r=2")


def test_timm_arch_with_tome_has_fewer_flops(tmp_path):
    """A timm architecture file (a small input keeps fvcore's trace short); --reduce replaces its schedule."""
    path = tmp_path / "timm.yaml"
    path.write_text(TimmArch(model="deit_tiny_patch16_224", image_size=64, num_classes=10).to_yaml())
    base = profile(load_model(arch=str(path)))
    merged = profile(load_model(arch=str(path), reduce="tome:r=2"))
    assert base.input_shape == (3, 64, 64)
    assert merged.params == base.params and merged.flops < 0.8 * base.flops
    assert merged.model.endswith("[tome:r=2]")
