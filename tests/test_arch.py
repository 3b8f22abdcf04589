"""Behaviour of nas.arch: round trips, the stable hash, legality rules, token traces, flattening."""

import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from nas.arch import (
    ArchConfig,
    Reduction,
    StageConfig,
    TimmArch,
    arch_from_dict,
    arch_from_text,
    arch_hash,
    arch_problems,
    kept_tokens,
    load_arch,
)
from nas.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def stage(tokens, dim=32, heads=2, cells=("basic", "basic"), pool=None, reduction=None, attention="softmax", mlp_ratio=2.0):
    st = {"tokens": tokens, "dim": dim, "heads": heads, "mlp_ratio": mlp_ratio, "attention": attention,
          "cells": list(cells), "pool": pool}
    if reduction is not None:
        st["reduction"] = reduction
    return st


def arch_dict(*stages, image_size=32, patch_size=4, num_classes=10):
    """32 px / 4 px patches: an 8x8 grid, 65 tokens enter the first stage."""
    return {"family": "psvit", "image_size": image_size, "patch_size": patch_size, "in_chans": 3,
            "num_classes": num_classes, "stages": list(stages)}


def rich_dict():
    """Three stages using every feature: tome, evit, cluster, share, identity, linear attention."""
    return arch_dict(
        stage(65, dim=32, heads=2, cells=["basic", "basic", "share"], reduction={"kind": "tome", "r": [8, 0, 0]}),
        stage(33, dim=64, heads=4, cells=["basic", "share", "basic"], pool="avg", mlp_ratio=3.0,
              reduction={"kind": "evit", "keep_rate": 0.7, "at": [2]}),
        stage(9, dim=96, heads=4, cells=["basic", "basic", "identity"], pool="cluster", attention="linear",
              reduction={"kind": "cluster", "keep_rate": 0.5, "at": [0], "method": "weighted_kmedoids"}),
    )


def rejected(data) -> str:
    """The one-line message an illegal architecture gets."""
    with pytest.raises(UserError) as err:
        arch_from_dict(data, "arch.yaml")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("arch.yaml: ")
    # the model itself refuses too (constructing validates)
    with pytest.raises(ValidationError):
        ArchConfig.model_validate(data)
    return msg


# -- round trips -------------------------------------------------------------------------------
def test_rich_arch_is_legal_and_traces():
    arch = arch_from_dict(rich_dict())
    assert isinstance(arch, ArchConfig)
    assert arch_problems(arch) == []
    # 65 -8 -> 57; avg pool to 33, evit keep 0.7 of 32 after cell 2: ceil(22.4)=23 + fused + cls = 25;
    # cluster to 9, keep 0.5 of 8 after cell 0: 4 + cls = 5
    assert arch.token_trace() == [[57, 57, 57], [33, 33, 25], [5, 5, 5]]
    assert [s.exit_tokens for s in arch.stages] == [57, 25, 5]
    assert [s.depth for s in arch.stages] == [3, 3, 2]
    assert arch.grid == 8


def test_yaml_round_trip_equal_object_and_hash():
    arch = arch_from_dict(rich_dict())
    text = arch.to_yaml()
    assert yaml.safe_load(text) == arch.to_dict()
    back = arch_from_text(text)
    assert back == arch
    assert back.arch_hash() == arch.arch_hash()
    assert back.to_yaml() == text


def test_json_round_trip_equal_object_and_hash():
    arch = arch_from_dict(rich_dict())
    text = arch.to_json()
    assert json.loads(text) == arch.to_dict()
    for back in (arch_from_text(text), ArchConfig.model_validate_json(text), arch_from_dict(json.loads(text))):
        assert back == arch
        assert back.arch_hash() == arch.arch_hash()
        assert back.to_json() == text


def test_load_arch_from_yaml_and_json_files(tmp_path):
    arch = arch_from_dict(rich_dict())
    (tmp_path / "arch.yaml").write_text(arch.to_yaml())
    (tmp_path / "arch.json").write_text(arch.to_json())
    for name in ("arch.yaml", "arch.json"):
        back = load_arch(tmp_path / name)
        assert back == arch
        assert back.arch_hash() == arch.arch_hash()
    # a file without "family" is a psvit architecture
    data = arch.to_dict()
    del data["family"]
    (tmp_path / "nofamily.yaml").write_text(yaml.safe_dump(data))
    assert load_arch(tmp_path / "nofamily.yaml") == arch


def test_timm_arch_round_trips_and_flattens(tmp_path):
    arch = TimmArch(model="deit_small_patch16_224", schedule={"kind": "tome", "r": [16, 15, 13]})
    assert arch_from_text(arch.to_yaml()) == arch
    assert arch_from_text(arch.to_json()) == arch
    (tmp_path / "a.yaml").write_text(arch.to_yaml())
    back = load_arch(tmp_path / "a.yaml")
    assert isinstance(back, TimmArch) and back == arch and back.arch_hash() == arch.arch_hash()
    assert arch.flatten() == {"family": "timm", "model": "deit_small_patch16_224", "image_size": 224,
                              "num_classes": 1000, "schedule.kind": "tome", "schedule.r": "16,15,13"}


def test_load_arch_errors_are_one_line(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(UserError, match="no such architecture file"):
        load_arch(missing)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("stages: [\n  - dim: 3\n")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"stages": [}')
    wrong = tmp_path / "wrong.yaml"
    data = rich_dict()
    data["stages"][1]["dim"] = "big"
    wrong.write_text(yaml.safe_dump(data))
    typo = tmp_path / "typo.yaml"
    data = rich_dict()
    data["stages"][0]["dimm"] = 32
    typo.write_text(yaml.safe_dump(data))
    for path, needles in [
        (bad_yaml, ["not valid YAML"]),
        (bad_json, ["not valid JSON"]),
        (wrong, ["stages[1].dim", "'big'"]),
        (typo, ["stages[0].dimm", "Extra inputs are not permitted"]),
    ]:
        with pytest.raises(UserError) as err:
            load_arch(path)
        msg = str(err.value)
        assert "\n" not in msg, msg
        assert msg.startswith(str(path)), msg
        for needle in needles:
            assert needle in msg, (needle, msg)


def test_arch_from_text_bad_yaml_is_user_error():
    with pytest.raises(UserError) as err:
        arch_from_text("stages: [\n", "x.yaml")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("x.yaml: not valid YAML at line 2, column 1: ")
    assert "<unicode string>" not in msg


def test_load_arch_yaml_error_names_the_file(tmp_path):
    path = tmp_path / "arch.yaml"
    path.write_text("family: psvit\nstages:\n  - dim: 3: 4\n")
    with pytest.raises(UserError) as err:
        load_arch(path)
    msg = str(err.value)
    assert msg == f"{path}: not valid YAML at line 3, column 11: mapping values are not allowed here", msg


# -- the hash ----------------------------------------------------------------------------------
def _shuffled(value, rng):
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: _shuffled(v, rng) for k, v in items}
    if isinstance(value, list):
        return [_shuffled(v, rng) for v in value]
    return value


def test_hash_is_16_hex_and_independent_of_key_order():
    data = rich_dict()
    h = arch_from_dict(data).arch_hash()
    assert len(h) == 16 and int(h, 16) >= 0
    orders = set()
    for seed in range(20):
        shuffled = _shuffled(data, random.Random(seed))
        orders.add(json.dumps(shuffled))
        arch = arch_from_dict(shuffled)
        assert arch.arch_hash() == h == arch_hash(arch)
    assert len(orders) > 10  # really different orders
    # int vs float spellings of the same number hash the same (mlp_ratio is a float)
    spelled = copy.deepcopy(data)
    spelled["stages"][0]["mlp_ratio"] = 2
    assert arch_from_dict(spelled).arch_hash() == h


def test_hash_equal_in_a_fresh_process():
    archs = [arch_from_dict(rich_dict()), TimmArch(model="deit_small_patch16_224", schedule={"kind": "evit", "keep_rate": 0.7, "layers": [3, 6, 9]})]
    code = (
        "import sys, json\n"
        "from nas.arch import arch_from_text\n"
        "for line in sys.stdin.read().splitlines():\n"
        "    print(arch_from_text(line).arch_hash())\n"
    )
    # different key order on the way in, and a different str hash seed in the child
    lines = "\n".join(json.dumps(_shuffled(a.to_dict(), random.Random(7))) for a in archs)
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], input=lines, capture_output=True, text=True,
                         cwd=REPO, env=env, timeout=120, check=True)
    assert out.stdout.split() == [a.arch_hash() for a in archs]


def _mutations():
    """Each changes one thing and keeps the architecture legal."""

    def at(path, value):
        def apply(d):
            target = d
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
        return apply

    return {
        "num_classes": at(["num_classes"], 11),
        "in_chans": at(["in_chans"], 1),
        "image+patch": lambda d: d.update(image_size=64, patch_size=8),
        "s0.dim": at(["stages", 0, "dim"], 48),
        "s0.heads": at(["stages", 0, "heads"], 4),
        "s0.mlp_ratio": at(["stages", 0, "mlp_ratio"], 2.5),
        "s0.cells": at(["stages", 0, "cells"], ["basic", "basic", "basic"]),
        "s0.r": at(["stages", 0, "reduction", "r"], [4, 0, 0]),
        "s0.reduction": at(["stages", 0, "reduction"], {"kind": "none"}),
        "s1.tokens": at(["stages", 1, "tokens"], 17),
        "s1.pool": at(["stages", 1, "pool"], "conv1d"),
        "s1.keep_rate": at(["stages", 1, "reduction", "keep_rate"], 0.5),
        "s1.cells": at(["stages", 1, "cells"], ["basic", "basic", "basic"]),
        "s1.at": lambda d: d["stages"][1].update(cells=["basic", "basic", "basic"],
                                                  reduction={"kind": "evit", "keep_rate": 0.7, "at": [1, 2]}),
        "s1.attention": lambda d: d["stages"][1].update(attention="linear", cells=["basic", "basic", "basic"],
                                                         reduction={"kind": "none"}),
        "s2.method": at(["stages", 2, "reduction", "method"], "kmeans"),
        "s2.cells": at(["stages", 2, "cells"], ["basic", "identity", "identity"]),
        "s2.attention": at(["stages", 2, "attention"], "softmax"),
    }


def test_hash_changes_when_any_field_changes():
    base = arch_from_dict(rich_dict())
    hashes = {"base": base.arch_hash()}
    for name, mutate in _mutations().items():
        data = rich_dict()
        mutate(data)
        arch = arch_from_dict(data)
        assert arch != base, name
        hashes[name] = arch.arch_hash()
    assert len(set(hashes.values())) == len(hashes), hashes


# -- legality ----------------------------------------------------------------------------------
def test_dim_not_divisible_by_heads():
    msg = rejected(arch_dict(stage(65), stage(33, dim=30, heads=4, pool="avg")))
    assert "stages[1]: dim 30 is not divisible by heads 4" in msg


def test_tokens_never_grow_between_stages():
    msg = rejected(arch_dict(stage(65), stage(33, pool="avg"), stage(40, pool="avg")))
    assert "stages[2]: tokens 40 > 33" in msg
    # growth against what a reducing stage leaves, not against what entered it
    reducing = stage(65, reduction={"kind": "tome", "r": [8, 8]})  # 65 -> 49
    assert arch_from_dict(arch_dict(reducing, stage(49, pool="avg"))).stages[1].tokens == 49
    msg = rejected(arch_dict(reducing, stage(50, pool="avg")))
    assert "stages[1]: tokens 50 > 49" in msg


def test_share_cannot_open_a_stage():
    msg = rejected(arch_dict(stage(65, cells=["share", "basic"])))
    assert "stages[0].cells[0]: share has no earlier cell in the stage" in msg
    # not even after a leading identity cell
    msg = rejected(arch_dict(stage(65), stage(33, cells=["identity", "share"], pool="avg")))
    assert "stages[1].cells[1]: share" in msg


def test_share_after_identity_reuses_the_cell_before():
    arch = arch_from_dict(arch_dict(stage(65, cells=["basic", "identity", "share"])))
    assert arch.stages[0].depth == 2


def test_share_after_tome_reduction():
    ok = arch_from_dict(arch_dict(stage(65, cells=["basic", "share"], reduction={"kind": "tome", "r": [0, 0]})))
    assert ok.token_trace() == [[65, 65]]
    msg = rejected(arch_dict(stage(65, cells=["basic", "share"], reduction={"kind": "tome", "r": [4, 0]})))
    # cell 0 exists: the cause is the tokens it merged, not a missing cell
    assert "stages[0].cells[1]: share cannot reuse cell 0's attention map: ToMe merges 4 tokens" in msg
    assert "(65 -> 61 tokens)" in msg and "no earlier cell" not in msg


def test_share_after_evit_reduction():
    msg = rejected(arch_dict(stage(65, cells=["basic", "share"], reduction={"kind": "evit", "keep_rate": 0.7, "at": [0]})))
    assert "stages[0].cells[1]: share cannot reuse cell 0's attention map: EViT keeps 0.7" in msg
    assert "(65 -> 47 tokens)" in msg and "no earlier cell" not in msg


def test_share_after_evit_that_keeps_the_count():
    # 9 patch tokens, keep 0.85: ceil(7.65) = 8 kept + 1 fused = 9: same count, but the tokens were
    # re-ranked and fused, so the previous attention map no longer lines up with them
    red = {"kind": "evit", "keep_rate": 0.85, "at": [0]}
    data = arch_dict(stage(10, cells=["basic", "share"], reduction=red), image_size=12)
    msg = rejected(data)
    assert "stages[0].cells[1]: share cannot reuse cell 0's attention map" in msg
    assert "(10 tokens, but not the same ones)" in msg


def test_share_with_linear_attention():
    msg = rejected(arch_dict(stage(65, cells=["basic", "share"], attention="linear")))
    assert "stages[0].cells[1]: share reuses an attention map; linear attention has none" in msg


def test_evit_with_linear_attention():
    red = {"kind": "evit", "keep_rate": 0.7, "at": [0]}
    msg = rejected(arch_dict(stage(65, attention="linear", reduction=red)))
    assert "stages[0].reduction: evit" in msg and "linear" in msg
    # cluster works with linear attention
    red = {"kind": "cluster", "keep_rate": 0.5, "at": [0]}
    assert arch_from_dict(arch_dict(stage(65, attention="linear", reduction=red))).token_trace() == [[33, 33]]


def test_all_identity_rejected():
    msg = rejected(arch_dict(stage(65, cells=["identity", "identity"]), stage(33, cells=["identity"], pool="avg")))
    assert "every cell is identity" in msg
    # one computing cell anywhere is enough
    arch = arch_from_dict(arch_dict(stage(65, cells=["identity", "identity"]), stage(33, cells=["basic"], pool="avg")))
    assert [s.depth for s in arch.stages] == [0, 1]


def test_tome_r_too_big():
    # 65 tokens: 64 non-class, bipartite matching merges at most 32
    assert arch_from_dict(arch_dict(stage(65, reduction={"kind": "tome", "r": [32, 16]}))).token_trace() == [[33, 17]]
    msg = rejected(arch_dict(stage(65, reduction={"kind": "tome", "r": [33, 0]})))
    assert "stages[0].reduction.r[0]: 33 merges > 32 possible with 65 tokens" in msg
    msg = rejected(arch_dict(stage(65, reduction={"kind": "tome", "r": [32, 17]})))
    assert "stages[0].reduction.r[1]: 17 merges > 16 possible with 33 tokens" in msg


def test_tome_r_length_and_sign():
    msg = rejected(arch_dict(stage(65, reduction={"kind": "tome", "r": [4]})))
    assert "stages[0].reduction.r: 1 entries for 2 cells" in msg
    msg = rejected(arch_dict(stage(65, reduction={"kind": "tome", "r": [-1, 0]})))
    assert "stages[0].reduction" in msg and ">= 0" in msg


def test_reduction_on_cells_that_cannot_reduce():
    msg = rejected(arch_dict(stage(65, cells=["basic", "identity"], reduction={"kind": "tome", "r": [0, 4]})))
    assert "stages[0].reduction: cell 1 is identity" in msg
    msg = rejected(arch_dict(stage(65, cells=["basic", "share"], reduction={"kind": "tome", "r": [0, 4]})))
    assert "stages[0].reduction: cell 1 is share" in msg
    msg = rejected(arch_dict(stage(65, reduction={"kind": "evit", "keep_rate": 0.7, "at": [2]})))
    assert "stages[0].reduction.at" in msg


def test_reduction_at_must_be_increasing_and_non_negative():
    for at in ([1, 0], [0, 0], [-1]):
        msg = rejected(arch_dict(stage(65, reduction={"kind": "evit", "keep_rate": 0.7, "at": at})))
        assert "stages[0].reduction" in msg, at


def test_wrong_first_stage_token_count():
    msg = rejected(arch_dict(stage(64)))
    assert "stages[0]: tokens 64 != patches + class token (8x8 + 1 = 65)" in msg
    msg = rejected(arch_dict(stage(65, pool="avg")))
    assert "stages[0]" in msg and "pool must be null" in msg
    msg = rejected(arch_dict(stage(65), stage(33)))
    assert "stages[1]: pool is required" in msg


def test_conv2d_needs_a_grid():
    # 65 -> conv2d -> 17 (8x8 -> 4x4) is fine after a stage that kept its grid
    arch = arch_from_dict(arch_dict(stage(65), stage(17, pool="conv2d"), stage(5, pool="conv2d")))
    assert [s.tokens for s in arch.stages] == [65, 17, 5]
    # after ToMe inside the stage before
    msg = rejected(arch_dict(stage(65, reduction={"kind": "tome", "r": [8, 0]}), stage(17, pool="conv2d")))
    assert "stages[1]: conv2d pooling needs a token grid" in msg
    # after EViT inside the stage before
    msg = rejected(arch_dict(stage(65, reduction={"kind": "evit", "keep_rate": 0.7, "at": [1]}), stage(17, pool="conv2d")))
    assert "stages[1]: conv2d pooling needs a token grid" in msg
    # after a pooling that reorders tokens (tome merging between stages)
    msg = rejected(arch_dict(stage(65), stage(17, pool="tome"), stage(5, pool="conv2d")))
    assert "stages[2]: conv2d pooling needs a token grid" in msg
    # non-square grids
    msg = rejected(arch_dict(stage(65), stage(33, pool="conv2d")))
    assert "stages[1]: conv2d pooling needs square grids, got 64 -> 32 tokens" in msg


def test_image_size_divisible_by_patch():
    msg = rejected(arch_dict(stage(65), image_size=33))
    assert "image_size 33 is not divisible by patch_size 4" in msg


def test_all_problems_reported_in_one_line():
    data = arch_dict(stage(65, dim=30, heads=4, cells=["share", "basic"]), stage(70, pool="avg"))
    msg = rejected(data)
    assert "stages[0]: dim 30" in msg and "stages[0].cells[0]" in msg and "stages[1]: tokens 70 > 65" in msg


# -- token counts ------------------------------------------------------------------------------
def test_token_trace_tome():
    st = StageConfig(tokens=65, dim=32, heads=2, mlp_ratio=2, cells=("basic", "basic", "identity", "basic"),
                     reduction=Reduction(kind="tome", r=(8, 4, 0, 16)))
    assert st.token_trace() == [57, 53, 53, 37]
    assert st.exit_tokens == 37 and st.depth == 3


def test_token_trace_evit_fuses_one_token():
    evit = Reduction(kind="evit", keep_rate=0.7, at=(0, 1))
    st = StageConfig(tokens=65, dim=32, heads=2, mlp_ratio=2, cells=("basic", "basic", "basic"), reduction=evit)
    # 64 patch tokens: ceil(44.8) = 45 kept + 1 fused + cls = 47; then 46: ceil(32.2) = 33 + 1 + 1 = 35
    assert st.token_trace() == [47, 35, 35]
    assert evit.tokens_after(0, 65) == 47


def test_token_trace_evit_deit_small_reference():
    # EViT's DeiT-S: blocks 3, 6, 9 at keep 0.7: 196 -> 138+1 -> 98+1 -> 70+1 (plus the class token)
    cells = ("basic",) * 12
    red = {"kind": "evit", "keep_rate": 0.7, "at": [3, 6, 9]}
    data = arch_dict(stage(197, dim=384, heads=6, cells=cells, reduction=red), image_size=224, patch_size=16)
    trace = arch_from_dict(data).token_trace()[0]
    assert trace == [197] * 3 + [140] * 3 + [100] * 3 + [72] * 3


def test_token_trace_cluster_keeps_no_fused_token():
    red = Reduction(kind="cluster", keep_rate=0.5, at=(0, 1))
    st = StageConfig(tokens=65, dim=32, heads=2, mlp_ratio=2, cells=("basic", "share"), reduction=red)
    assert st.token_trace() == [33, 17]


def test_keep_rate_one_and_identity_cells_keep_tokens():
    red = Reduction(kind="evit", keep_rate=1.0, at=(0,))
    assert red.tokens_after(0, 65) == 65 and not red.reduces_at(0)
    st = StageConfig(tokens=65, dim=32, heads=2, mlp_ratio=2, cells=("identity", "basic"),
                     reduction=Reduction(kind="cluster", keep_rate=0.5, at=(1,)))
    assert st.token_trace() == [65, 33]


def test_kept_tokens_is_robust_to_float_noise():
    assert 0.1 * 7 * 10 > 7  # the float product overshoots ...
    assert kept_tokens(0.1 * 7, 10) == 7  # ... but 0.7 of 10 is 7, not 8
    assert 0.55 * 100 > 55
    assert kept_tokens(0.55, 100) == 55
    assert kept_tokens(0.7, 64) == 45  # ceil(44.8)
    assert kept_tokens(0.5, 64) == 32
    assert kept_tokens(0.01, 10) == 1  # always keeps one
    red = Reduction(kind="evit", keep_rate=0.55, at=(0,))
    assert red.tokens_after(0, 101) == 1 + 55 + 1


# -- flatten -----------------------------------------------------------------------------------
def test_flatten_keys_and_values():
    arch = arch_from_dict(rich_dict())
    flat = arch.flatten()
    assert len(flat) == 5 + 3 * 12
    assert all(isinstance(v, (str, int, float)) for v in flat.values())
    assert {k: flat[k] for k in ("family", "image_size", "patch_size", "in_chans", "num_classes")} == {
        "family": "psvit", "image_size": 32, "patch_size": 4, "in_chans": 3, "num_classes": 10}
    assert flat["stages.0.tokens"] == 65
    assert flat["stages.0.dim"] == 32
    assert flat["stages.0.heads"] == 2
    assert flat["stages.1.mlp_ratio"] == 3.0
    assert flat["stages.0.cells"] == "basic,basic,share"
    assert flat["stages.0.pool"] == "null"
    assert flat["stages.1.pool"] == "avg"
    assert flat["stages.2.attention"] == "linear"
    assert flat["stages.0.reduction.kind"] == "tome"
    assert flat["stages.0.reduction.r"] == "8,0,0"
    assert flat["stages.0.reduction.keep_rate"] == "null"
    assert flat["stages.1.reduction.keep_rate"] == 0.7
    assert flat["stages.1.reduction.at"] == "2"
    assert flat["stages.2.reduction.method"] == "weighted_kmedoids"
    # flattened params tell architectures apart as well as the hash does
    other = arch_from_dict({**rich_dict(), "num_classes": 11})
    assert other.flatten() != flat and {k for k in other.flatten()} == set(flat)
