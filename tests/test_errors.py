"""Bad input and hostile files end in one line, `vitnas: error: ...`, exit code 2, and write nothing.

Issue 13, items 1, 6, 8 and 9: a corrupted checkpoint or weights file is refused (hash recorded
beside it, NaN/inf parameters), tracebacks of known failures become one line (``--debug`` shows
them), bad flag values name the flag and the allowed range, and read-only commands never create
a store. Everything runs through ``nas.cli.main`` where a user would meet it.

Read-only locations: the tests run as root here, where ``chmod`` stops nothing, so ``read_only``
uses ``chattr +i`` (an immutable file or folder refuses root's writes too) as root and ``chmod
a-w`` otherwise; a workspace path through a regular file (``NotADirectoryError``) needs neither.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import Subset

from nas.cli import main
from nas.data import Splits, load_splits
from nas.errors import UserError, failure_line
from nas.export import export_trial
from nas.space import load_space
from nas.supernet import TrainConfig, load_checkpoint, train_supernet
from nas.supernet.checkpoint import SIDECAR, WEIGHTS, save_checkpoint
from nas.supernet.subnet import VitnasSubnet
from nas.tracking import Campaign, connect, default_tracking_uri
from nas.training.optim import make_optimizer
from nas.weights import file_hash, load_weights, save_weights

SPACE = {
    "name": "tiny-errors",
    "family": "psvit",
    "image_size": 16,
    "patch_size": 4,
    "num_classes": 10,
    "stages": [
        {"dim": [16, 24], "heads": [2], "mlp_ratio": [2.0], "depth": [1, 2], "cells": ["basic"]},
        {
            "tokens": [5],
            "pool": ["conv1d", "avg"],
            "dim": [32],
            "heads": [2],
            "mlp_ratio": [2.0],
            "depth": [1],
        },
    ],
}


@dataclass(frozen=True)
class Trained:
    space_file: Path
    checkpoint: Path  # the folder: supernet.safetensors, optimizer.safetensors, supernet.json


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    """One short epoch of real supernet training (a few seconds): the checkpoint the tests copy and break."""
    root = tmp_path_factory.mktemp("errors")
    space_file = root / "tiny-errors.yaml"
    space_file.write_text(yaml.safe_dump(SPACE, sort_keys=False))
    space = load_space(space_file)
    full = load_splits("digits", SPACE["image_size"])
    splits = Splits(
        Subset(full.train, range(32)), Subset(full.val, range(16)), full.test, full.num_classes, full.spec
    )
    config = TrainConfig(epochs=1, batch_size=16, seed=1)
    result = train_supernet(space, splits, root / "ws", config, progress=False, log=lambda _: None)
    return Trained(space_file, result.path.parent)


def _copy_checkpoint(trained: Trained, tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(trained.checkpoint, folder)
    return folder


def _overwrite(path: Path, size: int = 4096, at: float = 0.5, byte: bytes = b"\xff") -> None:
    """Overwrite ``size`` bytes in place (same length, same header): what a bad disk or a stray dd does."""
    with open(path, "r+b") as f:
        f.seek(int(path.stat().st_size * at))
        f.write(byte * size)


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size * 2 // 3)


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of ``vitnas ARGV``; stderr must be exactly one ``vitnas: error:`` line."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert err.startswith("vitnas: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return code, err


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@contextlib.contextmanager
def read_only(*paths: Path):
    """Folders and files nobody may write, root included (see the module's docstring)."""
    if os.geteuid() == 0:
        if not shutil.which("chattr"):
            pytest.skip("running as root without chattr: no way to make a read-only folder")
        done = subprocess.run(["chattr", "+i", *map(str, paths)], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"chattr +i refused here: {done.stderr.strip()}")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", *map(str, paths)], check=True)
    else:
        modes = {p: p.stat().st_mode for p in paths}
        for p, mode in modes.items():
            p.chmod(mode & ~0o222)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)


# -- item 8: bad values ---------------------------------------------------------------------------
SEARCH = ["search", "--space", "psvit-digits", "--campaign", "c", "--workspace", "ws"]
PARETO = ["pareto", "--campaign", "c", "--workspace", "ws"]
DEMO = ["demo", "--workspace", "ws"]
SUPERNET = ["train-supernet", "--space", "psvit-digits", "--workspace", "ws"]
TABLE = ["latency-table", "build", "--space", "psvit-digits", "--workspace", "ws"]
FINETUNE = ["finetune", "--space", "deit-reduction", "--out", "ws/w.safetensors"]
POSITIVE, COUNT = "must be a finite number > 0", "must be at least 1 (a whole number)"
BAD_VALUES = [
    (SEARCH + ["--latency-budget-ms", "-1"], f"--latency-budget-ms -1: {POSITIVE}"),
    (SEARCH + ["--latency-budget-ms", "0"], f"--latency-budget-ms 0: {POSITIVE}"),
    (SEARCH + ["--latency-budget-ms", "nan"], f"--latency-budget-ms nan: {POSITIVE}"),
    (SEARCH + ["--latency-budget-ms", "inf"], f"--latency-budget-ms inf: {POSITIVE}"),
    (SEARCH + ["--measure-budget-s", "0"], f"--measure-budget-s 0: {POSITIVE}"),
    (SEARCH + ["--measure-budget-s", "-2"], f"--measure-budget-s -2: {POSITIVE}"),
    (SEARCH + ["--measure-budget-s", "inf"], f"--measure-budget-s inf: {POSITIVE}"),
    (SEARCH + ["--trials", "0"], f"--trials 0: {COUNT}"),
    (SEARCH + ["--trials", "x"], f"--trials x: {COUNT}"),
    (SEARCH + ["--max-concurrent", "0"], f"--max-concurrent 0: {COUNT}"),
    (PARETO + ["--latency-budget-ms", "-1"], f"--latency-budget-ms -1: {POSITIVE}"),
    (PARETO + ["--latency-budget-ms", "nan"], f"--latency-budget-ms nan: {POSITIVE}"),
    (DEMO + ["--latency-budget-ms", "0"], f"--latency-budget-ms 0: {POSITIVE}"),
    (DEMO + ["--latency-budget-ms", "inf"], f"--latency-budget-ms inf: {POSITIVE}"),
    (DEMO + ["--trials", "0"], f"--trials 0: {COUNT}"),
    (DEMO + ["--supernet-epochs", "0"], f"--supernet-epochs 0: {COUNT}"),
    (DEMO + ["--retrain-epochs", "0"], f"--retrain-epochs 0: {COUNT}"),
    (SUPERNET + ["--epochs", "0"], f"--epochs 0: {COUNT}"),
    (SUPERNET + ["--epochs", "1.5"], f"--epochs 1.5: {COUNT}"),
    (SUPERNET + ["--lr", "nan"], f"--lr nan: {POSITIVE}"),
    (SUPERNET + ["--batch-size", "0"], f"--batch-size 0: {COUNT}"),
    (SUPERNET + ["--accum-steps", "0"], f"--accum-steps 0: {COUNT}"),
    (["train", "ws/train.yaml", "--epochs", "0"], f"--epochs 0: {COUNT}"),
    (FINETUNE + ["--epochs", "0"], f"--epochs 0: {COUNT}"),
    (["export", "--run-id", "abc", "--out", "ws/out", "--epochs", "0"], f"--epochs 0: {COUNT}"),
    (["export", "--campaign", "c", "--trial", "-1", "--out", "ws/out"], "--trial -1: must be at least 0"),
    (["profile", "--arch", "a.yaml", "--budget-s", "0"], f"--budget-s 0: {POSITIVE}"),
    (["profile", "--arch", "a.yaml", "--budget-s", "nan"], f"--budget-s nan: {POSITIVE}"),
    (TABLE + ["--budget-s", "0"], f"--budget-s 0: {POSITIVE}"),
    (TABLE + ["--passes", "0"], f"--passes 0: {COUNT}"),
    (TABLE + ["--fit-subnets", "-1"], "--fit-subnets -1: must be at least 0 (a whole number)"),
    (
        ["dashboard", "--workspace", "ws", "--port", "70000"],
        "--port 70000: must be a whole number from 0 to 65535",
    ),
    (["dashboard", "--workspace", "ws", "--cache-ttl", "-1"], "--cache-ttl -1: must be a finite number >= 0"),
    (["space", "show", "psvit-digits", "--jsn"], "unrecognized arguments: --jsn (see vitnas --help)"),
    (
        ["search", "--space", "psvit-digits"],
        "the following arguments are required: --campaign (see vitnas search",
    ),
    (["serch"], "COMMAND: invalid choice: 'serch'"),
]


@pytest.mark.parametrize(
    ("argv", "message"), BAD_VALUES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD_VALUES]
)
def test_a_bad_value_is_one_line_naming_the_flag_and_writes_nothing(
    tmp_path, monkeypatch, capsys, argv, message
):
    monkeypatch.chdir(tmp_path)  # relative paths (and the default workspace) land here
    code, err = _cli(argv, capsys)
    assert code == 2 and message in err, err
    assert "supernet training" not in err
    assert _tree(tmp_path) == []


def test_a_recipe_value_names_the_recipe_not_a_flag(tmp_path, capsys):
    recipe = tmp_path / "train.yaml"
    recipe.write_text("epochs: 0\n")
    code, err = _cli(["train", recipe], capsys)
    assert code == 2 and str(recipe) in err and "epochs" in err and "--epochs" not in err, err


def test_library_callers_of_the_demo_are_refused_too():
    from nas.demo import DemoConfig

    for bad in (dict(latency_budget_ms=-1.0), dict(latency_budget_ms=float("nan")), dict(trials=0)):
        with pytest.raises(UserError, match="must be"):
            DemoConfig(**bad)


# -- item 1: corrupted checkpoints and weights ----------------------------------------------------
def test_a_checkpoint_overwritten_in_place_is_refused_by_its_hash(trained, tmp_path):
    folder = _copy_checkpoint(trained, tmp_path)
    load_checkpoint(folder)  # intact: loads
    _overwrite(folder / WEIGHTS)  # 4 KiB of 0xff (NaN in float32) inside the tensors, header intact
    with pytest.raises(UserError) as refused:
        load_checkpoint(folder)
    message = str(refused.value)
    assert message.startswith(f"{folder / WEIGHTS}: does not match the hash recorded in {folder / SIDECAR}")
    assert message.endswith("corrupted or replaced?)") and "\n" not in message


def test_resuming_a_corrupted_checkpoint_is_refused(trained, tmp_path):
    """Supernet training's resume loads through ``load_checkpoint``: it refuses the same way."""
    ws = tmp_path / "ws"
    folder = ws / "supernet" / SPACE["name"]
    shutil.copytree(trained.checkpoint, folder)
    _overwrite(folder / WEIGHTS)
    with pytest.raises(UserError, match="does not match the hash recorded in"):
        train_supernet(
            load_space(trained.space_file), "digits", ws, TrainConfig(epochs=2, batch_size=16, seed=1),
            resume=True, progress=False, log=lambda _: None,
        )  # fmt: skip


def test_non_finite_parameters_are_refused_naming_the_tensor(trained, tmp_path):
    net, meta = load_checkpoint(trained.checkpoint)
    name = "stages.1.pool.conv1d.weight"
    with torch.no_grad():
        dict(net.named_parameters())[name].view(-1)[3] = float("nan")
    folder = tmp_path / "nan"
    config = TrainConfig(**meta["config"])
    save_checkpoint(
        folder, net, make_optimizer(net, config), {k: meta[k] for k in ("epoch", "config", "data")}
    )
    with pytest.raises(
        UserError, match=rf"supernet.safetensors: tensor {name} holds 1 NaN or infinite value"
    ):
        load_checkpoint(folder)  # the hash matches: the file is as written, but never usable

    arch = load_space(trained.space_file).smallest()
    model = VitnasSubnet(arch)
    state = model.state_dict()
    key = next(iter(k for k, _ in model.named_parameters()))
    state[key] = torch.full_like(state[key], float("inf"))
    save_weights(state, tmp_path / "w.safetensors")
    with pytest.raises(UserError, match=rf"w.safetensors: tensor {key} holds"):
        load_weights(VitnasSubnet(arch), tmp_path / "w.safetensors")


def test_file_hash_sees_a_rewrite_made_within_the_same_clock_tick(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 10_000)
    first = file_hash(path)
    _overwrite(path, size=10, at=0.5, byte=b"b")  # same size and inode, mtime possibly unchanged
    assert file_hash(path) != first


# -- item 6: one line instead of a traceback ------------------------------------------------------
def _search_argv(trained: Trained, checkpoint: Path, workspace: Path) -> list:
    return ["search", "--space", trained.space_file, "--supernet", checkpoint, "--campaign", "c",
            "--trials", "1", "--workspace", workspace, "--measure-budget-s", "0.05", "--quiet"]  # fmt: skip


def test_a_truncated_or_corrupted_checkpoint_stops_search_in_one_line(trained, tmp_path, capsys):
    folder = _copy_checkpoint(trained, tmp_path)
    _overwrite(folder / WEIGHTS)
    code, err = _cli(_search_argv(trained, folder, tmp_path / "ws"), capsys)
    assert code == 2 and f"{folder / WEIGHTS}: does not match the hash recorded in {folder / SIDECAR}" in err
    assert not (tmp_path / "ws" / "mlflow.db").exists()  # nothing was scored
    _truncate(folder / WEIGHTS)
    code, err = _cli(_search_argv(trained, folder, tmp_path / "ws"), capsys)
    assert code == 2 and f"{folder / WEIGHTS}: not a readable safetensors file (" in err
    assert "truncated or corrupted?" in err


def test_search_into_an_unwritable_workspace_is_one_line(trained, tmp_path, capsys):
    afile = tmp_path / "a-file"
    afile.write_text("not a folder\n")
    code, err = _cli(_search_argv(trained, trained.checkpoint, afile / "ws"), capsys)
    assert code == 2 and f"{afile / 'ws'}: Not a directory" in err, err

    ws = tmp_path / "ro-ws"
    ws.mkdir()
    with read_only(ws):
        code, err = _cli(_search_argv(trained, trained.checkpoint, ws), capsys)
        assert code == 2 and (str(ws) in err or "read-only" in err), err
        assert _tree(ws) == []


def _train_folder(trained: Trained, folder: Path, weights_hash: bool) -> Path:
    """An exported-like folder: arch.yaml, weights.safetensors and train.yaml (with the weights' hash)."""
    arch = load_space(trained.space_file).smallest()
    folder.mkdir()
    (folder / "arch.yaml").write_text(arch.to_yaml())
    save_weights(VitnasSubnet(arch), folder / "weights.safetensors")
    recipe = {"epochs": 1, "batch_size": 16}
    if weights_hash:
        recipe["weights_hash"] = file_hash(folder / "weights.safetensors")
    (folder / "train.yaml").write_text(yaml.safe_dump(recipe))
    return folder / "train.yaml"


def test_vitnas_train_refuses_truncated_or_replaced_weights_in_one_line(trained, tmp_path, capsys):
    recipe = _train_folder(trained, tmp_path / "truncated", weights_hash=False)
    _truncate(recipe.parent / "weights.safetensors")
    code, err = _cli(["train", recipe, "--quiet"], capsys)
    assert code == 2 and "weights.safetensors: not a readable safetensors file" in err, err

    recipe = _train_folder(trained, tmp_path / "overwritten", weights_hash=True)
    _overwrite(recipe.parent / "weights.safetensors", size=64)
    code, err = _cli(["train", recipe, "--quiet"], capsys)
    assert code == 2 and f"does not match the hash recorded in {recipe}" in err, err
    assert not (recipe.parent / "trained.safetensors").exists()


# -- item 9: reading never writes ------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        ["pareto", "--campaign", "c"],
        ["export", "--campaign", "c", "--trial", "0", "--out", "{tmp}/out"],
        ["export", "--run-id", "deadbeef", "--out", "{tmp}/out"],
        ["dashboard", "--port", "0"],
    ],
    ids=["pareto", "export-campaign", "export-run", "dashboard"],
)
def test_reading_a_missing_store_creates_nothing(tmp_path, capsys, argv):
    ws = tmp_path / "missing-ws"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, err = _cli([*argv, "--workspace", ws], capsys)
    assert code == 2, err
    assert f"no tracking store at {ws / 'mlflow.db'} (run vitnas search first, or pass --tracking-uri)" in err
    assert _tree(tmp_path) == []


def test_a_store_that_is_not_mlflow_is_not_turned_into_one(tmp_path, capsys):
    other = tmp_path / "notes.db"
    other.write_text("hello\n")
    code, err = _cli(["pareto", "--campaign", "c", "--tracking-uri", f"sqlite:///{other}"], capsys)
    assert code == 2 and str(other) in err and "cannot read it" in err, err
    assert other.read_text() == "hello\n"


def test_export_names_a_missing_campaign_or_run(sqlite_tracking_uri, tmp_path, capsys):
    before = Path(sqlite_tracking_uri.removeprefix("sqlite:///")).read_bytes()
    argv = ["export", "--out", tmp_path / "out", "--tracking-uri", sqlite_tracking_uri]
    code, err = _cli([*argv, "--campaign", "nope", "--trial", "1"], capsys)
    assert code == 2 and f"no campaign 'nope' in {sqlite_tracking_uri}" in err, err
    code, err = _cli([*argv, "--run-id", "deadbeef"], capsys)
    assert code == 2 and f"no run 'deadbeef' in {sqlite_tracking_uri}" in err, err
    code, err = _cli(["pareto", "--campaign", "nope", "--tracking-uri", sqlite_tracking_uri], capsys)
    assert code == 2 and f"no campaign 'nope' in {sqlite_tracking_uri}" in err, err
    assert not (tmp_path / "out").exists()
    assert (
        Path(sqlite_tracking_uri.removeprefix("sqlite:///")).read_bytes() == before
    )  # no experiment created


def test_pareto_reads_a_read_only_store(tmp_path, capsys):
    uri = default_tracking_uri(tmp_path / "ws")
    Campaign(uri, "c").start_or_resume({"space": "s"})  # a WAL store, as search leaves it
    connect(uri).search_experiments()
    ws = tmp_path / "ws"
    files = [p for p in ws.rglob("*") if p.is_file()]
    before = {p: p.read_bytes() for p in files}
    with read_only(ws, *files):
        assert main(["pareto", "--campaign", "c", "--workspace", str(ws)]) == 0, capsys.readouterr().err
        code, err = _cli(["pareto", "--campaign", "other", "--workspace", ws], capsys)
        assert code == 2 and "no campaign 'other'" in err
    assert {p: p.read_bytes() for p in files} == before and sorted(ws.rglob("*")) == sorted(before)


# -- exported weights: the hash goes into train.yaml, and export refuses a replaced checkpoint ------
def _fake_trial(trained: Trained, checkpoint: Path, uri: str) -> str:
    """A campaign with one finished trial, logged as the search logs it (no search run: seconds)."""
    space = load_space(trained.space_file)
    campaign = Campaign(uri, "c")
    params = {"data": "digits", "space": space.name, "space_file": space.source, "supernet": str(checkpoint)}
    campaign.start_or_resume(params)
    run_id = campaign.trial_run(0, space.smallest(), tags={"supernet_hash": file_hash(checkpoint / WEIGHTS)})
    campaign.finish_trial(run_id, {"val_accuracy": 0.5, "latency_ms": 1.0})
    return run_id


def test_export_records_the_weights_hash_and_refuses_a_replaced_checkpoint(trained, tmp_path, capsys):
    folder = _copy_checkpoint(trained, tmp_path)
    uri = default_tracking_uri(tmp_path / "ws")
    run_id = _fake_trial(trained, folder, uri)
    exported = export_trial(uri, tmp_path / "out", run_id=run_id, epochs=1)
    recipe = yaml.safe_load((exported.out / "train.yaml").read_text())
    assert recipe["weights_hash"] == file_hash(exported.out / "weights.safetensors")

    net, meta = load_checkpoint(folder)  # trained further after the search: a consistent, other checkpoint
    with torch.no_grad():
        next(net.parameters()).add_(1.0)
    save_checkpoint(folder, net, make_optimizer(net, TrainConfig(**meta["config"])), meta)
    code, err = _cli(
        ["export", "--run-id", run_id, "--out", tmp_path / "out2", "--tracking-uri", uri], capsys
    )
    assert code == 2 and "the one the campaign scored this trial with" in err, err


# -- --debug, and what stays a traceback ----------------------------------------------------------
def test_debug_shows_the_traceback(sqlite_tracking_uri, tmp_path, monkeypatch, capsys):
    argv = [
        "export",
        "--run-id",
        "deadbeef",
        "--out",
        str(tmp_path / "out"),
        "--tracking-uri",
        sqlite_tracking_uri,
    ]
    assert main(argv) == 2
    with pytest.raises(UserError, match="no run 'deadbeef'"):
        main(["--debug", *argv])
    monkeypatch.setenv("VITNAS_DEBUG", "1")
    with pytest.raises(UserError, match="no run 'deadbeef'"):
        main(argv)


def test_a_bug_keeps_its_traceback(monkeypatch):
    import nas.cli

    def broken(_args):
        raise KeyError("a bug")

    monkeypatch.setattr(nas.cli, "_pareto", broken)
    with pytest.raises(KeyError):
        main(["pareto", "--campaign", "c"])


def test_failure_line_knows_the_machine_families_only():
    import sqlite3

    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/ws/mlflow.db")
    assert (
        failure_line(full)
        == "/ws/mlflow.db: No space left on device (free some space, or choose another location)"
    )
    ro = OSError(errno.EROFS, os.strerror(errno.EROFS), "/ws/x")
    assert failure_line(ro) == "/ws/x: Read-only file system"
    assert failure_line(PermissionError(errno.EACCES, "Permission denied", "/ws")) == "/ws: Permission denied"
    db = sqlalchemy.exc.OperationalError(
        "UPDATE x", {}, sqlite3.OperationalError("attempt to write a readonly database")
    )
    try:
        raise MlflowException(str(db)) from db  # as MLflow's session wraps it
    except MlflowException as wrapped:
        line = failure_line(wrapped, "/ws")
    assert (
        line == "database in /ws: attempt to write a readonly database (the file or its folder is read-only)"
    )
    assert failure_line(UserError("bad\n  value")) == "bad value"
    for bug in (
        KeyError("k"),
        ValueError("v"),
        FileNotFoundError(errno.ENOENT, "No such file", "/x"),
        RuntimeError(),
    ):
        assert failure_line(bug) is None


def test_a_user_error_from_the_record_writer_has_no_class_name_prefix():
    from nas.search.background_writer import BackgroundWriter

    class Handler:
        def write(self):
            raise UserError("trial 21 was stored as number 22")

    writer = BackgroundWriter(Handler)
    try:
        writer.submit("write")
        with pytest.raises(UserError) as refused:
            writer.drain()
    finally:
        writer.close()
    assert str(refused.value) == "trial 21 was stored as number 22"
