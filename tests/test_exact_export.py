"""Export writes the weights the search scored: from the campaign's frozen copy of the supernet
checkpoint, found by absolute paths from any working directory, whatever training did to the
checkpoint after the search; and it refuses weights whose hash is not the one scored."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import timm
import torch

import nas  # noqa: F401  (registers vitnas_subnet with timm)
from nas.cli import main
from nas.data import load_splits
from nas.errors import UserError
from nas.evaluation import classification_accuracy
from nas.export import export_trial
from nas.names import FROZEN_WEIGHTS
from nas.search.campaign import CampaignConfig, run_campaign, scorer_for
from nas.space import load_space
from nas.supernet import Supernet
from nas.supernet.checkpoint import SIDECAR, WEIGHTS, read_meta, save_checkpoint
from nas.tracking import Campaign
from nas.training.config import TrainConfig
from nas.training.optim import make_optimizer


@contextmanager
def cwd(path: Path):
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def write_checkpoint(space, folder: Path, seed: int, epoch: int) -> str:
    """Supernet weights drawn with ``seed``, written as ``train_supernet`` writes an epoch."""
    torch.manual_seed(seed)
    net, config = Supernet(space), TrainConfig()
    data = load_splits("digits", space.spec.image_size).spec.to_dict()
    meta = {"epoch": epoch, "config": config.to_dict(), "data": data, "history": [], "complete": False}
    save_checkpoint(folder, net, make_optimizer(net, config), meta)
    return read_meta(folder)["weights_hash"]


def accuracy_of_export(out: Path) -> float:
    model = timm.create_model(
        "vitnas_subnet", arch=str(out / "arch.yaml"), pretrained_file=str(out / "weights.safetensors")
    )
    size = model.arch.image_size
    return classification_accuracy(model.eval(), load_splits("digits", size).val)["accuracy"]


def test_export_from_elsewhere_after_retraining_writes_the_weights_scored(tmp_path, mlflow_db_template):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir(), elsewhere.mkdir()
    shutil.copy(mlflow_db_template, project / "mlflow.db")
    space = load_space("psvit-digits")
    with cwd(project):  # paths as a user types them: relative to where the search runs
        scored_hash = write_checkpoint(space, Path("supernet"), seed=0, epoch=1)
        config = CampaignConfig(
            name="exact", space="psvit-digits", target="cpu:threads=1,batch=1", trials=2, workspace=".",
            supernet="supernet", sampler="random", seed=1, measure_budget_s=0.1,
        ).resolved()  # fmt: skip
        run_campaign(config, space, scorer_for(config, space), progress=False)
        # training goes on after the search (a second `vitnas demo` does): new weights, same folder
        assert write_checkpoint(space, Path("supernet"), seed=1, epoch=2) != scored_hash

    tracker = Campaign(config.tracking_uri, "exact", read_only=True)
    trial = tracker.client.get_run(tracker.trial_runs()[0].run_id)
    parent = tracker.client.get_run(trial.data.tags["mlflow.parentRunId"])
    frozen = Path(parent.data.tags[FROZEN_WEIGHTS])
    assert frozen == project.resolve() / "frozen" / f"supernet-{scored_hash}"
    assert read_meta(frozen)["weights_hash"] == scored_hash
    assert config.supernet == str(project.resolve() / "supernet")  # recorded absolute

    with cwd(elsewhere):
        for run in tracker.trial_runs():
            out = Path(f"trial-{run.trial_number}")
            argv = ["export", "--campaign", "exact", "--trial", str(run.trial_number), "--out", str(out),
                    "--tracking-uri", config.tracking_uri]  # fmt: skip
            assert main(argv) == 0
            assert accuracy_of_export(out) == run.metrics["val_accuracy"]  # exactly: the same weights

    # without the frozen copy, the retrained checkpoint is refused rather than exported
    shutil.rmtree(frozen)
    with pytest.raises(UserError, match=f"is not {scored_hash}, the one the campaign scored"):
        export_trial(config.tracking_uri, tmp_path / "refused", campaign="exact", trial=0)


def test_freezing_names_a_corrupted_checkpoint_and_reuses_a_frozen_one(tmp_path):
    from nas.supernet.checkpoint import freeze_checkpoint

    space = load_space("psvit-digits")
    digest = write_checkpoint(space, tmp_path / "ckpt", seed=0, epoch=1)
    first = freeze_checkpoint(tmp_path / "ckpt", tmp_path / "ws")
    assert sorted(p.name for p in first.iterdir()) == sorted([WEIGHTS, SIDECAR])
    assert os.stat(first / WEIGHTS).st_ino == os.stat(tmp_path / "ckpt" / WEIGHTS).st_ino  # a hard link
    assert freeze_checkpoint(tmp_path / "ckpt", tmp_path / "ws") == first
    # a rewrite (train_supernet's atomic rename) leaves the frozen copy as it was
    write_checkpoint(space, tmp_path / "ckpt", seed=5, epoch=2)
    assert read_meta(first)["weights_hash"] == digest
    with open(tmp_path / "ckpt" / WEIGHTS, "r+b") as f:  # flip bytes in place: corrupted
        f.seek(-8, os.SEEK_END)
        f.write(b"\x00" * 8)
    with pytest.raises(UserError, match="does not match the hash recorded"):
        freeze_checkpoint(tmp_path / "ckpt", tmp_path / "ws")
