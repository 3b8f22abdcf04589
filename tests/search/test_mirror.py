"""The in-memory study and its writer: claimed rows equal to Optuna's own, trial numbers guarded,
and no store write while a latency is measured."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy import event
from sqlalchemy.engine import Engine

from nas.errors import UserError
from nas.search.campaign import run_campaign
from nas.search.heartbeat import HEARTBEAT
from nas.search.mirror import StoreSettings, TrialStores, fill_claimed_row
from nas.search.scoring import Scorer
from nas.search.storage import open_storage
from nas.search.workers import WORKER, _claim_row
from nas.tracking import Campaign


def asked_trial(seed: int = 0) -> optuna.trial.FrozenTrial:
    """A RUNNING trial with every kind of parameter and attribute, from an in-memory study."""
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed))
    trial = study.ask()
    trial.suggest_categorical("kind", ["tome", "evit", None])
    trial.suggest_int("depth", 1, 12)
    trial.suggest_float("ratio", 0.5, 4.0, log=True)
    trial.suggest_float("keep", 0.1, 0.9, step=0.1)
    trial.set_user_attr("arch_hash", "abc123")
    trial.set_user_attr("nested", {"a": [1, 2.5, None]})
    study._storage.set_trial_system_attr(trial._trial_id, "constraints", [0.5])
    return study._storage.get_trial(trial._trial_id)


def test_a_claimed_row_filled_in_holds_what_optunas_own_path_writes(tmp_path):
    """A worker on a shared study claims a trial's row first, then the writer fills it in: the row
    ends as Optuna's own ``create_new_trial(template)`` writes it (plus the claim's heartbeat)."""
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    ours = optuna.create_study(storage=storage, study_name="ours", directions=["maximize", "minimize"])
    theirs = optuna.create_study(storage=storage, study_name="theirs", directions=["maximize", "minimize"])
    for seed in range(3):
        template = asked_trial(seed)
        row = storage.create_new_trial(ours._study_id, _claim_row("abc123", 1234.5))
        fill_claimed_row(storage, row, template)
        fill_claimed_row(storage, row, template)  # a try made again changes nothing
        storage.create_new_trial(theirs._study_id, template_trial=template)
    for mine, reference in zip(ours.get_trials(), theirs.get_trials(), strict=True):
        assert mine.state == reference.state == TrialState.RUNNING
        for field in ("number", "params", "distributions", "user_attrs"):
            assert getattr(mine, field) == getattr(reference, field), field
        claimed = {k: v for k, v in mine.system_attrs.items() if k != WORKER}
        assert claimed == {**reference.system_attrs, HEARTBEAT: 1234.5}


def test_trials_stored_under_other_numbers_stop_the_campaign(tiny, tmp_path, sqlite_tracking_uri):
    """Another process writing the same study: the writer refuses instead of mixing trial numbers."""
    config = tiny.config(tmp_path, "twice", 2, tracking_uri=sqlite_tracking_uri)
    storage = open_storage(config.storage)
    study = optuna.create_study(storage=storage, study_name=config.name, directions=["maximize", "minimize"])
    parent = Campaign(config.tracking_uri, config.name).start_or_resume()
    settings = StoreSettings(storage, config.name, config.tracking_uri, config.name, parent, {})
    stores = TrialStores(settings, threading.Lock())
    storage.create_new_trial(study._study_id)  # the other process's trial 0
    with pytest.raises(UserError, match="trial 0 was stored as number 1: another process is running"):
        stores.open_trial(asked_trial(0), tiny.space.sample(0))


def test_no_store_write_while_a_latency_is_measured(tiny, tmp_path, sqlite_tracking_uri, monkeypatch):
    """Every SQL statement the writer process runs (Optuna's and MLflow's) falls outside every
    measurement (in the campaign)."""
    writes, measurements, campaign_pid = tmp_path / "writes.txt", [], os.getpid()

    def started(conn, *_):
        conn.info["vitnas.t0"] = time.monotonic()

    def ended(conn, *_):
        if os.getpid() != campaign_pid:  # the writer is another process: it reports through a file
            with open(writes, "a") as f:
                f.write(f"{conn.info.pop('vitnas.t0')} {time.monotonic()}\n")

    def timed_measure(self, *args, **kwargs):
        start = time.monotonic()
        result = original_measure(self, *args, **kwargs)
        measurements.append((start, time.monotonic()))
        return result

    original_measure = Scorer.measure
    monkeypatch.setattr(Scorer, "measure", timed_measure)
    event.listen(Engine, "before_cursor_execute", started)
    event.listen(Engine, "after_cursor_execute", ended)
    try:
        config = tiny.config(tmp_path, "quiet-measurements", 8, tracking_uri=sqlite_tracking_uri)
        run_campaign(config, tiny.space, tiny.scorer(config), progress=False)
    finally:
        event.remove(Engine, "before_cursor_execute", started)
        event.remove(Engine, "after_cursor_execute", ended)

    statements = [tuple(map(float, line.split())) for line in Path(writes).read_text().splitlines()]
    assert len(statements) > 16 * 3 and len(measurements) >= 4
    overlaps = [(j, m) for j in statements for m in measurements if j[0] < m[1] and m[0] < j[1]]
    assert overlaps == []
    tiny.check(config)
