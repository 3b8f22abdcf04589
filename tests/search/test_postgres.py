"""A team's set-up for real: one PostgreSQL server (Optuna study, latency cache, MLflow's backend store),
one ``mlflow server`` serving artifacts, and several ``vitnas search`` workers on one campaign; and the
faults such a set-up meets: a worker killed, the database restarted, the tracking server down for a while,
a wrong port or password.

The servers are real, on 127.0.0.1 (``tests/conftest.py``: ``postgres``, ``pg_mlflow_server``); the
campaigns are the tiny space's (``tests/search/conftest.py``), run through the real CLI. Nothing here
asserts on time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from nas.cli import main
from nas.search.campaign import INTERRUPTED, CampaignConfig
from nas.search.heartbeat import HEARTBEAT
from nas.search.mirror import counts_toward_budget
from nas.search.workers import WORKER, WORKERS

CLI = "import sys; from nas.cli import main; sys.exit(main(sys.argv[1:]))"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def team_config(
    tiny, postgres, tmp_path: Path, name: str, trials: int, tracking_uri: str, **kw
) -> CampaignConfig:
    """A campaign whose study and latency cache are in a database of its own on the session's server."""
    url = postgres.database(name.replace("-", "_"))
    return tiny.config(
        tmp_path / "ws", name, trials, storage=url, cache_url=url, tracking_uri=tracking_uri, **kw
    )


def argv_of(tiny, config: CampaignConfig, heartbeat_s: float | None = None) -> list[str]:
    argv = [*tiny.search_argv(config), "--storage", config.storage, "--cache-url", config.cache_url]
    return argv + (["--heartbeat-s", str(heartbeat_s)] if heartbeat_s else [])


def start_worker(argv: list[str], log: Path) -> subprocess.Popen:
    """``vitnas search ...`` in a process group of its own (its writer process dies with it)."""
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-c", CLI, *argv], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip


def finish(workers: list[subprocess.Popen], logs: list[Path], timeout_s: float = 900) -> None:
    """Every worker ends with exit code 0 (a killed one is not in the list)."""
    try:
        for proc, log in zip(workers, logs, strict=True):
            assert proc.wait(timeout=timeout_s) == 0, log.read_text()[-3000:]
    finally:
        for proc in workers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


_STORAGES: dict[str, optuna.storages.RDBStorage] = {}


def storage_of(config: CampaignConfig) -> optuna.storages.RDBStorage:
    """One storage per URL: a storage opened per poll would leave its pool's connections open until
    collected, and the server has a hundred to give."""
    if config.storage not in _STORAGES:
        _STORAGES[config.storage] = optuna.storages.RDBStorage(config.storage)
    return _STORAGES[config.storage]


def trials_of(config: CampaignConfig) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name=config.name, storage=storage_of(config)).get_trials()
    except KeyError:  # the study is not created yet
        return []


def wait_for(condition, what: str, procs: list[subprocess.Popen], timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if any(p.poll() not in (None, 0) for p in procs):
            pytest.fail(f"a worker failed while waiting for {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def check_team_campaign(tiny, config: CampaignConfig):
    """The usual checks (Optuna and MLflow one to one, Pareto tags exact by brute force), and exactly
    ``trials`` trials counted: no overshoot, none counted twice."""
    records = tiny.check(config)
    assert sum(map(counts_toward_budget, records.trials)) == config.trials
    assert [r.trial_number for r in records.runs if r.status == "FINISHED"] == [
        t.number for t in records.trials if t.state == TrialState.COMPLETE
    ]
    return records


# -- before any trial runs -------------------------------------------------------------------------
@pytest.mark.parametrize("store", ["storage port", "storage password", "cache password", "tracking port",
                                   "tracking database password"])  # fmt: skip
def test_a_refused_connection_is_one_line_before_any_trial(tiny, postgres, tmp_path, capsys, store):
    url = postgres.database(f"refused_{store.replace(' ', '_')}")
    closed = postgres.url("postgres", port=_free_port())
    bad = {
        "storage port": ("--storage", closed),
        "storage password": ("--storage", postgres.url(url.rsplit("/", 1)[1], password="wrong")),
        "cache password": ("--cache-url", postgres.url("postgres", password="wrong")),
        "tracking port": ("--tracking-uri", f"http://127.0.0.1:{_free_port()}"),
        "tracking database password": ("--tracking-uri", postgres.url("postgres", password="wrong")),
    }[store]
    config = tiny.config(tmp_path, "refused", 2, storage=url, cache_url=url)
    argv = argv_of(tiny, config)
    flag = argv.index(bad[0])
    argv[flag + 1] = bad[1]
    capsys.readouterr()
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("vitnas: error: "), err
    assert "wrong" not in err and "vitnas-test" not in err  # passwords are never printed
    reason = "password authentication failed" if "password" in store else "onnect"
    assert reason in err, err
    assert trials_of(config) == []  # nothing ran


def test_a_server_that_is_away_is_waited_for_a_file_that_fails_is_not(postgres, tmp_path, monkeypatch):
    """What ``nas.retry`` waits for, on real errors: a database or tracking server refusing connections;
    not sqlite's errors, which do not go away by themselves."""
    import sqlalchemy
    from mlflow import MlflowClient

    from nas.retry import is_transient

    def error_of(call) -> BaseException:
        try:
            call()
        except Exception as err:  # noqa: BLE001 - the error is what is tested
            return err
        raise AssertionError("no error")

    closed = postgres.url("postgres", port=_free_port())
    assert is_transient(error_of(lambda: sqlalchemy.create_engine(closed).connect()))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries take minutes
    assert is_transient(
        error_of(lambda: MlflowClient(f"http://127.0.0.1:{_free_port()}").search_experiments())
    )
    db = tmp_path / "not-a.db"
    db.write_bytes(b"not a database, but longer than sqlite's header" * 4)
    with sqlalchemy.create_engine(f"sqlite:///{db}").connect() as conn:
        err = error_of(lambda: conn.execute(sqlalchemy.text("select * from t")))
    assert "file is not a database" in str(err) and not is_transient(err)
    assert not is_transient(error_of(lambda: 1 / 0))


@pytest.mark.parametrize("where", ["claimed", "evaluated"])
def test_ctrl_c_on_a_worker_fails_its_trial_as_interrupted(tiny, postgres, tmp_path, sqlite_tracking_uri,
                                                           monkeypatch, where):  # fmt: skip
    """Ctrl-C in a worker's second trial, right after it was claimed in the study, after its records were
    queued, after it was scored: the trial ends failed as interrupted, everywhere; resuming completes."""
    from nas.search import campaign as campaign_module
    from nas.search.campaign import run_campaign
    from nas.search.mirror import StudyMirror

    url = postgres.database(f"ctrl_c_{where}")
    config = tiny.config(tmp_path, f"team-ctrl-c-{where}", 2, storage=url, cache_url=url,
                         tracking_uri=sqlite_tracking_uri)  # fmt: skip
    owner, name = {"claimed": (StudyMirror, "open"), "opened": (StudyMirror, "open"),
                   "evaluated": (campaign_module, "evaluate")}[where]  # fmt: skip
    original, calls = getattr(owner, name), []

    def interrupting(*args, **kwargs):
        calls.append(name)
        if where == "claimed" and len(calls) == 2:
            raise KeyboardInterrupt  # the row is claimed, the writer knows nothing of it
        result = original(*args, **kwargs)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(owner, name, interrupting)
    with pytest.raises(KeyboardInterrupt):
        run_campaign(config, tiny.space, tiny.scorer(config), progress=False)
    records = tiny.check(config)
    assert records.parent.info.status == "KILLED"
    assert [t.state for t in records.trials] == [TrialState.COMPLETE, TrialState.FAIL]
    assert records.trials[1].user_attrs[INTERRUPTED] is True

    monkeypatch.setattr(owner, name, original)
    run_campaign(config, tiny.space, tiny.scorer(config), progress=False)
    check_team_campaign(tiny, config)


# -- the whole flow on the team's servers ----------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_every_command_works_on_postgres_and_an_mlflow_server(
    tiny, postgres, pg_mlflow_server, tmp_path, capsys
):
    """train-supernet logs to the server; search, resume, pareto, export, train and the dashboard work
    with the study and cache on PostgreSQL and MLflow behind the server (artifacts proxied)."""
    uri = pg_mlflow_server.url
    assert main(["train-supernet", "--space", tiny.space.source, "--epochs", "1", "--batch-size", "128",
                 "--workspace", str(tmp_path / "ws"), "--tracking-uri", uri, "--quiet"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    checkpoint = out.split("checkpoint: ")[1].split()[0]
    config = team_config(tiny, postgres, tmp_path, "team-e2e", 3, uri, latency_budget_ms=5.0)
    config = CampaignConfig(**{**config.__dict__, "supernet": checkpoint})

    assert main(argv_of(tiny, config)) == 0
    check_team_campaign(tiny, config)
    more = CampaignConfig(**{**config.__dict__, "trials": 5})  # resumed, with a larger budget
    assert main(argv_of(tiny, more)) == 0
    records = check_team_campaign(tiny, more)
    assert len(records.runs) == 5

    capsys.readouterr()
    assert main(["pareto", "--campaign", config.name, "--tracking-uri", uri, "--json"]) == 0
    front = json.loads(capsys.readouterr().out)
    assert {r["trial_number"] for r in front} == {
        r.trial_number for r in records.runs if r.tags["pareto"] == "true"
    }
    trial = front[0]["trial_number"]
    out_dir = tmp_path / "exported"
    assert main(["export", "--campaign", config.name, "--trial", str(trial), "--out", str(out_dir),
                 "--tracking-uri", uri]) == 0  # fmt: skip
    assert main(["train", str(out_dir / "train.yaml"), "--epochs", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    train_run = printed.split("MLflow run ")[1].split()[0]
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    assert client.get_run(train_run).info.status == "FINISHED"
    parent = client.get_run(records.parent.info.run_id)
    assert {"pareto.html", "pareto.csv", "pareto.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }

    dashboard = subprocess.Popen([sys.executable, "-m", "nas.cli", "dashboard", "--tracking-uri", uri, "--port", "0"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        first = dashboard.stdout.readline()
        assert first.startswith("vitnas dashboard: http://127.0.0.1:"), first
        with urllib.request.urlopen(f"{first.split()[2].rstrip('/')}/api/campaigns", timeout=60) as response:
            listed = json.loads(response.read())
        row = next(c for c in listed["campaigns"] if c["name"] == config.name)
        assert row["trials"] == len(records.runs)
    finally:
        dashboard.kill()
        dashboard.wait()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_ray_campaign_logs_to_the_server_and_keeps_its_study_on_postgres(
    tiny, postgres, pg_mlflow_server, tmp_path
):
    import ray

    from nas.search.ray_backend import RayOptions, run_ray_campaign

    config = team_config(tiny, postgres, tmp_path, "team-ray", 4, pg_mlflow_server.url)
    try:
        result = run_ray_campaign(
            config, tiny.space, tiny.scorer(config), RayOptions(max_concurrent=2), progress=False
        )
    finally:
        ray.shutdown()
    assert result.finished + result.failed == 4
    records = check_team_campaign(tiny, config)
    assert all(r.tags.get("backend") == "ray" for r in records.runs)


# -- several workers on one campaign ---------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_three_workers_run_one_campaign(tiny, postgres, pg_mlflow_server, tmp_path):
    """Three processes, 24 trials: exactly 24, each once, in Optuna and MLflow alike; all three
    worked; no architecture was scored by two workers at the same time."""
    config = team_config(
        tiny, postgres, tmp_path, "team-three", 24, pg_mlflow_server.url, latency_budget_ms=5.0
    )
    logs = [tmp_path / f"worker-{i}.log" for i in range(3)]
    workers = [start_worker(argv_of(tiny, config), log) for log in logs]
    finish(workers, logs)
    records = check_team_campaign(tiny, config)
    assert len(records.trials) == 24 and not any(t.user_attrs.get(INTERRUPTED) for t in records.trials)
    pids = {t.system_attrs[WORKER].split()[-1] for t in records.trials}
    assert pids == {str(w.pid) for w in workers}
    storage = storage_of(config)
    assert storage.get_study_system_attrs(storage.get_study_id_from_name(config.name))[WORKERS] == 3
    spans: dict[str, list] = {}
    for t in records.trials:
        spans.setdefault(t.user_attrs["arch_hash"], []).append((t.datetime_start, t.datetime_complete))
    for same in spans.values():
        same.sort()
        assert all(a[1] <= b[0] for a, b in zip(same, same[1:])), "one architecture scored twice at once"


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_killed_worker_s_trial_is_failed_and_the_others_finish(tiny, postgres, pg_mlflow_server, tmp_path):
    """SIGKILL to one of three workers while it scores: its trial goes stale (no heartbeat), another
    worker fails it as interrupted (in MLflow too) and runs one more: still exactly 24."""
    config = team_config(tiny, postgres, tmp_path, "team-kill", 24, pg_mlflow_server.url)
    logs = [tmp_path / f"worker-{i}.log" for i in range(3)]
    workers = [start_worker(argv_of(tiny, config, heartbeat_s=1), log) for log in logs]
    victim = workers[0]

    def victim_is_scoring() -> bool:
        done = sum(map(counts_toward_budget, trials := trials_of(config)))
        mine = [t for t in trials if t.state == TrialState.RUNNING
                and t.system_attrs.get(WORKER, "").endswith(f" {victim.pid}")]  # fmt: skip
        return done >= 3 and bool(mine)

    wait_for(victim_is_scoring, "the first worker to score a trial", workers)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    finish(workers[1:], logs[1:])
    records = check_team_campaign(tiny, config)
    interrupted = [t for t in records.trials if t.user_attrs.get(INTERRUPTED)]
    assert interrupted and all(t.system_attrs[WORKER].endswith(f" {victim.pid}") for t in interrupted)
    assert all(t.state == TrialState.FAIL and HEARTBEAT in t.system_attrs for t in interrupted)
    assert len(records.trials) == 24 + len(interrupted)


# -- the servers go away mid-campaign ---------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_postgres_restart_mid_campaign_loses_nothing(tiny, postgres, pg_mlflow_server, tmp_path):
    """PostgreSQL stopped and started again (down a few seconds) while two workers run, the MLflow
    server's store with it: their claims, writes, heartbeats and cache lookups wait for it, and every
    trial is recorded once."""
    config = team_config(tiny, postgres, tmp_path, "team-pg-restart", 16, pg_mlflow_server.url)
    logs = [tmp_path / f"worker-{i}.log" for i in range(2)]
    workers = [start_worker(argv_of(tiny, config, heartbeat_s=5), log) for log in logs]
    wait_for(lambda: sum(map(counts_toward_budget, trials_of(config))) >= 4, "4 trials", workers)
    postgres.restart(down_s=5)
    finish(workers, logs)
    records = check_team_campaign(tiny, config)
    assert not any(t.user_attrs.get(INTERRUPTED) for t in records.trials) and len(records.trials) == 16
    told = "".join(log.read_text() for log in logs)
    assert "database does not answer" in told and "database answers again" in told  # it was waited for


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_mlflow_server_down_mid_campaign_queues_the_records(
    tiny, postgres, start_mlflow_server, tmp_path
):
    """The tracking server stopped while a worker runs: trials go on being scored and claimed, their
    records queue; once the server is back (same port) they are written, and the campaign ends whole."""
    server = start_mlflow_server(postgres.database("mlflow_down").replace("+psycopg", ""))
    config = team_config(tiny, postgres, tmp_path, "team-mlflow-down", 16, server.url)
    log = tmp_path / "worker.log"
    worker = start_worker(argv_of(tiny, config), log)
    wait_for(lambda: sum(map(counts_toward_budget, trials_of(config))) >= 3, "3 trials", [worker])
    server.stop()
    claimed = len(trials_of(config))
    wait_for(lambda: len(trials_of(config)) >= claimed + 3, "3 trials scored while MLflow is down", [worker])
    server.start()
    finish([worker], [log])
    records = check_team_campaign(tiny, config)
    assert len(records.trials) == 16 and len(records.runs) == 16
