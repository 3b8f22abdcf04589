"""One process per campaign: a second `vitnas search` on a running campaign stops at once, naming
the holder, and the first goes on untouched; on a new workspace (where both used to race to create
the stores) and on an existing campaign. Also the lock itself: reentrant, released on exit, never
left stale by a killed holder, and the PostgreSQL advisory lock (shared by local workers)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from nas.cli import main
from nas.errors import UserError
from nas.search.lock import campaign_lock, lock_path
from nas.tracking import Campaign

CLI = "import sys; from nas.cli import main; sys.exit(main(sys.argv[1:]))"


def wait_for_lock(path: Path, proc: subprocess.Popen, log: Path, timeout_s: float = 600) -> dict:
    """The lock file's record once ``proc`` holds the lock."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the first search exited ({proc.returncode}) before it held the lock:\n{log.read_text()}")
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(path.read_text() or "null")
            if record and record["pid"] == proc.pid:
                return record
        time.sleep(0.05)
    pytest.fail(f"the first search did not take the lock in {timeout_s} s:\n{log.read_text()}")


def second_search_is_refused(tiny, config, log: Path) -> None:
    """Start `vitnas search`; once it holds the lock, freeze it (SIGSTOP to its group: it cannot
    finish meanwhile), run the identical command, check its refusal, let the first go on; the
    first ends normally with every trial."""
    with open(log, "ab") as out:
        first = subprocess.Popen(
            [sys.executable, "-c", CLI, *tiny.search_argv(config)], stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        record = wait_for_lock(lock_path(config.name, config.storage, config.workspace), first, log)
        os.killpg(first.pid, signal.SIGSTOP)
        try:
            second = subprocess.run(
                [sys.executable, "-c", CLI, *tiny.search_argv(config)], capture_output=True, text=True, timeout=600
            )
        finally:
            os.killpg(first.pid, signal.SIGCONT)
        assert second.returncode == 2, second.stdout + second.stderr
        assert second.stdout == ""
        lines = second.stderr.splitlines()
        assert len(lines) == 1, second.stderr
        assert re.fullmatch(
            rf"vitnas: error: campaign '{config.name}' is being run by pid {first.pid} on "
            rf"{re.escape(socket.gethostname())} since {re.escape(record['since'])}: .+",
            lines[0],
        ), lines[0]
        assert first.wait(timeout=600) == 0, log.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
    records = tiny.check(config)  # one parent, nothing RUNNING, Optuna and MLflow agree
    assert [t.state for t in records.trials] == [TrialState.COMPLETE] * config.trials
    assert [r.status for r in records.runs] == ["FINISHED"] * config.trials
    assert records.parent.info.status == "FINISHED"


def test_a_second_search_on_a_running_campaign_stops_at_once(tiny, tmp_path, capsys):
    workspace = tmp_path / "new-workspace"  # no stores yet: the second used to die in MLflow's migrations
    config = tiny.config(workspace, "locked", 2, latency_budget_ms=1.0)
    assert not (workspace / "mlflow.db").exists()
    second_search_is_refused(tiny, config, tmp_path / "first.log")
    # the same campaign, existing now, extended: both used to write it (trial numbers clashed)
    second_search_is_refused(tiny, tiny.config(workspace, "locked", 3, latency_budget_ms=1.0), tmp_path / "again.log")

    # `vitnas pareto` stars the trial the search tagged best_under_budget, and says what the star is
    capsys.readouterr()
    assert main(["pareto", "--campaign", "locked", "--workspace", str(workspace)]) == 0
    out = capsys.readouterr().out.splitlines()
    starred = {int(m[1]) for line in out if (m := re.match(r"\*\s+(\d+)\s", line))}
    tagged = {r.trial_number for r in Campaign(config.tracking_uri, "locked").trial_runs()
              if r.tags["best_under_budget"] == "true"}  # fmt: skip
    assert starred == tagged
    assert any("latency budget of 1 ms" in line for line in out[-2:])  # before the ranking-trust line


# -- the lock itself -------------------------------------------------------------------------------
TRY_LOCK = textwrap.dedent(
    """
    import sys, time
    from nas.errors import UserError
    from nas.search.lock import campaign_lock
    name, storage, workspace, hold = sys.argv[1:]
    try:
        with campaign_lock(name, storage, workspace):
            print("locked", flush=True)
            time.sleep(float(hold))
    except UserError as err:
        print(err)
        sys.exit(3)
    """
)


def try_lock(name: str, storage: str, workspace: Path, hold_s: float = 0) -> subprocess.CompletedProcess:
    """Take the lock in another process (and hold it ``hold_s``)."""
    argv = [sys.executable, "-c", TRY_LOCK, name, storage, str(workspace), str(hold_s)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


def test_the_lock_names_its_holder_and_is_released(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    name = "odd/name 1"
    with campaign_lock(name, storage, tmp_path):
        path = lock_path(name, storage, tmp_path)
        assert path.parent == tmp_path / "locks" and path.name.startswith("odd_name_1-")
        record = json.loads(path.read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with campaign_lock(name, storage, tmp_path):  # reentrant in the process that holds it
            pass
        refused = try_lock(name, storage, tmp_path)
        assert refused.returncode == 3, refused.stderr
        assert refused.stdout.startswith(
            f"campaign {name!r} is being run by pid {os.getpid()} on {socket.gethostname()} since {record['since']}"
        )
        assert try_lock("another", storage, tmp_path).returncode == 0  # one lock per campaign
    assert try_lock(name, storage, tmp_path).returncode == 0  # released at the end of the block

    with pytest.raises(KeyboardInterrupt), campaign_lock(name, storage, tmp_path):
        raise KeyboardInterrupt
    assert try_lock(name, storage, tmp_path).returncode == 0  # and when the block raises


def _refused_while_another_process_holds(name: str, storage: str, folder) -> None:
    """A process takes the lock; while it holds it, ours is refused naming its pid; then it is killed."""
    argv = [sys.executable, "-c", TRY_LOCK, name, storage, str(folder), "600"]
    holder = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"by pid {holder.pid} on "):
            with campaign_lock(name, storage, folder):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    _refused_while_another_process_holds("c", storage, tmp_path)
    with campaign_lock("c", storage, tmp_path):  # the kernel released it with the process
        pass


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_both_backends_take_the_lock_before_any_store_exists(tiny, tmp_path, backend):
    config = tiny.config(tmp_path, f"held-{backend}", 1)
    argv = [sys.executable, "-c", TRY_LOCK, config.name, config.storage, config.workspace, "600"]
    holder = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"campaign 'held-{backend}' is being run by pid {holder.pid} on "):
            if backend == "ray":
                from nas.search.ray_backend import RayOptions, run_ray_campaign

                run_ray_campaign(config, tiny.space, tiny.scorer(config), RayOptions(), progress=False)
            else:
                from nas.search.campaign import run_campaign

                run_campaign(config, tiny.space, tiny.scorer(config), progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "optuna.db").exists()


def test_the_lock_sits_beside_a_sqlite_study_elsewhere(tmp_path):
    """Two workspaces on one study file share its lock."""
    storage = f"sqlite:///{tmp_path / 'shared' / 'optuna.db'}"
    assert lock_path("c", storage, tmp_path / "ws1") == lock_path("c", storage, tmp_path / "ws2")
    assert lock_path("c", storage, tmp_path / "ws1").parent == tmp_path / "shared" / "locks"
    other = "postgresql+psycopg://u@h/db"
    assert lock_path("c", other, tmp_path / "ws1").parent == tmp_path / "ws1" / "locks"


def test_an_unwritable_lock_folder_is_one_line(tmp_path):
    (tmp_path / "locks").write_text("a file where the lock folder goes")
    with pytest.raises(UserError, match="cannot create the campaign's lock file"):
        with campaign_lock("c", f"sqlite:///{tmp_path / 'optuna.db'}", tmp_path):
            pass


# -- PostgreSQL ------------------------------------------------------------------------------------
TRY_SHARED_LOCK = TRY_LOCK.replace("campaign_lock(name, storage, workspace)", "campaign_lock(name, storage, workspace, shared=True)")


def test_the_postgres_advisory_lock(postgres, tmp_path):
    """Taken alone (a Ray driver) it keeps everyone out; shared (local workers) it keeps out only one
    that takes it alone."""
    url = postgres.database("lock_test")
    with campaign_lock("pg-campaign", url, tmp_path):
        refused = try_lock("pg-campaign", url, tmp_path)
        assert refused.returncode == 3, refused.stderr
        assert refused.stdout.startswith(
            f"campaign 'pg-campaign' is being run by pid {os.getpid()} on {socket.gethostname()[:30]}"
        ), refused.stdout
        shared = subprocess.run([sys.executable, "-c", TRY_SHARED_LOCK, "pg-campaign", url, str(tmp_path), "0"],
                                capture_output=True, text=True, timeout=300)  # fmt: skip
        assert shared.returncode == 3 and "its local workers and a Ray driver cannot run it at once" in shared.stdout
        assert try_lock("another", url, tmp_path).returncode == 0
        assert not (tmp_path / "locks").exists()  # a server store needs no file
    assert try_lock("pg-campaign", url, tmp_path).returncode == 0

    with campaign_lock("pg-campaign", url, tmp_path, shared=True):
        again = subprocess.run([sys.executable, "-c", TRY_SHARED_LOCK, "pg-campaign", url, str(tmp_path), "0"],
                               capture_output=True, text=True, timeout=300)  # fmt: skip
        assert again.returncode == 0, again.stdout + again.stderr  # another worker is welcome
        alone = try_lock("pg-campaign", url, tmp_path)
        assert alone.returncode == 3 and "a Ray campaign runs alone" in alone.stdout, alone.stdout

    _refused_while_another_process_holds("pg-campaign", url, tmp_path)
    deadline = time.monotonic() + 60  # the server ends the killed client's session when it notices
    while True:
        try:
            with campaign_lock("pg-campaign", url, tmp_path):
                break
        except UserError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
