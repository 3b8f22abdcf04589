"""The one training loop in one process: batches, accumulation, precision, the disk pipeline, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import Subset

from nas.cli import main
from nas.data import Splits, load_splits
from nas.space import space_from_dict
from nas.supernet import TrainConfig, evaluate, load_checkpoint, train_supernet
from nas.supernet.checkpoint import SIDECAR, WEIGHTS
from nas.training.batches import Batches, shift_images
from nas.training.distributed import World

TINY = {
    "name": "tiny-loop",
    "image_size": 16,
    "patch_size": 4,
    "num_classes": 10,
    "stages": [
        {"dim": [16, 24], "heads": [2], "mlp_ratio": [2.0], "depth": [1, 2], "cells": ["basic", "share"]},
        {"tokens": [5], "pool": ["conv1d", "avg"], "dim": [32], "heads": [2, 4], "mlp_ratio": [2.0], "depth": [1, 2]},
    ],
}


@pytest.fixture(scope="module")
def space():
    return space_from_dict(TINY, "tiny-loop.yaml")


@pytest.fixture(scope="module")
def digits():
    full = load_splits("digits", TINY["image_size"])
    return Splits(Subset(full.train, range(96)), Subset(full.val, range(60)), full.test, 10, full.spec)


def _train(space, splits, ws, config, **kw):
    return train_supernet(space, splits, ws, config, progress=False, log=lambda _: None, **kw)


def _weights(ws):
    return load_file(ws / "supernet" / "tiny-loop" / WEIGHTS)


def test_shift_images_moves_by_whole_pixels():
    x = torch.arange(2 * 3 * 10 * 10, dtype=torch.float32).view(2, 3, 10, 10)
    offsets = torch.tensor([[0, 4], [2, 2]])  # (-2, +2) and no shift
    out = shift_images(x, offsets, 2)
    assert torch.equal(out[1], x[1])
    assert torch.equal(out[0, :, 2:8, 2:6], x[0, :, 0:6, 4:8])
    assert torch.equal(shift_images(x, offsets, 0), x)


def test_every_world_size_sees_the_same_global_batches(digits):
    """Rank r of W takes every W-th image of the same permutation: the union is one process's batch."""
    config = TrainConfig(batch_size=32, accum_steps=2, seed=3)
    one = [torch.cat([x for x, _ in step]) for step in Batches(digits.train, config, World(), 10).epoch(1)]
    ranks = [Batches(digits.train, config, World(rank=r, size=2), 10) for r in range(2)]
    two = [
        torch.cat([x for part in parts for x, _ in part]) for parts in zip(*(b.epoch(1) for b in ranks))
    ]
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        key = lambda t: sorted(map(tuple, t.flatten(1).tolist()))  # noqa: E731
        assert a.shape == b.shape == (32, 3, 16, 16) and key(a) == key(b)
    assert not torch.equal(one[0], [torch.cat([x for x, _ in s]) for s in Batches(digits.train, config, World(), 10).epoch(2)][0])


def test_accumulation_gives_the_one_batch_update(space, digits, tmp_path, max_weight_diff):
    _train(space, digits, tmp_path / "a", TrainConfig(epochs=1, batch_size=32, seed=1))
    _train(space, digits, tmp_path / "b", TrainConfig(epochs=1, batch_size=32, seed=1, accum_steps=4))
    assert max_weight_diff(_weights(tmp_path / "a"), _weights(tmp_path / "b")) < 1e-5
    sidecar = json.loads((tmp_path / "b" / "supernet" / "tiny-loop" / SIDECAR).read_text())
    assert sidecar["config"]["accum_steps"] == 4 and sidecar["runtime"]["global_batch"] == 32


def test_bf16_on_cpu_trains_and_is_recorded(space, tmp_path):
    config = TrainConfig(epochs=3, batch_size=32, lr=2e-3, warmup_epochs=0.2, seed=2, precision="bf16")
    result = _train(space, "digits", tmp_path, config)
    losses = [r["train_loss"] for r in result.history]
    assert losses[2] < losses[1] < losses[0] and losses[2] < losses[0] - 0.08, result.history
    sidecar = json.loads((tmp_path / "supernet" / "tiny-loop" / SIDECAR).read_text())
    assert sidecar["runtime"]["precision"] == "bf16" and sidecar["runtime"]["device"] == "cpu"
    fp32 = _train(space, "digits", tmp_path / "fp32", config.replace(precision="fp32"))
    assert fp32.history[0]["train_loss"] != result.history[0]["train_loss"]  # autocast really ran


def test_resume_may_change_precision_but_not_what_is_learned(space, digits, tmp_path):
    config = TrainConfig(epochs=2, batch_size=32, seed=1)
    _train(space, digits, tmp_path, config, stop_after=1)
    resumed = _train(space, digits, tmp_path, config.replace(precision="bf16", accum_steps=2), resume=True)
    assert resumed.epoch == 2
    with pytest.raises(Exception, match="lr 0.001 -> 0.002"):
        _train(space, digits, tmp_path, config.replace(lr=2e-3, epochs=3), resume=True)


def _imagefolder(root, classes=10, per_class=20, size=64):
    """Images whose class sets their mean colour, with noise: learnable, and different every image."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class{c:02d}"
        folder.mkdir(parents=True)
        colour = np.array([c * 25, 255 - c * 25, (c * 70) % 256])
        for i in range(per_class):
            pixels = np.clip(colour + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_imagefolder_with_loader_workers_and_mixup_trains_evaluates_and_resumes(space, tmp_path):
    data = f"imagefolder:{_imagefolder(tmp_path / 'images')}"
    config = TrainConfig(epochs=2, batch_size=28, lr=2e-3, warmup_epochs=0.5, aug="deit", loader_workers=2)
    unbroken = train_supernet(space, data, tmp_path / "a", config, progress=False, log=lambda _: None)
    train_supernet(space, data, tmp_path / "b", config, progress=False, log=lambda _: None, stop_after=1)
    train_supernet(space, data, tmp_path / "b", config, progress=False, log=lambda _: None, resume=True)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)  # randomness keyed by image: workers do not matter
    assert [r["epoch"] for r in unbroken.history] == [1, 2]
    sidecar = json.loads((tmp_path / "a" / "supernet" / "tiny-loop" / SIDECAR).read_text())
    assert sidecar["augmentation"]["preset"] == "deit" and sidecar["augmentation"]["mixup"]["mixup_alpha"] == 0.8
    net, _ = load_checkpoint(tmp_path / "a" / "supernet" / "tiny-loop")
    got = evaluate(net, space.largest(), data)
    assert got.count == 30 and got.accuracy == unbroken.history[-1]["val_acc_largest"]


def _cli(tmp_path, *extra) -> list[str]:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return ["train-supernet", "--space", str(path), "--epochs", "1", "--workspace", str(tmp_path / "ws"), "--quiet", *extra]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--device", "cuda"], "--device cuda: CUDA is not available on this machine"),
        (["--precision", "fp16", "--device", "cpu"], "--precision fp16 needs a CUDA device"),
        (["--precision", "fp8"], "--precision 'fp8': expected one of fp32, bf16, fp16"),
        (["--batch-size", "33", "--accum-steps", "2"], "--batch-size 33 does not split over 1 process(es) x 2"),
        (["--aug", "heavy"], "--aug 'heavy': expected one of none, light, deit"),
        (["--backend", "slurm"], "--backend 'slurm': expected local or ray"),
    ],
)
def test_bad_training_input_is_one_line_and_writes_nothing(tmp_path, capsys, extra, message):
    assert main(_cli(tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitnas: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "ws").exists()


@pytest.mark.slow
def test_compiled_plain_model_trains_like_eager(space, digits, max_weight_diff):
    from nas.supernet import VitnasSubnet
    from nas.training.classifier import train_classifier

    arch, config = space.largest(), TrainConfig(epochs=1, batch_size=32, seed=4, random_subnets=0)
    trained = []
    for compile_ in (False, True):
        torch.manual_seed(0)
        model = VitnasSubnet(arch)
        history = train_classifier(model, digits, config.replace(compile=compile_), World(), progress=False, log=str)
        trained.append((model.state_dict(), history[-1]))
    (eager, h_eager), (compiled, h_compiled) = trained
    assert max_weight_diff(eager, compiled) < 1e-4
    assert abs(h_eager["val_loss"] - h_compiled["val_loss"]) < 1e-3


def test_each_parameter_group_follows_the_schedule_at_its_share():
    from torch import nn

    from nas.training.optim import make_optimizer, set_lr

    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    config = TrainConfig(lr=1e-3)
    plain = make_optimizer(model, config)
    # without shares: the two groups (decay, no decay) every earlier checkpoint holds
    assert [len(g["params"]) for g in plain.param_groups] == [2, 4]
    scaled = make_optimizer(model, config, lambda name: 1.0 if name.startswith("2.") else 0.1)
    set_lr(scaled, 2e-3)
    by_param = {id(p): (g["lr"], g["weight_decay"]) for g in scaled.param_groups for p in g["params"]}
    wd = config.weight_decay
    assert by_param[id(model[0].weight)] == pytest.approx((2e-4, wd))
    assert by_param[id(model[1].weight)] == pytest.approx((2e-4, 0.0))
    assert by_param[id(model[2].weight)] == pytest.approx((2e-3, wd))
    assert by_param[id(model[2].bias)] == pytest.approx((2e-3, 0.0))
    assert len(by_param) == len(list(model.parameters()))
