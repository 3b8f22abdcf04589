"""Supernet training as Ray Train workers (``vitnas train-supernet --backend ray``): bad input is
refused before Ray starts, and a worker killed mid-run costs no finished epoch and repeats none."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest
import ray
import yaml
from conftest import _cmdline, _parent, _pids, search_fixtures, wait_for
from ray.train import Checkpoint

from nas.cli import main
from nas.data import parse_data_spec
from nas.errors import UserError
from nas.space import load_space
from nas.supernet import load_checkpoint
from nas.supernet.checkpoint import SIDECAR
from nas.training.config import TrainConfig
from nas.training.ray_train import (
    MARKER,
    RayTrainOptions,
    _Job,
    _resume_or_force,
    _sidecar_hash,
    train_supernet_on_ray,
)

TINY = {**search_fixtures.TINY_SPACE, "name": "tiny-ray-train"}


def _files(root: Path) -> list[Path]:
    return sorted(root.rglob("*"))


def _cli(space: str, workspace: Path, *flags: str) -> int:
    argv = ["train-supernet", "--space", space, "--backend", "ray", "--workspace", str(workspace), "--quiet"]
    return main([*argv, *flags])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num-workers", "0"], "--num-workers 0: must be at least 1"),
        (["--num-workers", "3", "--batch-size", "32"], "--batch-size 32 does not split over 3 process(es)"),
        (["--gpus-per-worker", "-1"], "--gpus-per-worker -1"),
        (["--max-failures", "-1"], "--max-failures -1"),
    ],
)
def test_bad_input_is_refused_before_ray_starts(tmp_path, capsys, flags, message):
    assert _cli("psvit-digits", tmp_path / "ws", *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitnas: error: ") and message in err and err.count("\n") == 1, err
    assert _files(tmp_path) == [] and not ray.is_initialized()


def test_an_existing_checkpoint_needs_resume_or_force_before_ray_starts(tmp_path, capsys):
    space_file = tmp_path / "tiny.yaml"
    space_file.write_text(yaml.safe_dump(TINY, sort_keys=False))
    ws = tmp_path / "ws"
    search_fixtures.write_untrained_checkpoint(load_space(space_file), ws / "supernet" / TINY["name"])
    before = _files(tmp_path)
    assert _cli(str(space_file), ws) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitnas: error: ") and "--resume" in err and err.count("\n") == 1, err
    assert _files(tmp_path) == before and not ray.is_initialized()


def test_a_restart_resumes_what_this_run_wrote_and_never_starts_it_over(tmp_path):
    """The decision rank 0 takes as a worker group starts: the first attempt does what was asked; a
    restart resumes once this run wrote a checkpoint, even one it had not reported to Ray yet."""
    space_file = tmp_path / "tiny.yaml"
    space_file.write_text(yaml.safe_dump(TINY, sort_keys=False))
    space, folder = load_space(space_file), tmp_path / "ws" / "supernet" / TINY["name"]

    def decide(seen, restored=None, resume=False, force=False):
        job = _Job(space, parse_data_spec("digits"), str(tmp_path / "ws"), TrainConfig(), False, resume, force,
                   seen, None, False)  # fmt: skip
        return _resume_or_force(job, folder, restored)

    assert decide(None) == (False, False)  # a fresh run
    assert decide(None, resume=True) == (True, False)
    search_fixtures.write_untrained_checkpoint(space, folder)
    old = _sidecar_hash(folder)
    assert decide(old, force=True) == (False, True)  # --force over an earlier run, first attempt
    assert decide(None) == (True, False)  # written by this run, lost before it reported
    assert decide(None, force=True) == (True, False)  # ... a restart never starts over
    marker = tmp_path / "marker"
    marker.mkdir()
    (marker / MARKER).write_text(json.dumps({"epoch": 2}))
    with pytest.raises(UserError, match="storage every node shares"):  # Ray saw epoch 2, this node epoch 0
        decide(old, restored=Checkpoint.from_directory(marker))


@pytest.fixture
def local_ray():
    """A Ray of this test's own on this machine (not one another test or user started)."""
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _train_workers() -> set[int]:
    """The Ray Train worker processes of the Ray this process started (its descendants)."""
    parents = {pid: _parent(pid) for pid in _pids()}
    ours, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - ours
        ours |= frontier
    return {pid for pid in ours if any("RayTrainWorker" in part for part in _cmdline(pid))}


def _epoch(folder: Path) -> int:
    try:
        return json.loads((folder / SIDECAR).read_text())["epoch"]
    except (OSError, ValueError):  # not written yet (each write is atomic, so never half a file)
        return 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_killed_worker_resumes_from_the_last_checkpoint(tmp_path, local_ray):
    space_file = tmp_path / "tiny.yaml"
    space_file.write_text(yaml.safe_dump(TINY, sort_keys=False))
    ws = tmp_path / "ws"
    folder = ws / "supernet" / TINY["name"]
    kill: dict = {}

    def killer() -> None:
        """SIGKILL one worker once epoch 1 is checkpointed; then wait for Ray Train's new group."""
        wait_for(lambda: _epoch(folder) >= 1, 300, "the first epoch's checkpoint", every_s=0.05)
        workers = _train_workers()
        victim = max(workers)
        os.kill(victim, signal.SIGKILL)
        kill.update(pid=victim, at_epoch=_epoch(folder), workers=workers)
        kill["restarted"] = wait_for(
            lambda: _train_workers() - workers, 300, "a new worker group", every_s=0.2
        )

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    config = TrainConfig(epochs=3, batch_size=32, seed=3)
    result = train_supernet_on_ray(
        str(space_file), "digits", ws, config, RayTrainOptions(None, 2, 0, 2), progress=False
    )
    thread.join(timeout=30)

    assert "restarted" in kill, f"the killer did not see its kill through: {kill}"
    assert len(kill["workers"]) == 2 and kill["pid"] in kill["workers"]
    assert kill["at_epoch"] < 3, "training ended before the kill: nothing was resumed"
    assert kill["restarted"], "Ray Train did not start a new worker group"
    assert result.epoch == 3 and [r["epoch"] for r in result.history] == [1, 2, 3]
    assert [r["epoch"] for r in json.loads((folder / SIDECAR).read_text())["history"]] == [1, 2, 3]
    # every epoch reported to Ray at most once: the restarted group did not start over
    reported = [json.loads(p.read_text())["epoch"] for p in (ws / "ray-train").rglob(MARKER)]
    assert sorted(reported) == sorted(set(reported)) and max(reported) == 3, reported
    _, meta = load_checkpoint(result.path)
    assert meta["epoch"] == 3 and meta["runtime"]["world_size"] == 2

    # a worker's UserError (here: --resume with another learning rate) ends the run as that one line
    with pytest.raises(UserError, match="resume continues with the checkpoint's settings"):
        train_supernet_on_ray(
            str(space_file),
            "digits",
            ws,
            config.replace(lr=5e-3),
            RayTrainOptions(None, 2, 0, 0),
            resume=True,
        )
    assert json.loads((folder / SIDECAR).read_text())["history"] == meta["history"]
