"""Export of searched trials: the files, the timm model they build, and `vitnas train` on them.

A three-trial campaign over the shipped psvit-digits space with an untrained supernet (random
weights: outputs are not trivial, so equality of outputs means the weights went where they belong).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
import yaml
from mlflow import MlflowClient

import nas  # noqa: F401  (registers vitnas_subnet with timm)
from nas.arch import load_arch
from nas.cli import main
from nas.data import load_splits
from nas.errors import UserError
from nas.export import export_trial
from nas.search.campaign import CampaignConfig, run_campaign, scorer_for
from nas.space import SearchSpace, load_space
from nas.supernet import Supernet, load_checkpoint
from nas.supernet.checkpoint import save_checkpoint
from nas.tracking import Campaign
from nas.training.config import TrainConfig
from nas.training.optim import make_optimizer

TRIALS = 3
FILES = ["arch.yaml", "weights.safetensors", "train.yaml", "README.md"]


@dataclass(frozen=True)
class Searched:
    config: CampaignConfig
    space: SearchSpace
    run_ids: dict[int, str]  # by trial number


def untrained_checkpoint(space: SearchSpace, folder: Path) -> Path:
    """A freshly initialised supernet written as ``train_supernet`` writes its checkpoints (epoch 0)."""
    torch.manual_seed(0)
    net, config = Supernet(space), TrainConfig()
    data = load_splits("digits", space.spec.image_size).spec.to_dict()
    meta = {"epoch": 0, "config": config.to_dict(), "data": data, "history": [], "complete": False}
    save_checkpoint(folder, net, make_optimizer(net, config), meta)
    return folder


@pytest.fixture(scope="module")
def searched(tmp_path_factory, mlflow_db_template) -> Searched:
    ws = tmp_path_factory.mktemp("export-ws")
    shutil.copy(mlflow_db_template, ws / "mlflow.db")
    space = load_space("psvit-digits")
    config = CampaignConfig(
        name="to-export",
        space=space.source,
        target="cpu:threads=1,batch=1",
        trials=TRIALS,
        workspace=str(ws),
        supernet=str(untrained_checkpoint(space, ws / "supernet")),
        sampler="random",
        seed=0,  # its three draws hold every operator: linear attention, share cells, ToMe, EViT, all pools
        measure_budget_s=0.2,
    ).resolved()
    run_campaign(config, space, scorer_for(config, space), progress=False)
    runs = Campaign(config.tracking_uri, config.name).trial_runs()
    assert len(runs) == TRIALS
    client = MlflowClient(config.tracking_uri)
    flat = [client.get_run(r.run_id).data.params for r in runs]
    ops = {v for p in flat for k, v in p.items() if k.endswith((".attention", ".pool", ".reduction.kind"))}
    ops |= {c for p in flat for k, v in p.items() if k.endswith(".cells") for c in v.split(",")}
    assert {"linear", "share", "tome", "evit", "conv1d", "avg", "cluster"} <= ops, "pick another seed"
    return Searched(config, space, {r.trial_number: r.run_id for r in runs})


def test_export_writes_architecture_weights_recipe_and_readme(searched, tmp_path):
    uri = searched.config.tracking_uri
    result = export_trial(uri, tmp_path / "by-trial", campaign=searched.config.name, trial=1, epochs=7)
    assert result.files == FILES and all((result.out / f).is_file() for f in FILES)
    assert result.run_id == searched.run_ids[1]
    client = MlflowClient(uri)
    logged = load_arch(client.download_artifacts(result.run_id, "arch.yaml", str(tmp_path)))
    assert load_arch(result.out / "arch.yaml") == logged and result.arch_hash == logged.arch_hash()
    recipe = yaml.safe_load((result.out / "train.yaml").read_text())
    assert recipe["init"] == "inherited" and recipe["weights"] == "weights.safetensors"
    assert (recipe["epochs"], recipe["source_run_id"], recipe["tracking_uri"]) == (7, result.run_id, uri)
    assert result.run_id in (result.out / "README.md").read_text()

    by_run = export_trial(uri, tmp_path / "by-run", run_id=result.run_id)
    assert by_run.arch_hash == result.arch_hash
    assert (by_run.out / "weights.safetensors").read_bytes() == (
        result.out / "weights.safetensors"
    ).read_bytes()


@pytest.mark.parametrize("trial", range(TRIALS))
def test_timm_model_computes_what_the_supernet_computes(searched, tmp_path, trial):
    out = export_trial(searched.config.tracking_uri, tmp_path, campaign=searched.config.name, trial=trial).out
    arch = load_arch(out / "arch.yaml")
    supernet, _ = load_checkpoint(searched.config.supernet, searched.space)
    supernet.eval()
    x = torch.randn(4, 3, arch.image_size, arch.image_size, generator=torch.Generator().manual_seed(trial))
    from_file = timm.create_model(
        "vitnas_subnet", arch=str(out / "arch.yaml"), pretrained_file=str(out / "weights.safetensors")
    ).eval()
    from_checkpoint_path = timm.create_model(
        "vitnas_subnet", arch=str(out / "arch.yaml"), checkpoint_path=str(out / "weights.safetensors")
    ).eval()
    with torch.inference_mode():
        expected = supernet(x, arch)
        assert expected.abs().max() > 0
        for model in (from_file, from_checkpoint_path, supernet.extract(arch).eval()):
            assert (model(x) - expected).abs().max() < 1e-5


def test_bad_inputs_are_one_line_user_errors(searched, tmp_path, capsys):
    with pytest.raises(UserError, match="missing.yaml"):
        timm.create_model("vitnas_subnet", arch=str(tmp_path / "missing.yaml"))
    with pytest.raises(UserError, match="no trial 99"):
        export_trial(searched.config.tracking_uri, tmp_path, campaign=searched.config.name, trial=99)
    argv = ["export", "--campaign", searched.config.name, "--trial", "99", "--out", str(tmp_path)]
    assert main([*argv, "--tracking-uri", searched.config.tracking_uri]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_vitnas_train_retrains_the_export_and_links_the_trial(searched, tmp_path, capsys):
    uri = searched.config.tracking_uri
    exported = export_trial(uri, tmp_path, campaign=searched.config.name, trial=0)
    capsys.readouterr()
    assert main(["train", str(exported.out / "train.yaml"), "--epochs", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("epoch 1/1: loss ") and "\ntest accuracy " in printed
    test_accuracy = float(printed.split("test accuracy ")[1].split()[0])
    assert 0 <= test_accuracy <= 1 and (exported.out / "trained.safetensors").is_file()

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("vitnas-train").experiment_id
    runs = client.search_runs([experiment], f"tags.`vitnas.source_run_id` = '{searched.run_ids[0]}'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_id in printed
    assert run.data.metrics["test_accuracy"] == pytest.approx(test_accuracy, abs=1e-4)
    assert run.data.tags["arch_hash"] == exported.arch_hash


@pytest.mark.slow
def test_export_onnx_writes_a_checked_model_with_a_dynamic_batch(searched, tmp_path, capsys):
    import onnxruntime

    argv = ["export", "--campaign", searched.config.name, "--trial", "2", "--out", str(tmp_path), "--onnx",
            "--tracking-uri", searched.config.tracking_uri]  # fmt: skip
    assert main(argv) == 0
    assert "model.onnx" in capsys.readouterr().out and "model.onnx" in (tmp_path / "README.md").read_text()
    model = timm.create_model(
        "vitnas_subnet", arch=str(tmp_path / "arch.yaml"), pretrained_file=str(tmp_path / "weights.safetensors")
    ).eval()
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.randn(batch, 3, model.arch.image_size, model.arch.image_size, generator=torch.Generator().manual_seed(batch))
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.inference_mode():
            assert abs(torch.from_numpy(got) - model(x)).max() < 1e-4
