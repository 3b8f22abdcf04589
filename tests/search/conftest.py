"""Search fixtures: a tiny psvit space, an untrained supernet checkpoint for it (written by the real
checkpoint code), and one check of everything a campaign promises about its Optuna and MLflow records.

The supernet is untrained, so accuracies are near chance, but every other part is real: extraction,
fvcore FLOPs, latency measured on this CPU, the sqlite Optuna storage and the MLflow store.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from mlflow.entities import Run
from optuna.trial import TrialState

from nas.data import load_splits
from nas.names import CAMPAIGN, ROLE
from nas.search.campaign import INTERRUPTED, CampaignConfig, scorer_for
from nas.search.scoring import Scorer
from nas.space import SearchSpace, load_space
from nas.supernet import Supernet
from nas.supernet.checkpoint import save_checkpoint
from nas.tracking import Campaign, TrialRecord
from nas.training.config import TrainConfig
from nas.training.optim import make_optimizer

#: 16x16 images in 4x4 patches (16 tokens + class), two stages, dims up to 48: 288 members whose
#: subnets evaluate and measure in a fraction of a second on two cores.
TINY_SPACE = {
    "name": "tiny",
    "family": "psvit",
    "description": "two-stage test space",
    "image_size": 16,
    "patch_size": 4,
    "in_chans": 3,
    "num_classes": 10,
    "stages": [
        {
            "dim": [16, 32],
            "heads": [2],
            "mlp_ratio": [2.0],
            "attention": ["softmax", "linear"],
            "depth": [1, 2],
            "cells": ["basic", "share"],
            "reduction": {"kind": ["none", "tome"], "r": [2]},
        },
        {
            "tokens": [9, 5],
            "pool": ["conv1d", "avg"],
            "dim": [32, 48],
            "heads": [2],
            "mlp_ratio": [2.0],
            "attention": ["softmax"],
            "depth": [1, 2],
            "cells": ["basic"],
        },
    ],
}


def write_untrained_checkpoint(space: SearchSpace, folder: Path, seed: int = 0) -> Path:
    """A checkpoint of a freshly initialised supernet, as ``train_supernet`` writes one (epoch 0)."""
    torch.manual_seed(seed)
    net = Supernet(space)
    config = TrainConfig(seed=seed)
    splits = load_splits("digits", space.spec.image_size)
    meta = {
        "epoch": 0,
        "config": config.to_dict(),
        "data": splits.spec.to_dict(),
        "history": [],
        "complete": False,
    }
    save_checkpoint(folder, net, make_optimizer(net, config), meta)
    return folder


@dataclass(frozen=True)
class Tiny:
    """The tiny space, its checkpoint, and campaigns over them as the tests run them."""

    space: SearchSpace
    checkpoint: Path
    target: str = "cpu:threads=1,batch=1"  # one thread: disturbs (and is disturbed by) other work less
    measure_budget_s: float = 0.2

    def config(self, workspace: Path, name: str, trials: int, **overrides) -> CampaignConfig:
        return CampaignConfig(
            name=name,
            space=self.space.source,
            target=self.target,
            trials=trials,
            workspace=str(workspace),
            supernet=str(self.checkpoint),
            seed=1,
            measure_budget_s=self.measure_budget_s,
            **overrides,
        ).resolved()

    def scorer(self, config: CampaignConfig) -> Scorer:
        return scorer_for(config, self.space)

    def search_argv(self, config: CampaignConfig) -> list[str]:
        """``vitnas search`` arguments for the same campaign."""
        argv = ["search", "--space", self.space.source, "--supernet", config.supernet, "--target", config.target,
                "--trials", str(config.trials), "--campaign", config.name, "--workspace", config.workspace,
                "--tracking-uri", config.tracking_uri, "--seed", str(config.seed),
                "--measure-budget-s", str(config.measure_budget_s), "--quiet"]  # fmt: skip
        if config.latency_budget_ms is not None:
            argv += ["--latency-budget-ms", str(config.latency_budget_ms)]
        if config.eval_device != "auto":
            argv += ["--eval-device", config.eval_device]
        if config.val_subset is not None:
            argv += ["--val-subset", str(config.val_subset)]
        return argv

    def check(self, config: CampaignConfig) -> Records:
        """``check_campaign``: the records of the campaign agree and its Pareto tags are right."""
        return check_campaign(config)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    folder = tmp_path_factory.mktemp("tiny")
    (folder / "tiny.yaml").write_text(yaml.safe_dump(TINY_SPACE, sort_keys=False))
    space = load_space(folder / "tiny.yaml")
    return Tiny(space, write_untrained_checkpoint(space, folder / "supernet"))


# -- what every campaign must satisfy -------------------------------------------------------------
def brute_front(points: list[tuple[float, float]]) -> set[int]:
    """Indices of the (accuracy max, latency min) front, by the definition of dominance."""

    def dominates(p, q):
        return p[0] >= q[0] and p[1] <= q[1] and p != q

    return {i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)}


def brute_best(points: list[tuple[float, float]], budget: float | None) -> int | None:
    """Most accurate within the budget; ties: faster, then earlier."""
    fits = [i for i, (_, lat) in enumerate(points) if budget is None or lat <= budget]
    return min(fits, key=lambda i: (-points[i][0], points[i][1], i), default=None)


@dataclass
class Records:
    """A campaign as the stores hold it: Optuna trials and MLflow child runs by trial number, the parent run."""

    trials: list[optuna.trial.FrozenTrial]
    runs: list[TrialRecord]
    parent: Run


def check_campaign(config: CampaignConfig) -> Records:
    """Optuna and MLflow agree, one trial to one child run, and the Pareto tags are right.

    - the study names its objectives; no trial RUNNING in Optuna, no child run RUNNING in MLflow; one
      parent run;
    - child runs and Optuna trials match one to one by trial number (and by run id, arch hash),
      but for a trial interrupted before its run was created;
      COMPLETE is FINISHED, FAIL is FAILED; a completed trial's accuracy is the run's;
    - ``pareto``/``pareto_rank`` and ``best_under_budget`` on the finished runs equal a brute-force
      computation from their metrics, and nothing else carries them.
    """
    storage = optuna.storages.RDBStorage(config.storage)
    try:
        study = optuna.load_study(study_name=config.name, storage=storage)
        trials = sorted(study.get_trials(), key=lambda t: t.number)
        metric_names = study.metric_names
    finally:  # a team's server has a hundred connections to give; a pool left to the collector keeps its own
        storage.engine.dispose()
    assert metric_names == ["val_accuracy", "latency_ms"]  # what optuna-dashboard shows
    tracker = Campaign(config.tracking_uri, config.name)
    runs = tracker.trial_runs(only_finished=False)
    parents = tracker.client.search_runs(
        [tracker.experiment_id], f"tags.`{CAMPAIGN}` = '{config.name}' and tags.`{ROLE}` = 'campaign'"
    )
    assert len(parents) == 1
    assert [t.state for t in trials if t.state not in (TrialState.COMPLETE, TrialState.FAIL)] == []
    assert [r.trial_number for r in runs if r.status == "RUNNING"] == []
    assert [t.number for t in trials] == list(range(len(trials)))
    numbers = [r.trial_number for r in runs]
    assert len(set(numbers)) == len(numbers)  # no trial number logged twice
    # one to one, but for a trial interrupted before its run was created
    unlogged = [t for t in trials if t.number not in numbers]
    assert all(t.user_attrs.get(INTERRUPTED) and "mlflow_run_id" not in t.user_attrs for t in unlogged)
    trials_by_number = {t.number: t for t in trials}
    for run in runs:
        trial = trials_by_number[run.trial_number]
        # interrupted between creating its run and recording the run's id: found by number alone
        assert run.run_id == trial.user_attrs.get(
            "mlflow_run_id", run.run_id if trial.user_attrs.get(INTERRUPTED) else None
        )
        assert run.arch_hash == trial.user_attrs["arch_hash"]
        assert run.status == {TrialState.COMPLETE: "FINISHED", TrialState.FAIL: "FAILED"}[trial.state]
        if trial.state == TrialState.COMPLETE:
            assert math.isclose(run.metrics["val_accuracy"], trial.values[0])
        if trial.user_attrs.get(INTERRUPTED):
            assert run.tags["vitnas.failure"] == "interrupted"

    finished = [r for r in runs if r.status == "FINISHED"]
    points = [(r.metrics["val_accuracy"], r.metrics["latency_ms"]) for r in finished]
    front = brute_front(points)
    assert {i for i, r in enumerate(finished) if r.tags["pareto"] == "true"} == front
    assert all((r.tags["pareto_rank"] == "0") == (i in front) for i, r in enumerate(finished))
    best = [i for i, r in enumerate(finished) if r.tags["best_under_budget"] == "true"]
    expected = brute_best(points, config.latency_budget_ms)
    assert best == ([] if expected is None else [expected])
    assert all("pareto" not in r.tags for r in runs if r.status != "FINISHED")
    return Records(trials, runs, parents[0])
