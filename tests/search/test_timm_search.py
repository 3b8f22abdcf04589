"""A reduction-schedule search over a timm ViT (``family: timm``), as a user runs it: ``vitnas
finetune`` writes weights, ``vitnas search --weights`` scores every schedule with them (a real
timm model patched per candidate, real latency measurements, sqlite MLflow and Optuna)."""

from __future__ import annotations

import math

import optuna
import pytest
import yaml

from nas.cli import main
from nas.data import load_splits
from nas.errors import UserError
from nas.evaluation import classification_accuracy
from nas.families.timm import base_model
from nas.search.campaign import CampaignConfig, scorer_for
from nas.space import load_space, space_from_dict
from nas.tracking import Campaign
from nas.weights import file_hash

# DeiT-Tiny's family at digits scale: 16x16 input in 4x4 patches (16 tokens + class), 3 blocks
TINY_TIMM = {
    "name": "tiny-timm",
    "family": "timm",
    "model": "deit_tiny_patch16_224",
    "depth": 3,
    "image_size": 16,
    "num_classes": 10,
    "model_args": {"patch_size": 4, "depth": 3, "embed_dim": 48, "num_heads": 3},
    "reduction": {
        "kind": ["none", "tome", "evit"],
        "tome": {"r": [1, 2], "rule": ["constant", "decreasing"]},
        "evit": {"keep_rate": [0.5, 0.7], "layers": [[1], [1, 2]]},
    },
}


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """The tiny timm space and weights from ``vitnas finetune`` (4 short epochs on digits, from scratch)."""
    folder = tmp_path_factory.mktemp("timm")
    space_file = folder / "tiny-timm.yaml"
    space_file.write_text(yaml.safe_dump(TINY_TIMM, sort_keys=False))
    weights = folder / "tiny-timm.safetensors"
    argv = ["finetune", "--space", str(space_file), "--out", str(weights), "--epochs", "4", "--batch-size", "32",
            "--lr", "2e-3", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    return space_file, weights


def test_finetuned_weights_score_well_above_the_initial_ones(finetuned):
    space_file, weights = finetuned
    space, val = load_space(space_file), load_splits("digits", 16).val
    initial = classification_accuracy(base_model(space), val)["accuracy"]
    tuned = classification_accuracy(base_model(space, weights), val)["accuracy"]
    assert tuned > initial + 0.1  # ten classes: random weights score about 0.1


def test_search_scores_every_schedule_with_the_finetuned_weights(finetuned, tiny, tmp_path, capsys):
    space_file, weights = finetuned
    config = CampaignConfig(
        name="timm-schedules", space=str(space_file), target="cpu:threads=1,batch=1", trials=8,
        workspace=str(tmp_path / "ws"), seed=0, measure_budget_s=0.2, weights=str(weights),
    ).resolved()  # fmt: skip
    argv = ["search", "--space", str(space_file), "--weights", str(weights), "--target", config.target,
            "--trials", "8", "--campaign", config.name, "--workspace", config.workspace,
            "--measure-budget-s", "0.2", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert "campaign timm-schedules: 8 finished, 0 failed, 8 run now" in capsys.readouterr().out

    records = tiny.check(config)  # Optuna and MLflow agree; Pareto tags right (any campaign's)
    assert records.parent.data.tags["weights_hash"] == file_hash(weights)
    assert records.parent.data.params["weights"] == str(weights)
    # each trial's accuracy is the patched fine-tuned model's, evaluated directly
    space, scorer = load_space(space_file), scorer_for(config, load_space(space_file))
    val = load_splits("digits", 16).val
    study = optuna.load_study(study_name=config.name, storage=config.storage)
    kinds = set()
    for trial in study.trials:
        arch = space.from_params(trial.params)
        kinds.add(arch.schedule["kind"])
        direct = classification_accuracy(scorer.build(arch), val)["accuracy"]
        assert math.isclose(trial.values[0], direct, abs_tol=1e-9), (arch.schedule, trial.values[0], direct)
        assert trial.values[1] > 0  # a measured latency
    assert len(kinds) >= 2
    runs = Campaign(config.tracking_uri, config.name).trial_runs()
    assert all(r.tags["weights_hash"] == file_hash(weights) for r in runs)


def test_weights_that_do_not_fit_or_a_model_that_does_not_build_are_user_errors(finetuned, tmp_path):
    space_file, weights = finetuned
    wider = space_from_dict({**TINY_TIMM, "model_args": {**TINY_TIMM["model_args"], "embed_dim": 96}})
    with pytest.raises(UserError, match="weights do not fit"):
        base_model(wider, weights)
    with pytest.raises(UserError, match="depth is 12, but deit_tiny_patch16_224 has 3 blocks"):
        base_model(space_from_dict({**TINY_TIMM, "depth": 12, "reduction": {"kind": ["none"]}}))
    with pytest.raises(UserError, match="timm cannot build"):
        base_model(space_from_dict({**TINY_TIMM, "model_args": {"no_such_argument": 1}}))


def test_weights_are_for_timm_spaces_and_finetune_is_for_timm_spaces(tiny, tmp_path, capsys):
    config = tiny.config(tmp_path, "psvit-with-weights", trials=1, weights=str(tmp_path / "w.safetensors"))
    with pytest.raises(UserError, match="--weights is for timm spaces"):
        scorer_for(config, tiny.space)
    assert main(["finetune", "--space", tiny.space.source, "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "space 'tiny' is a psvit space: vitnas finetune" in capsys.readouterr().err


def test_a_timm_trial_exports_weights_a_readme_that_builds_it_and_a_recipe_vitnas_train_takes(
    finetuned, tmp_path, capsys
):
    space_file, weights = finetuned
    ws = tmp_path / "ws"
    argv = ["search", "--space", str(space_file), "--weights", str(weights), "--target", "cpu:threads=1,batch=1",
            "--trials", "3", "--campaign", "timm-export", "--workspace", str(ws), "--sampler", "random",
            "--measure-budget-s", "0.1", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    run = Campaign(f"sqlite:///{ws / 'mlflow.db'}", "timm-export").trial_runs()[0]
    out = tmp_path / "exported"
    argv = ["export", "--campaign", "timm-export", "--trial", str(run.trial_number), "--out", str(out),
            "--workspace", str(ws), "--epochs", "1"]  # fmt: skip
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "arch.yaml", "train.yaml", "weights.safetensors"]
    assert file_hash(out / "weights.safetensors") == file_hash(weights)

    # the README's code builds the patched model; its accuracy is the one the search recorded
    readme = (out / "README.md").read_text()
    code = readme.split("```python\n")[1].split("```")[0]
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the documented snippet, run as a user would
    model = scope["model"].eval()
    accuracy = classification_accuracy(model, load_splits("digits", 16).val)["accuracy"]
    assert accuracy == run.metrics["val_accuracy"]

    capsys.readouterr()
    assert main(["train", str(out / "train.yaml"), "--quiet"]) == 0
    assert "test accuracy " in capsys.readouterr().out and (out / "trained.safetensors").is_file()


def test_a_search_on_an_onnxruntime_target_measures_the_exported_schedules(finetuned, tmp_path, capsys):
    space_file, weights = finetuned
    ws = tmp_path / "ws"
    argv = ["search", "--space", str(space_file), "--weights", str(weights), "--trials", "3",
            "--target", "cpu:threads=2,batch=1,backend=onnxruntime", "--campaign", "on-ort",
            "--workspace", str(ws), "--sampler", "random", "--measure-budget-s", "0.1", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert "campaign on-ort: 3 finished, 0 failed" in capsys.readouterr().out
    runs = Campaign(f"sqlite:///{ws / 'mlflow.db'}", "on-ort").trial_runs()
    assert len(runs) == 3 and all(r.metrics["latency_ms"] > 0 for r in runs)
    assert {r.tags["target"] for r in runs} == {"cpu:threads=2,dtype=float32,batch=1,backend=onnxruntime"}
