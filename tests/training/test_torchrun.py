"""Real ``torchrun`` processes (gloo on CPU) against one process: same global batch, same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from safetensors.torch import load_file

from nas.cli import main
from nas.supernet.checkpoint import SIDECAR, WEIGHTS

TINY = {
    "name": "tiny-ddp",
    "image_size": 16,
    "patch_size": 4,
    "num_classes": 10,
    "stages": [
        {"dim": [16, 24], "heads": [2], "mlp_ratio": [2.0], "depth": [1, 2], "cells": ["basic", "share"],
         "reduction": {"kind": ["none", "tome"], "r": [2]}},
        {"tokens": [5], "pool": ["conv1d", "avg", "tome"], "dim": [32], "heads": [2, 4], "mlp_ratio": [2.0],
         "depth": [1, 2], "reduction": {"kind": ["none", "evit"], "keep_rate": [0.5], "at": [0]}},
    ],
}  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def space_file(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def _args(space_file, ws, *extra) -> list[str]:
    return ["train-supernet", "--space", str(space_file), "--workspace", str(ws), "--quiet", *extra]


def _torchrun(nproc: int, args: list[str], *torchrun_args: str, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *torchrun_args, "-m", "nas", *args]  # fmt: skip
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600, **kw)


def _folder(ws: Path) -> Path:
    return ws / "supernet" / "tiny-ddp"


def test_two_processes_train_the_weights_of_one(space_file, tmp_path, capsys, max_weight_diff):
    """3 sandwich steps of a global batch of 400: 1 process vs 2 gloo processes of 200 each."""
    steps = ["--epochs", "1", "--batch-size", "400", "--seed", "3"]
    assert main(_args(space_file, tmp_path / "one", *steps)) == 0
    two = _torchrun(2, _args(space_file, tmp_path / "two", *steps))
    assert two.returncode == 0, two.stderr[-3000:]
    assert "global batch 400 = 200 per micro-batch x 2 process(es) x 1 accumulation step(s); 3 steps" in two.stdout
    assert two.stdout.count("checkpoint: ") == 1  # rank 0 alone reports and writes
    a, b = (load_file(_folder(tmp_path / w) / WEIGHTS) for w in ("one", "two"))
    assert max_weight_diff(a, b) < 1e-5
    meta = json.loads((_folder(tmp_path / "two") / SIDECAR).read_text())
    assert meta["runtime"]["world_size"] == 2 and meta["runtime"]["launcher"] == "torchrun"
    one = json.loads((_folder(tmp_path / "one") / SIDECAR).read_text())["history"][0]
    assert abs(meta["history"][0]["val_loss_largest"] - one["val_loss_largest"]) < 1e-4


@pytest.mark.slow
def test_torchrun_supernet_is_searched_and_matches_one_process(space_file, tmp_path, capsys):
    steps = ["--epochs", "2", "--batch-size", "64"]
    assert main(_args(space_file, tmp_path / "one", *steps)) == 0
    two = _torchrun(2, _args(space_file, tmp_path / "two", *steps))
    assert two.returncode == 0, two.stderr[-3000:]
    one = json.loads((_folder(tmp_path / "one") / SIDECAR).read_text())["history"][-1]
    got = json.loads((_folder(tmp_path / "two") / SIDECAR).read_text())["history"][-1]
    for key in ("val_acc_largest", "val_acc_smallest"):
        assert abs(got[key] - one[key]) <= 0.02, (key, got[key], one[key])  # 269 images: 0.02 is ~5 of them
    capsys.readouterr()
    search = ["search", "--space", str(space_file), "--supernet", str(_folder(tmp_path / "two") / WEIGHTS),
              "--trials", "3", "--campaign", "ddp", "--workspace", str(tmp_path / "search"),
              "--measure-budget-s", "0.2", "--quiet"]  # fmt: skip
    assert main(search) == 0
    assert "campaign ddp: 3 finished, 0 failed" in capsys.readouterr().out


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_from_the_last_checkpoint(space_file, tmp_path):
    args = _args(space_file, tmp_path / "ws", "--epochs", "4", "--batch-size", "32")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           "-m", "nas", *args]  # fmt: skip
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sidecar = _folder(tmp_path / "ws") / SIDECAR
    deadline = time.monotonic() + 300
    while not sidecar.is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # into the second epoch
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert workers and proc.poll() is None, "the run ended before a worker could be killed"
    workers[-1].kill()
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    meta = json.loads(sidecar.read_text())
    assert [r["epoch"] for r in meta["history"]] == [1, 2, 3, 4] and meta["complete"]


@pytest.mark.slow
def test_a_world_size_that_does_not_split_the_batch_is_refused_on_every_rank(space_file, tmp_path):
    result = _torchrun(2, _args(space_file, tmp_path / "ws", "--batch-size", "33"))
    assert result.returncode != 0
    assert "vitnas: error: --batch-size 33 does not split over 2 process(es) x 1 accumulation step(s)" in result.stderr
    assert "Traceback" not in result.stderr.split("vitnas: error:")[0]
    assert not (tmp_path / "ws").exists()
