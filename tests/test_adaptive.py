"""The adaptive family end to end, as a user runs it: ``vitnas finetune`` (a DeiT-Tiny-family model
at digits scale), ``vitnas finetune --adaptive`` (budget-conditioned decision networks, resumable
exactly), ``vitnas search`` over budgets (cost over real images), ``vitnas export`` and the README's
code, ``vitnas profile`` of an adaptive architecture."""

from __future__ import annotations

import json
import math

import optuna
import pytest
import torch
import yaml

from nas.adaptive_finetune import adaptive_finetune, checkpoint_dir, evaluate_at, parse_adaptive
from nas.arch import AdaptiveArch, arch_from_dict, load_arch
from nas.cli import main
from nas.data import load_splits
from nas.errors import UserError
from nas.evaluation import classification_accuracy
from nas.families import family_of
from nas.finetune import QUICK
from nas.hardware.input_cost import fixed_sample, input_flops
from nas.search.campaign import CampaignConfig, scorer_for
from nas.space import load_space, space_from_dict
from nas.tracking import Campaign
from nas.training.config import TrainConfig
from nas.weights import file_hash, read_tensors

MODEL = {
    "model": "deit_tiny_patch16_224",
    "depth": 3,
    "image_size": 16,
    "num_classes": 10,
    "model_args": {"patch_size": 4, "depth": 3, "embed_dim": 48, "num_heads": 3},
}
TINY_TIMM = {"name": "tiny-timm", "family": "timm", **MODEL, "reduction": {"kind": ["none"]}}
TINY_ADAPTIVE = {
    "name": "tiny-adaptive",
    "family": "adaptive",
    **MODEL,
    "adavit": {"patch": [1.0, 0.7, 0.5], "head": [1.0, 0.67], "block": [1.0, 0.75]},
}


def _write(folder, data) -> str:
    path = folder / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Backbone weights (``vitnas finetune``, from scratch) and decision networks trained over the
    adaptive space's budget ranges (``vitnas finetune --adaptive``)."""
    folder = tmp_path_factory.mktemp("adaptive")
    timm_space, space = _write(folder, TINY_TIMM), _write(folder, TINY_ADAPTIVE)
    backbone, weights = folder / "backbone.safetensors", folder / "adavit.safetensors"
    common = ["--batch-size", "32", "--lr", "2e-3", "--quiet"]
    assert main(["finetune", "--space", timm_space, "--out", str(backbone), "--epochs", "4", *common]) == 0
    argv = ["finetune", "--space", space, "--init", str(backbone), "--adaptive", "--out", str(weights),
            "--epochs", "3", *common]  # fmt: skip
    assert main(argv) == 0
    return folder, space, weights


def test_an_adaptive_space_draws_counts_and_refuses_bad_budgets(tmp_path):
    space = space_from_dict(TINY_ADAPTIVE)
    assert space.count() == 12 and space.largest().usage == {}
    assert space.smallest().usage == {"patch": 0.5, "head": 0.67, "block": 0.75}
    assert all(space.contains(space.sample(seed)) for seed in range(5))
    arch = space.sample(3)
    assert arch_from_dict(json.loads(arch.to_json())) == arch and isinstance(arch, AdaptiveArch)
    with pytest.raises(UserError, match=r"adavit\.patch: .*budgets must be in \(0, 1\]"):
        space_from_dict({**TINY_ADAPTIVE, "adavit": {"patch": [0.0, 0.5]}})
    with pytest.raises(UserError, match="adavit.start 3 is not a block"):
        space_from_dict({**TINY_ADAPTIVE, "adavit": {"patch": [0.5], "start": 3}})
    assert main(["space", "show", _write(tmp_path, TINY_ADAPTIVE)]) == 0


def test_the_adaptive_option_and_its_mistakes_are_one_line_errors(tmp_path, capsys):
    spec = parse_adaptive("patch=0.5..1,head=0.75,block=1,mode=partial,start=2")
    assert spec.ranges == {"patch": (0.5, 1.0), "head": (0.75, 0.75)} and spec.head_mode == "partial"
    timm_space, out = _write(tmp_path, TINY_TIMM), str(tmp_path / "w.safetensors")
    for bad, message in [
        ("patch=1.5", "budgets must satisfy 0 < LO <= HI <= 1"),
        ("heads=0.5", "unknown key 'heads'"),
        ("patch=0.5,backbone_lr=-1", "backbone_lr=-1: expected a non-negative number"),
        ("patch=0.5,backbone_lr=0.3", "backbone_lr=0.3 goes with --train-backbone"),
        ("block=1", "give a budget below 1"),
        ("space", "give the budgets"),
    ]:
        assert main(["finetune", "--space", timm_space, "--out", out, f"--adaptive={bad}", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vitnas: error:") and message in err and len(err.strip().splitlines()) == 1, err
    assert main(["finetune", "--space", timm_space, "--out", out, "--resume"]) == 2
    assert "go with --adaptive" in capsys.readouterr().err


def test_an_interrupted_adaptive_finetune_resumes_exactly(tmp_path):
    space = load_space(_write(tmp_path, TINY_TIMM))
    spec = parse_adaptive("patch=0.5..1,head=0.5..1,block=0.5..1")
    config = QUICK.replace(epochs=2, batch_size=128, lr=2e-3)
    whole = adaptive_finetune(
        space, tmp_path / "whole.safetensors", spec, config=config, progress=False, log=lambda s: None
    )
    part = tmp_path / "part.safetensors"
    assert (
        adaptive_finetune(space, part, spec, config=config, progress=False, stop_after=1, log=lambda s: None)
        is None
    )
    assert not part.exists() and (checkpoint_dir(part) / "state.json").is_file()
    with pytest.raises(UserError, match="a training state is there already"):
        adaptive_finetune(space, part, spec, config=config, progress=False)
    with pytest.raises(UserError, match="these differ: spec"):
        adaptive_finetune(
            space, part, parse_adaptive("patch=0.6"), config=config, progress=False, resume=True
        )
    resumed = adaptive_finetune(
        space, part, spec, config=config, progress=False, resume=True, log=lambda s: None
    )
    a, b = read_tensors(whole.weights), read_tensors(resumed.weights)
    assert a.keys() == b.keys() and any(k.startswith("adavit.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    timing = ("seconds", "images_per_s", "data_wait_share")
    strip = lambda h: [{k: v for k, v in r.items() if k not in timing} for r in h]  # noqa: E731
    assert strip(whole.history) == strip(resumed.history)
    # the backbone stayed frozen (decision networks only, the default)
    start = {k: v for k, v in read_tensors(whole.weights).items() if not k.startswith("adavit.")}
    assert start and all(torch.isfinite(v).all() for v in start.values())


def test_the_backbone_trains_at_its_share_of_the_learning_rate(tmp_path):
    """``backbone_lr=0`` with ``train_backbone`` is the frozen backbone, bit for bit (the decision
    networks see the same gradients either way); a positive share moves the backbone."""
    space = load_space(_write(tmp_path, TINY_TIMM))
    config = QUICK.replace(epochs=1, batch_size=128, lr=2e-3)
    ranges = "patch=0.5..1,head=0.5..1,block=0.5..1"
    assert parse_adaptive(f"{ranges},backbone_lr=0.25").backbone_lr == 0.25
    assert parse_adaptive(ranges).backbone_lr == 0.1

    def weights(name: str, spec: str, train_backbone: bool) -> dict[str, torch.Tensor]:
        out = adaptive_finetune(
            space, tmp_path / f"{name}.safetensors", parse_adaptive(spec), config=config,
            train_backbone=train_backbone, progress=False, log=lambda s: None,
        )  # fmt: skip
        return read_tensors(out.weights)

    frozen = weights("frozen", ranges, False)
    still = weights("still", f"{ranges},backbone_lr=0", True)
    moved = weights("moved", f"{ranges},backbone_lr=0.5", True)
    assert frozen.keys() == still.keys() == moved.keys()
    assert all(torch.equal(frozen[k], still[k]) for k in frozen)
    backbone = [k for k in frozen if not k.startswith("adavit.")]
    assert backbone and not all(torch.equal(frozen[k], moved[k]) for k in backbone)


@pytest.mark.slow  # trains a backbone and decision networks first (the module's fixture)
def test_lower_budgets_use_less_and_the_decisions_follow_the_budget(trained):
    folder, space_file, weights = trained
    from nas.families.adaptive import base_model

    space = load_space(space_file)
    model = base_model(space, weights)
    from nas.ops import adavit_patch

    adavit_patch.apply(model, {"kind": "adavit", "usage": {"patch": 0.6, "head": 0.6, "block": 0.6}})
    val = load_splits("digits", 16).val
    low = evaluate_at(model, val, {"patch": 0.5, "head": 0.5, "block": 0.5})
    high = evaluate_at(model, val, {"patch": 1.0, "head": 1.0, "block": 1.0})
    assert low["gflops"] < high["gflops"]
    assert low["kept_patch"] < high["kept_patch"] and low["kept_block"] <= high["kept_block"]


@pytest.mark.slow  # trains a backbone and decision networks first (the module's fixture)
def test_a_search_over_budgets_runs_end_to_end_and_an_exported_trial_scores_as_recorded(
    trained, tmp_path, capsys
):
    folder, space_file, weights = trained
    ws = tmp_path / "ws"
    argv = ["search", "--space", space_file, "--weights", str(weights), "--target", "cpu:threads=1,batch=1",
            "--trials", "4", "--campaign", "budgets", "--workspace", str(ws), "--sampler", "random",
            "--measure-budget-s", "0.05", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert "campaign budgets: 4 finished, 0 failed" in capsys.readouterr().out
    config = CampaignConfig(name="budgets", space=space_file, target="cpu:threads=1,batch=1", trials=4,
                            workspace=str(ws), weights=str(weights)).resolved()  # fmt: skip
    space, scorer = load_space(space_file), scorer_for(config, load_space(space_file))
    val = load_splits("digits", 16).val
    study = optuna.load_study(study_name="budgets", storage=config.storage)
    runs = {r.trial_number: r for r in Campaign(config.tracking_uri, "budgets").trial_runs()}
    images = fixed_sample(val)
    for trial in study.trials:
        arch = space.from_params(trial.params)
        model = scorer.build(arch)
        metrics = runs[trial.number].metrics
        assert math.isclose(
            metrics["val_accuracy"], classification_accuracy(model, val)["accuracy"], abs_tol=1e-12
        )
        counted = input_flops(model, images)
        assert math.isclose(metrics["gflops"], counted.mean, rel_tol=1e-9) and metrics[
            "gflops_p90"
        ] == pytest.approx(counted.p90)
        assert metrics["latency_ms"] > 0 and metrics["latency_p90_ms"] >= metrics["latency_p10_ms"]
        key = scorer.latency_key(arch, model)  # cached under architecture, images and weights
        assert "@" in key and scorer.cache.get(key, scorer.fingerprint, scorer.target) is not None
    assert runs[0].tags["weights_hash"] == file_hash(weights)

    out = tmp_path / "exported"
    trial = max(
        runs.values(), key=lambda r: r.metrics["gflops"] == min(x.metrics["gflops"] for x in runs.values())
    )
    argv = ["export", "--campaign", "budgets", "--trial", str(trial.trial_number), "--out", str(out),
            "--workspace", str(ws), "--epochs", "1"]  # fmt: skip
    assert main(argv) == 0
    assert file_hash(out / "weights.safetensors") == file_hash(weights)
    code = (out / "README.md").read_text().split("```python\n")[1].split("```")[0]
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the documented snippet, run as a user would
    assert classification_accuracy(scope["model"], val)["accuracy"] == trial.metrics["val_accuracy"]

    # retraining the export keeps the decisions at the trial's budgets: the usage loss is in the step
    arch = load_arch(out / "arch.yaml")
    step = family_of(arch).training_step(arch, TrainConfig(epochs=1), torch.device("cpu"))
    assert step.spec.low() == step.spec.high() == arch.usage and step.spec.usage_weight > 0
    assert main(["train", str(out / "train.yaml"), "--epochs", "1", "--quiet"]) == 0


def test_profile_costs_an_adaptive_architecture_over_real_images(tmp_path, capsys):
    arch = space_from_dict(TINY_ADAPTIVE).smallest()
    path = tmp_path / "arch.yaml"
    path.write_text(arch.to_yaml())
    assert (
        main(
            [
                "profile",
                "--arch",
                str(path),
                "--target",
                "cpu:threads=1,batch=1",
                "--budget-s",
                "0.05",
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert (
        result["samples"] == 64
        and result["data"] == "digits"
        and result["gflops_p90"] >= result["gflops"] * 0.5
    )
    assert result["latency"]["median_ms"] > 0
    assert main(["profile", "--arch", str(path), "--reduce", "tome:r=2", "--no-latency"]) == 2
    assert "takes no --reduce" in capsys.readouterr().err
