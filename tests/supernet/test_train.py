"""Supernet training: checkpoints, exact resume, wrong-space refusal, evaluation, the CLI and MLflow."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_spaces import TWO_STAGES
from torch.utils.data import Subset

from nas.cli import main
from nas.data import Splits, load_splits
from nas.errors import UserError
from nas.space import space_from_dict
from nas.supernet import Supernet, TrainConfig, evaluate, load_checkpoint, train_supernet
from nas.supernet.checkpoint import OPTIMIZER, SIDECAR, WEIGHTS
from nas.training.loop import TIMING_KEYS

TINY = {**TWO_STAGES, "name": "tiny-train"}
OTHER = {**TINY, "name": "tiny-other", "stages": [TINY["stages"][0], {**TINY["stages"][1], "dim": [32, 40]}]}
FAST = TrainConfig(epochs=2, batch_size=16, lr=2e-3, warmup_epochs=0.5, seed=7)


@pytest.fixture(scope="module")
def space():
    return space_from_dict(TINY, "tiny-train.yaml")


@pytest.fixture(scope="module")
def splits():
    full = load_splits("digits", TINY["image_size"])
    return Splits(
        Subset(full.train, range(48)), Subset(full.val, range(40)), full.test, full.num_classes, full.spec
    )


@pytest.fixture(scope="module")
def trained(space, splits, tmp_path_factory):
    """One epoch of training in a workspace the tests below only read."""
    ws = tmp_path_factory.mktemp("trained")
    return _train(space, splits, ws, TrainConfig(epochs=1, batch_size=16, seed=1)), ws


def _train(space, splits, ws, config=FAST, **kw):
    return train_supernet(space, splits, ws, config, progress=False, log=lambda _: None, **kw)


def _files(result) -> tuple[dict, dict, dict]:
    folder = result.checkpoint.parent
    meta = json.loads((folder / SIDECAR).read_text())
    for record in meta["history"]:
        for key in TIMING_KEYS:
            record.pop(key)
    return load_file(folder / WEIGHTS), load_file(folder / OPTIMIZER), meta


def test_resume_after_a_stop_equals_an_unbroken_run(space, splits, tmp_path):
    unbroken = _train(space, splits, tmp_path / "a")
    first = _train(space, splits, tmp_path / "b", stop_after=1)
    assert (
        first.epoch == 1 and json.loads((first.checkpoint.parent / SIDECAR).read_text())["complete"] is False
    )
    resumed = _train(space, splits, tmp_path / "b", resume=True)
    assert resumed.epoch == 2
    (w1, o1, m1), (w2, o2, m2) = _files(unbroken), _files(resumed)
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert o1.keys() == o2.keys() and all(torch.equal(o1[k], o2[k]) for k in o1)
    assert m1["history"] == m2["history"] and m1["epoch"] == m2["epoch"] == 2
    assert m2["space"]["name"] == "tiny-train" and m2["data"]["kind"] == "digits" and m2["complete"]


def test_checkpoint_is_self_describing_safetensors(space, splits, trained):
    result, ws = trained
    assert result.checkpoint == ws / "supernet" / "tiny-train" / WEIGHTS
    meta = json.loads((result.checkpoint.parent / SIDECAR).read_text())
    assert {
        "space",
        "data",
        "epoch",
        "config",
        "history",
        "files",
        "optimizer",
        "weights_hash",
    } <= meta.keys()
    assert meta["files"] == {"weights": WEIGHTS, "optimizer": OPTIMIZER}
    net, loaded = load_checkpoint(result.checkpoint)  # space rebuilt from the sidecar
    assert loaded["epoch"] == 1 and net.space.name == "tiny-train"
    state = load_file(result.checkpoint)
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    with pytest.raises(UserError, match="--resume"):
        _train(space, splits, ws, TrainConfig(epochs=1, batch_size=16, seed=1))
    with pytest.raises(UserError, match="settings; these differ: lr"):
        _train(space, splits, ws, TrainConfig(epochs=2, batch_size=16, seed=1, lr=1e-2), resume=True)
    done = _train(space, splits, ws, TrainConfig(epochs=1, batch_size=16, seed=1), resume=True)
    assert done.epoch == 1 and done.wall_s == 0  # complete already: nothing to do


def test_checkpoint_of_another_space_is_refused_naming_both(trained):
    result, _ = trained
    other = space_from_dict(OTHER, "tiny-other.yaml")
    with pytest.raises(
        UserError, match=r"trained for space 'tiny-train' \(hash \w+\), not for space 'tiny-other'"
    ):
        load_checkpoint(result.checkpoint, other)
    with pytest.raises(UserError, match="tiny-train"):
        load_checkpoint(result.checkpoint.parent / SIDECAR, other)


def test_checkpoint_of_an_earlier_pooling_is_refused(space, trained, tmp_path):
    result, _ = trained
    old = tmp_path / "old"
    shutil.copytree(result.checkpoint.parent, old)
    meta = json.loads((old / SIDECAR).read_text())
    (old / SIDECAR).write_text(json.dumps({**meta, "format": "vitnas-supernet/1"}))
    with pytest.raises(UserError, match="earlier vitnas.*train the supernet again"):
        load_checkpoint(old, space)


def test_evaluate_matches_a_plain_loop_over_the_extracted_subnet(space, splits, trained):
    result, _ = trained
    net, _ = load_checkpoint(result.checkpoint, space)
    for arch in (space.largest(), space.smallest(), space.sample(3)):
        model = net.extract(arch).eval()
        correct, total = 0, 0
        with torch.no_grad():
            for i in range(len(splits.val)):
                x, y = splits.val[i]
                correct += int(model(x[None]).argmax(-1).item() == int(y))
                total += 1
        for source in (net, result.checkpoint, str(result.checkpoint.parent)):
            got = evaluate(source, arch, splits.val)
            assert got.count == total and got.accuracy == pytest.approx(correct / total)
    assert evaluate(result.checkpoint, space.largest(), splits, split="val").count == len(splits.val)


def test_cli_trains_and_logs_to_mlflow(space, tmp_path, sqlite_tracking_uri, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    argv = [
        "train-supernet",
        "--space",
        str(path),
        "--data",
        "digits",
        "--epochs",
        "1",
        "--workspace",
        str(tmp_path),
        "--batch-size",
        "128",
        "--tracking-uri",
        sqlite_tracking_uri,
        "--quiet",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    weights = tmp_path / "supernet" / "tiny-train" / WEIGHTS
    assert f"checkpoint: {weights}" in out and "val accuracy largest" in out and "MLflow run" in out
    from mlflow import MlflowClient

    run_id = out.split("MLflow run ")[1].split()[0]
    run = MlflowClient(sqlite_tracking_uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["space"] == "tiny-train" and run.data.params["data"] == "digits"
    assert {"val_acc_largest", "val_acc_smallest", "train_loss"} <= run.data.metrics.keys()
    assert run.data.tags["checkpoint"] == str(weights.resolve())
    assert main(argv[:-3] + ["--quiet"]) == 2  # again without --resume: refused, one line
    assert "pass --resume" in capsys.readouterr().err


def test_cli_rejects_a_timm_space(tmp_path, capsys):
    assert main(["train-supernet", "--space", "deit-reduction", "--workspace", str(tmp_path), "--quiet"]) == 2
    assert "needs a psvit space" in capsys.readouterr().err


def test_supernet_for_wrong_number_of_classes_is_refused(tmp_path):
    space = space_from_dict({**TINY, "num_classes": 7})
    with pytest.raises(UserError, match="10 classes"):
        train_supernet(space, "digits", tmp_path, FAST, progress=False)


@pytest.mark.slow
def test_cli_resume_after_sigkill_equals_an_unbroken_run(tmp_path):
    """A real kill (SIGKILL mid-epoch) of `vitnas train-supernet`, then `--resume`."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def cli(ws, *extra):
        return [
            sys.executable,
            "-m",
            "nas.cli",
            "train-supernet",
            "--space",
            str(path),
            "--epochs",
            "3",
            "--batch-size",
            "32",
            "--workspace",
            str(ws),
            "--quiet",
            *extra,
        ]

    subprocess.run(cli(tmp_path / "a"), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(
        cli(tmp_path / "b"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    sidecar = tmp_path / "b" / "supernet" / "tiny-train" / SIDECAR
    deadline = time.monotonic() + 300
    while not sidecar.is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # into the second epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads(sidecar.read_text())["epoch"] < 3, "the run finished before it could be killed"
    subprocess.run(cli(tmp_path / "b", "--resume"), check=True, env=env, capture_output=True)
    a = load_file(tmp_path / "a" / "supernet" / "tiny-train" / WEIGHTS)
    b = load_file(Path(sidecar.parent / WEIGHTS))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_supernet_accepts_every_sampled_member_of_the_tiny_space(space):
    net = Supernet(space).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        for seed in range(20):
            assert torch.isfinite(net(x, space.sample(seed))).all()


def test_random_smallest_kinds_keep_the_smallest_sizes_and_vary_the_kinds():
    import random

    from nas.space import load_space
    from nas.supernet.train import sandwich_archs

    space = load_space("psvit-digits")
    smallest = space.smallest()
    config = TrainConfig(smallest_kinds="random")
    draws = random.Random(0)
    lower = [sandwich_archs(space, config, draws)[1] for _ in range(40)]
    sizes = [[(s.tokens, s.dim, s.heads, s.mlp_ratio, len(s.cells)) for s in a.stages] for a in lower]
    assert all(size == sizes[0] for size in sizes)
    assert sizes[0] == [(s.tokens, s.dim, s.heads, s.mlp_ratio, len(s.cells)) for s in smallest.stages]
    assert {a.stages[1].pool for a in lower} == {"conv1d", "avg", "tome"}
    assert {a.stages[0].attention for a in lower} == {"softmax", "linear"}
    fixed = sandwich_archs(space, TrainConfig(smallest_kinds="fixed"), draws)
    assert fixed[:2] == [space.largest(), smallest] and len(fixed) == 2 + TrainConfig().random_subnets
