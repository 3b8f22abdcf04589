"""Files vitnas writes are whole or absent, with the mode a plain write gives (not safetensors' 0600)."""

from __future__ import annotations

import stat

import pytest
import torch
from torch import nn

from nas.files import UMASK, write_atomically
from nas.weights import save_weights

PLAIN = 0o666 & ~UMASK


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_weights_get_the_mode_of_a_plain_file(tmp_path):
    path = save_weights(nn.Linear(2, 2), tmp_path / "deep" / "weights.safetensors")
    assert _mode(path) == PLAIN and _mode(path) == _mode(_plain(tmp_path))
    assert [p.name for p in path.parent.iterdir()] == ["weights.safetensors"]  # no temporary file left


def test_supernet_checkpoint_files_get_the_mode_of_a_plain_file(tmp_path):
    from nas.space import load_space
    from nas.supernet import Supernet
    from nas.supernet.checkpoint import OPTIMIZER, SIDECAR, WEIGHTS, save_checkpoint

    net = Supernet(load_space("psvit-digits"))
    optimizer = torch.optim.AdamW(net.parameters())
    save_checkpoint(tmp_path, net, optimizer, {"epoch": 1})
    assert {_mode(tmp_path / name) for name in (WEIGHTS, OPTIMIZER, SIDECAR)} == {PLAIN}


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "table.json"
    path.write_text("old")

    def fail(tmp: str) -> None:
        open(tmp, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomically(path, fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["table.json"]


def _plain(folder):
    path = folder / "plain.txt"
    path.write_text("x")
    return path


def test_latency_tables_get_the_mode_of_a_plain_file(tmp_path):
    from nas.hardware.fingerprint import fingerprint
    from nas.hardware.predictor import LatencyTable
    from nas.hardware.target import Target

    target = Target.parse("cpu:threads=1")
    table = LatencyTable(space={"name": "s", "hash": "h", "source": "t"}, target=target.key(),
                         fingerprint=fingerprint(target).to_dict(), budget_s=0.1)  # fmt: skip
    table.save(tmp_path / "table.json")
    assert _mode(tmp_path / "table.json") == PLAIN
