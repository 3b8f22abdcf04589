"""Interrupted campaigns: killed (SIGKILL) or stopped with Ctrl-C (SIGINT) through the real CLI, then
resumed by running the same command again; and a campaign name reused for another space or target.

The CLI runs in a process group of its own and signals go to the whole group, as a terminal sends
Ctrl-C: the campaign and its record-writer process alike."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from nas.cli import main
from nas.search import campaign as campaign_module
from nas.search.campaign import INTERRUPTED, run_campaign
from nas.search.mirror import StudyMirror

CLI_WITH_CTRL_C = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from nas.cli import main; sys.exit(main(sys.argv[1:]))"
)
TRIALS = 10  # enough that the poll below meets a trial running in the store


def start(tiny, config, log: Path) -> subprocess.Popen:
    """``vitnas search ...`` in a process group of its own, output to ``log``; Ctrl-C handled as in a
    terminal even when this test runs where SIGINT is ignored (a background job of a script)."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-c", CLI_WITH_CTRL_C, *tiny.search_argv(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def trial_states(config) -> list[tuple[int, str, bool]]:
    """(number, state, has an MLflow run id) per trial, read with plain SQL: no Optuna storage set-up
    racing the CLI's, and a short lock timeout (the CLI may be stopped while it holds the lock)."""
    db = Path(config.storage.removeprefix("sqlite:///"))
    if not db.is_file():
        return []
    query = (
        "select t.number, t.state, exists(select 1 from trial_user_attributes a "
        "where a.trial_id = t.trial_id and a.key = 'mlflow_run_id') from trials t order by t.number"
    )
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=1)) as con:
            return con.execute(query).fetchall()
    except sqlite3.OperationalError:  # tables not created yet, or locked
        return []


def interrupt_mid_trial(proc: subprocess.Popen, config, sig: int, log: Path, timeout_s: float = 300) -> int:
    """Send ``sig`` to the CLI's process group once two trials are COMPLETE in the study and another
    is RUNNING there with its MLflow run; returns that trial's number.

    The group is stopped (SIGSTOP) while the study is read, so that what is read is what the signal
    meets; if no trial is running, it continues and the poll goes on. The campaign itself may be
    a trial ahead of its stores (they are written in the background).
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"vitnas search exited ({proc.returncode}) before it could be interrupted:\n{log.read_text()}"
            )
        states = trial_states(config)
        if sum(s == "COMPLETE" for _, s, _ in states) >= 2 and any(s == "RUNNING" for _, s, _ in states):
            os.killpg(proc.pid, signal.SIGSTOP)
            running = [n for n, s, logged in trial_states(config) if s == "RUNNING" and logged]
            if running:
                os.killpg(proc.pid, sig)
                os.killpg(proc.pid, signal.SIGCONT)
                return running[0]
            os.killpg(proc.pid, signal.SIGCONT)
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"no trial to interrupt within {timeout_s} s:\n{log.read_text()}")


def resume(tiny, config):
    """The same command again, to the end; then the campaign's records, checked."""
    done = subprocess.run(
        [sys.executable, "-m", "nas.cli", *tiny.search_argv(config)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    records = tiny.check(config)
    assert sum(t.state == TrialState.COMPLETE for t in records.trials) == config.trials
    assert [r.trial_number for r in records.runs] == [t.number for t in records.trials]
    assert records.parent.info.status == "FINISHED"
    return records


@pytest.fixture
def campaign(tiny, tmp_path, sqlite_tracking_uri):
    return tiny.config(tmp_path, "resumable", TRIALS, tracking_uri=sqlite_tracking_uri, latency_budget_ms=1.0)


def test_killed_campaign_resumes_without_losing_or_repeating_trials(tiny, campaign, tmp_path):
    log = tmp_path / "search.log"
    proc = start(tiny, campaign, log)
    killed = interrupt_mid_trial(proc, campaign, signal.SIGKILL, log)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    before = {n: s for n, s, _ in trial_states(campaign)}
    assert before[killed] == "RUNNING"

    records = resume(tiny, campaign)
    trial = records.trials[killed]
    assert trial.state == TrialState.FAIL and trial.user_attrs[INTERRUPTED] is True
    assert records.runs[killed].status == "FAILED"
    # everything finished before the kill is kept as it was; the rest ran after
    assert all(records.trials[n].state == TrialState.COMPLETE for n, s in before.items() if s == "COMPLETE")
    assert len(records.trials) == TRIALS + 1


def test_ctrl_c_stops_cleanly_and_resumes(tiny, campaign, tmp_path):
    log = tmp_path / "search.log"
    proc = start(tiny, campaign, log)
    running = interrupt_mid_trial(proc, campaign, signal.SIGINT, log)
    assert proc.wait(timeout=120) == 130, log.read_text()
    assert log.read_text().strip().splitlines()[-1] == "vitnas: interrupted"

    records = tiny.check(campaign)  # nothing left RUNNING, the front over the finished trials tagged
    assert records.parent.info.status == "KILLED"
    # what the campaign had told was written; the trial it was in, if any, failed as interrupted
    interrupted = [t.number for t in records.trials if t.user_attrs.get(INTERRUPTED)]
    assert len(interrupted) <= 1 and all(n >= running for n in interrupted)
    assert all(t.state == TrialState.COMPLETE for t in records.trials if t.number not in interrupted)
    assert sum(r.tags.get("pareto") == "true" for r in records.runs) >= 1

    records = resume(tiny, campaign)
    assert len(records.trials) == TRIALS + len(interrupted)


@pytest.mark.parametrize("where", ["open", "evaluate", "tell", "close"])
def test_ctrl_c_anywhere_in_a_trial_leaves_consistent_records(
    tiny, tmp_path, sqlite_tracking_uri, monkeypatch, where
):
    """Ctrl-C in the second trial right after its records are queued, it is scored, it is told to
    the in-memory study, or its end is queued."""
    config = tiny.config(tmp_path, f"ctrl-c-{where}", 2, tracking_uri=sqlite_tracking_uri)
    owner = {"open": StudyMirror, "close": StudyMirror, "evaluate": campaign_module, "tell": optuna.Study}[where]
    original, calls = getattr(owner, where), []

    def then_interrupt(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(where)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(owner, where, then_interrupt)
    scorer = tiny.scorer(config)
    with pytest.raises(KeyboardInterrupt):
        run_campaign(config, tiny.space, scorer, progress=False)
    records = tiny.check(config)
    assert records.parent.info.status == "KILLED"
    second = records.trials[1]
    if where == "close":  # told and queued: written in full before the campaign stopped
        assert second.state == TrialState.COMPLETE
    else:
        assert second.state == TrialState.FAIL and second.user_attrs[INTERRUPTED] is True

    monkeypatch.setattr(owner, where, original)
    run_campaign(config, tiny.space, scorer, progress=False)
    records = tiny.check(config)
    assert sum(t.state == TrialState.COMPLETE for t in records.trials) == 2


def test_campaign_name_is_bound_to_its_space_and_target(tiny, tmp_path, sqlite_tracking_uri, capsys):
    config = tiny.config(tmp_path, "bound", 2, tracking_uri=sqlite_tracking_uri)
    run_campaign(config, tiny.space, tiny.scorer(config), progress=False)
    before = tiny.check(config)

    renamed = tmp_path / "renamed.yaml"  # same choices (so the same checkpoint fits), another space
    renamed.write_text(yaml.safe_dump({**yaml.safe_load(open(tiny.space.source)), "name": "tiny-renamed"}))
    argv = tiny.search_argv(config)
    cases = [
        ("space was 'tiny', now 'tiny-renamed'", [*argv, "--space", str(renamed)]),
        ("target was 'cpu:threads=1,", [*argv, "--target", "cpu:threads=2,batch=1"]),
    ]
    for reason, args in cases:
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("vitnas: error: campaign 'bound' exists"), err
        assert reason in err

    after = tiny.check(config)  # nothing was added or changed
    assert [t.number for t in after.trials] == [t.number for t in before.trials]
    assert after.parent.data.params == before.parent.data.params
