"""The demo: its automatic latency budget names its members by size and says which one is faster; it
continues a supernet an earlier demo left, with the settings that supernet was trained with."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from nas.data import load_splits
from nas.demo import DemoConfig, _auto_budget, _supernet
from nas.errors import UserError
from nas.space import load_space
from nas.supernet import Supernet
from nas.supernet import checkpoint as ckpt
from nas.training.config import TrainConfig
from nas.training.optim import make_optimizer


@pytest.mark.parametrize("small, large, faster", [(1.0, 4.0, "smallest-size"), (4.0, 1.0, "largest-size")])
def test_auto_budget_is_the_geometric_mean_and_says_which_member_is_faster(small, large, faster):
    space = SimpleNamespace(smallest=lambda: "s", largest=lambda: "l")
    latency = {"s": small, "l": large}
    scorer = SimpleNamespace(score=lambda arch: SimpleNamespace(latency_ms=latency[arch]))
    lines = []
    assert math.isclose(_auto_budget(space, scorer, lines.append), 2.0)
    assert f"(the {faster} one is faster)" in lines[0] and "smallest member" not in lines[0]


def finished_checkpoint(space, workspace, config: TrainConfig) -> None:
    """A supernet checkpoint at its last epoch, as an earlier demo (of an earlier version) left it."""
    net = Supernet(space)
    meta = {
        "epoch": config.epochs, "config": config.to_dict(), "history": [], "complete": True,
        "data": load_splits("digits", space.spec.image_size).spec.to_dict(),
    }  # fmt: skip
    ckpt.save_checkpoint(ckpt.checkpoint_dir(workspace, space), net, make_optimizer(net, config), meta)


def test_the_demo_continues_a_supernet_trained_under_other_sandwich_settings(tmp_path):
    space = load_space("psvit-digits")
    earlier = TrainConfig(epochs=1, random_subnets=TrainConfig.random_subnets - 2, sampling="fair")
    finished_checkpoint(space, tmp_path, earlier)
    lines = []
    path = _supernet(space, tmp_path, DemoConfig(workspace=str(tmp_path), supernet_epochs=1), lines.append)
    assert path == ckpt.checkpoint_dir(tmp_path, space) / ckpt.WEIGHTS
    assert any("nothing to do" in line for line in lines)
    # what the demo's own flags set is still checked
    with pytest.raises(UserError, match=r"these differ: seed 0 -> 1 \(give the checkpoint's values"):
        _supernet(space, tmp_path, DemoConfig(workspace=str(tmp_path), supernet_epochs=1, seed=1), print)
