"""Shared fixtures: real MLflow stores, a sqlite file per test and one `mlflow server` per session."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory) -> Path:
    """An empty MLflow sqlite database, migrated once: copies of it spare each store ~3 s of migrations."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def sqlite_tracking_uri(tmp_path, mlflow_db_template) -> str:
    """A fresh sqlite store in the test's workspace (``tmp_path``), as vitnas would make it there."""
    from nas.tracking import default_tracking_uri

    shutil.copy(mlflow_db_template, tmp_path / "mlflow.db")
    return default_tracking_uri(tmp_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"mlflow server did not answer {url}/health in {timeout_s} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, mlflow_db_template) -> str:
    """URL of a real ``mlflow server`` (sqlite backend, artifacts proxied to a folder), for the session.

    Job execution is off: its huey worker processes double the start-up time and are not needed.
    The server runs in its own process group, so teardown stops its uvicorn worker too.
    """
    root = tmp_path_factory.mktemp("mlflow-server")
    shutil.copy(mlflow_db_template, root / "mlflow.db")
    url = f"http://127.0.0.1:{_free_port()}"
    log_path = root / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1],
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
            cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
    try:
        _wait_until_up(url, proc, log_path)
        yield url
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, then SIGKILL to whatever of it is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module (``pytest.mark.usefixtures("one_thread")``): models this small
    gain nothing from a second thread, and on a shared machine its spin-waiting costs more than the work."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- PostgreSQL ------------------------------------------------------------------------------------
#: Set (to 1) where PostgreSQL must be tested (CI): a missing server is then a failure, not a skip.
REQUIRE_POSTGRES = "VITNAS_REQUIRE_POSTGRES"
PG_PASSWORD = "vitnas-test"


def _postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server programs: on PATH, or where Debian installs them."""
    found = shutil.which("postgres")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3]))
    return versions[-1].parent if versions else None


def _postgres_missing() -> str | None:
    if _postgres_bin() is None:
        return "no PostgreSQL server found (no `postgres` on PATH or in /usr/lib/postgresql/*/bin)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'vitnas[postgres]')"
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root (the server refuses) and there is no postgres user to run it as"
    return None


class Postgres:
    """A throw-away PostgreSQL server on 127.0.0.1 (run as the ``postgres`` user when the tests run as
    root), with password authentication over TCP, as a team's server has."""

    def __init__(self, folder: Path):
        self.bin, self.folder, self.data = _postgres_bin(), folder, folder / "data"
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.port = _free_port()
        (folder / "pw").write_text(PG_PASSWORD)
        if self.as_user:
            for path in (folder, folder / "pw"):
                shutil.chown(path, "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth-local=trust",
                  "--auth-host=scram-sha-256", f"--pwfile={folder / 'pw'}")  # fmt: skip
        self.start()

    def _run(self, program: str, *args: str) -> None:
        done = subprocess.run([*self.as_user, str(self.bin / program), *args], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{program} {' '.join(args)} failed:\n{done.stdout}{done.stderr}")

    def _ctl(self, *args: str) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder}"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.folder / "log"), "-w", *args)

    def start(self) -> None:
        self._ctl("start")

    def restart(self, down_s: float = 0.0) -> None:
        """Stopped (``pg_ctl stop -m fast``: every session is ended), left down ``down_s`` seconds, started
        again; the server is back when this returns."""
        self.stop("fast")
        time.sleep(down_s)
        self.start()

    def stop(self, mode: str = "immediate") -> None:
        self._ctl("-m", mode, "stop")

    def url(self, database: str = "postgres", password: str = PG_PASSWORD, port: int | None = None) -> str:
        return f"postgresql+psycopg://postgres:{password}@127.0.0.1:{port or self.port}/{database}"

    def database(self, name: str) -> str:
        """A new, empty database; its URL."""
        import psycopg

        with psycopg.connect(self.url().replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(f'create database "{name}"')
        return self.url(name)


@pytest.fixture(scope="session")
def postgres() -> Postgres:
    """The session's PostgreSQL server: skipped where none can be found, unless VITNAS_REQUIRE_POSTGRES
    is set (CI), where that is a failure."""
    missing = _postgres_missing()
    if missing:
        if os.environ.get(REQUIRE_POSTGRES, "") not in ("", "0"):
            pytest.fail(f"{REQUIRE_POSTGRES} is set, but {missing}")
        pytest.skip(missing)
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="vitnas-pg-"))  # not under pytest's root-only tmp folders
    server = Postgres(folder)
    try:
        yield server
    finally:
        with contextlib.suppress(RuntimeError):
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a backend store and proxied artifacts; ``stop`` and
    ``start`` keep its port, as a restarted team server does."""

    def __init__(self, backend_uri: str, folder: Path):
        self.backend_uri, self.folder = backend_uri, folder
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log_path = self.folder / "server.log"
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1],
                 "--backend-store-uri", self.backend_uri, "--artifacts-destination", str(self.folder / "artifacts"),
                 "--workers", "1"],
                cwd=self.folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            )  # fmt: skip
        _wait_until_up(self.url, self.proc, log_path)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None


@pytest.fixture(scope="session")
def pg_mlflow_server(postgres, tmp_path_factory) -> MlflowServer:
    """A team's MLflow server: its backend store on the session's PostgreSQL."""
    server = MlflowServer(postgres.database("mlflow").replace("+psycopg", ""), tmp_path_factory.mktemp("pg-mlflow"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def start_mlflow_server(tmp_path):
    """Start an ``MlflowServer`` on a backend store (a test that stops and restarts one needs its own);
    every server started is stopped at the end of the test."""
    servers: list[MlflowServer] = []

    def start(backend_uri: str) -> MlflowServer:
        folder = tmp_path / f"mlflow-server-{len(servers)}"
        folder.mkdir()
        servers.append(MlflowServer(backend_uri, folder))
        servers[-1].start()
        return servers[-1]

    try:
        yield start
    finally:
        for server in servers:
            server.stop()
