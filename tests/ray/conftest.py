"""Ray fixtures: a real two-node Ray cluster on 127.0.0.1, started with ``ray start`` from the test.

The head offers the custom resource ``hw_head``, the worker ``hw_target``; campaigns target
``hw_target``, so every trial must run on the worker. Each node has its own temporary folder, as on
separate machines (sharing one, a worker node's clean-up deletes the job's working directory), all
under one folder of the test's own; teardown ends exactly the processes started under it (their
whole process trees), by process id: ``ray stop`` would also stop other Ray clusters on this machine.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from nas.space import load_space

REPO = Path(__file__).resolve().parents[2]
HEAD_RESOURCE, TARGET_RESOURCE = "hw_head", "hw_target"


def _search_fixtures():
    """The search tests' tiny space and campaign checks (tests/search/conftest.py), loaded by path."""
    spec = importlib.util.spec_from_file_location(
        "search_fixtures", REPO / "tests" / "search" / "conftest.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


search_fixtures = _search_fixtures()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: The cluster's own token (token authentication, as Ray's default for clusters started by hand).
TOKEN = secrets.token_hex(32)


def _env() -> dict[str, str]:
    """The venv's tools first on PATH (a job's ``python`` is the venv's); the cluster's token;
    a lost node noticed in seconds."""
    return {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": TOKEN,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
        "RAY_USAGE_STATS_ENABLED": "0",
    }


def _ray(*args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
    ray = str(Path(sys.executable).parent / "ray")
    proc = subprocess.run([ray, *args], env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"ray {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


@dataclass
class Cluster:
    """A head and worker nodes on 127.0.0.1; ``dashboard`` is the address ``ray job submit`` takes."""

    temp_dir: Path
    gcs: str
    dashboard: str
    workers: dict[int, str] = field(default_factory=dict)  # node-manager port -> its resource

    def add_worker(self, resource: str = TARGET_RESOURCE) -> int:
        port = _free_port()
        _ray("start", f"--address={self.gcs}", "--num-cpus=1", f"--resources={json.dumps({resource: 1})}",
             "--node-ip-address=127.0.0.1", f"--node-manager-port={port}", f"--temp-dir={self.temp_dir / str(port)}",
             "--disable-usage-stats")  # fmt: skip
        self.workers[port] = resource
        return port

    def kill_worker(self, port: int) -> None:
        """SIGKILL the worker node's raylet and everything under it, as a lost machine would go."""
        raylets = [p for p in _ours(self.temp_dir) if f"--node_manager_port={port}" in _cmdline(p)]
        assert raylets, f"no raylet of the worker on port {port}"
        _kill_trees(raylets, signal.SIGKILL)
        del self.workers[port]

    def submit(self, args: list[str], wait: bool = True, timeout: float = 240) -> subprocess.CompletedProcess:
        """``ray job submit --working-dir <repo> -- python runners/campaign.py ARGS``."""
        no_wait = [] if wait else ["--no-wait"]
        return _ray("job", "submit", f"--address={self.dashboard}", f"--working-dir={REPO}", *no_wait, "--",
                    "python", "runners/campaign.py", *args, timeout=timeout, check=False)  # fmt: skip

    def wait_job(self, job_id: str, timeout_s: float = 240) -> tuple[str, str]:
        """Wait for a submitted job to end: its final status line and its whole log."""

        status = wait_for(lambda: self.job_ended(job_id), timeout_s, f"job {job_id} to end", every_s=3)
        return status, self.job_logs(job_id)

    def job_ended(self, job_id: str) -> str | None:
        """The final status of the job (SUCCEEDED, FAILED, STOPPED), or None while it runs."""
        status = _ray("job", "status", f"--address={self.dashboard}", job_id).stdout.upper()
        return next((s for s in ("SUCCEEDED", "FAILED", "STOPPED") if s in status), None)

    def stop_job(self, job_id: str) -> None:
        """``ray job stop``: the job's driver is ended, as when the machine running it goes away."""
        _ray("job", "stop", f"--address={self.dashboard}", job_id)

    def job_logs(self, job_id: str) -> str:
        return _ray("job", "logs", f"--address={self.dashboard}", job_id).stdout


def _cmdline(pid: int) -> list[str]:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    return []


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _ours(temp_dir: Path) -> list[int]:
    """Processes the cluster's nodes started: those whose command line names its temporary folder."""
    return [pid for pid in _pids() if any(str(temp_dir) in a for a in _cmdline(pid))]


def _parent(pid: int) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return None


def _kill_trees(roots: list[int], sig: int) -> None:
    """Signal the roots and all their descendants (found through /proc), then wait for them to go."""
    parents = {pid: _parent(pid) for pid in _pids()}
    tree, frontier = set(roots), list(roots)
    while frontier:
        children = [pid for pid, ppid in parents.items() if ppid in frontier and pid not in tree]
        tree.update(children)
        frontier = children
    for pid in tree:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() and _alive(pid) for pid in tree):
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    """Not gone and not a zombie."""
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


@pytest.fixture
def ray_cluster() -> Cluster:
    """A head (``hw_head``) and one worker (``hw_target``), one CPU each; every process ended afterwards."""
    temp_dir = Path(tempfile.mkdtemp(prefix="vr", dir="/tmp"))  # short: Ray's socket paths have a limit
    port, dash = _free_port(), _free_port()
    cluster = Cluster(temp_dir, f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}")
    try:
        _ray("start", "--head", f"--port={port}", "--num-cpus=1", f"--resources={json.dumps({HEAD_RESOURCE: 1})}",
             "--node-ip-address=127.0.0.1", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dash}", f"--temp-dir={temp_dir / 'head'}", "--disable-usage-stats")  # fmt: skip
        cluster.add_worker()
        yield cluster
    finally:
        _kill_trees(_ours(temp_dir), signal.SIGTERM)
        _kill_trees(_ours(temp_dir), signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


@dataclass(frozen=True)
class TinyCampaign:
    """The tiny space, its untrained checkpoint, and ``vitnas search`` arguments for a Ray campaign."""

    space_file: Path
    checkpoint: Path
    workspace: Path
    target: str = "cpu:threads=1,batch=1"
    measure_budget_s: float = 0.2

    def config(self, name: str, trials: int, tracking_uri: str):
        from nas.search.campaign import CampaignConfig

        return CampaignConfig(
            name=name, space=str(self.space_file), target=self.target, trials=trials, workspace=str(self.workspace),
            supernet=str(self.checkpoint), seed=1, tracking_uri=tracking_uri, measure_budget_s=self.measure_budget_s,
        ).resolved()  # fmt: skip

    def argv(self, config) -> list[str]:
        return ["--space", str(self.space_file), "--supernet", str(self.checkpoint), "--target", self.target,
                "--trials", str(config.trials), "--campaign", config.name, "--workspace", config.workspace,
                "--tracking-uri", config.tracking_uri, "--seed", str(config.seed), "--measure-budget-s",
                str(config.measure_budget_s), "--max-concurrent", "1",
                "--target-resource", f"{TARGET_RESOURCE}=1", "--quiet"]  # fmt: skip


@pytest.fixture
def tiny_campaign(tmp_path) -> TinyCampaign:
    space_file = tmp_path / "tiny.yaml"
    space_file.write_text(yaml.safe_dump(search_fixtures.TINY_SPACE, sort_keys=False))
    space = load_space(space_file)
    checkpoint = search_fixtures.write_untrained_checkpoint(space, tmp_path / "supernet")
    return TinyCampaign(space_file, checkpoint, tmp_path / "ws")


def wait_for(predicate, timeout_s: float, what: str, every_s: float = 1.0):
    """Poll until ``predicate()`` is truthy (returned), or fail naming what was awaited."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
