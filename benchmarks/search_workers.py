"""Several workers on one PostgreSQL study: throughput, the cost of coordinating, and tracking on
PostgreSQL against sqlite (docs/teams.md).

The set-up is a team's, on this machine: a PostgreSQL server started here (on 127.0.0.1, in a
temporary folder) holding the Optuna studies, the latency caches and MLflow's backend store, and an
``mlflow server`` in front of it. psvit-digits campaigns, as ``search_efficiency.py`` runs them.

- Throughput: the same campaign (``--trials``, random sampler) run by 1, 2 and 3 worker processes at
  once, each configuration in a fresh database, repeated and interleaved (the order rotates). Trials
  per minute over the campaign's span (first trial started to last trial finished, from the study),
  and over the processes' whole wall time (start-up included). The cores are shared, so more
  workers only help while cores are idle: what coordination costs is reported per trial too: the
  claim (the critical section that reads the study and creates the trial's row), the whole path
  left on the trial's critical path besides scoring, and the time workers waited at the end.
- Tracking share: A/B pairs as in ``search_efficiency.py``: the same random-sampler trials run as a
  campaign on sqlite stores, as a campaign on PostgreSQL (study and cache) with the MLflow server,
  and as a bare loop with no store; each in a fresh process and a fresh cache, the order rotating.
  Overhead = an arm's trial loop minus the bare loop's, both without time inside latency
  measurements, as a share of the arm's loop.

    python benchmarks/search_workers.py                 # ~15-25 min on 2 cores
    python benchmarks/search_workers.py --quick         # a short smoke run
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/token_ops.py (before torch loads)

import argparse
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).parent))
from search_efficiency import (  # noqa: E402
    SPACE,
    bare_loop,
    campaign_config,
    children_cpu_s,
    clocked,
    machine,
    spread,
    supernet,
)

from nas.search.campaign import CampaignConfig, run_campaign, scorer_for  # noqa: E402
from nas.search.workers import SharedBudget  # noqa: E402
from nas.space import load_space  # noqa: E402

RESULT = Path(__file__).parent / "results" / "search_workers.json"
WORKERS = (1, 2, 3)
ARMS = ("sqlite", "postgres", "bare")


# -- the servers -----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_bin(given: str | None) -> Path:
    if given:
        return Path(given)
    found = shutil.which("postgres")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3]))
    if not versions:
        raise SystemExit("search_workers: no PostgreSQL server found (apt-get install postgresql)")
    return versions[-1].parent


@contextlib.contextmanager
def postgres(bin_dir: Path):
    """A PostgreSQL server on 127.0.0.1 (trust authentication: this machine only); its admin URL."""
    folder = Path(tempfile.mkdtemp(prefix="vitnas-bench-pg-"))
    as_user = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(folder, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port, data = _free_port(), folder / "data"
    run = partial_run(as_user, bin_dir)
    run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust")
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder}"
    run("pg_ctl", "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        run("pg_ctl", "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def partial_run(as_user: list[str], bin_dir: Path):
    def run(program: str, *args: str) -> None:
        subprocess.run([*as_user, str(bin_dir / program), *args], check=True, capture_output=True)

    return run


def servers_cpu_s() -> float:
    """CPU seconds used so far by this machine's PostgreSQL and MLflow server processes (the team's
    servers, which here share the cores with the workers): each live process's own time, and for
    the top of each server's process tree, its ended children's (PostgreSQL's per-connection
    backends end with their connections)."""
    import psutil

    def server(proc) -> bool:
        cmd = " ".join(proc.cmdline())
        return proc.name() == "postgres" or "mlflow" in cmd and ("server" in cmd or "uvicorn" in cmd)

    total = 0.0
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if not server(proc):
                continue
            times = proc.cpu_times()
            total += times.user + times.system
            parent = proc.parent()
            if parent is None or not server(parent):
                total += times.children_user + times.children_system
    return total


def database(admin: str, name: str) -> str:
    import psycopg

    with psycopg.connect(f"{admin.replace('+psycopg', '')}/postgres", autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    return f"{admin}/{name}"


@contextlib.contextmanager
def mlflow_server(backend: str, folder: Path):
    url = f"http://127.0.0.1:{_free_port()}"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "server.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1],
             "--backend-store-uri", backend, "--artifacts-destination", str(folder / "artifacts"), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"search_workers: mlflow server did not start, see {folder / 'server.log'}")
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait()


# -- one process: a worker, or one arm of a tracking pair ---------------------------------------------
def run_worker(args, space) -> dict:
    """One worker of a shared campaign, timed: each trial's phases and its claims."""
    config = CampaignConfig(
        name=args.campaign, space=space.source, target=args.target, trials=args.trials,
        workspace=str(args.workspace), supernet=args.supernet, sampler="random", seed=args.repeat,
        storage=args.storage, cache_url=args.storage, tracking_uri=args.tracking_uri,
        measure_budget_s=args.measure_budget_s,
    ).resolved()  # fmt: skip
    claims: list[float] = []
    original = SharedBudget._read

    def timed_read(self, claim):
        t0 = time.perf_counter()
        try:
            return original(self, claim)
        finally:
            if claim is not None:
                claims.append(time.perf_counter() - t0)

    SharedBudget._read = timed_read
    scorer = scorer_for(config, space)
    with clocked(scorer) as (times, span):
        run_campaign(config, space, scorer, progress=False)
    return {
        "trials": [{**vars(t), "tracking": t.tracking} for t in times],
        "claims_s": claims,
        "loop_s": span["end"] - span["start"],
        "in_trials_s": sum(t.wall for t in times),
    }


def run_arm(args, space) -> dict:
    """One arm of a tracking pair: the campaign on sqlite or on PostgreSQL, or the bare loop."""
    workspace = args.workspace / f"{args.arm}-{args.repeat}"
    overrides = {}
    if args.arm == "postgres":
        overrides = {"storage": args.storage, "cache_url": args.storage, "tracking_uri": args.tracking_uri}
    config = campaign_config(args, space, Path(args.supernet), workspace, f"track-{args.repeat}", "random",
                             args.repeat, workspace / "cache.sqlite")  # fmt: skip
    config = CampaignConfig(**{**config.__dict__, **overrides})
    scorer = scorer_for(config, space)
    writer_cpu = children_cpu_s()
    if args.arm == "bare":
        loop, measuring, archs = bare_loop(space, scorer, args.repeat, args.trials)
    else:
        with clocked(scorer) as (times, span):
            run_campaign(config, space, scorer, progress=False)
        loop, measuring = span["end"] - span["start"], sum(t.measure for t in times)
        study = optuna.load_study(study_name=config.name, storage=config.storage)
        archs = [t.user_attrs["arch_hash"] for t in sorted(study.trials, key=lambda t: t.number)]
    return {
        "loop_s": loop,
        "measuring_s": measuring,
        "archs": archs,
        "writer_cpu_s": children_cpu_s() - writer_cpu,
    }


def _child(args, role: list[str]) -> subprocess.Popen:
    argv = [sys.executable, __file__, *role, "--supernet", str(args.supernet), "--trials", str(args.trials),
            "--target", args.target, "--measure-budget-s", str(args.measure_budget_s)]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen, what: str) -> dict:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"search_workers: {what} failed:\n{out}{err}")
    return json.loads(out.strip().splitlines()[-1])


# -- the measurements ----------------------------------------------------------------------------
def throughput_run(args, admin: str, tracking: str, workspace: Path, n: int, repeat: int) -> dict:
    name = f"workers{n}-r{repeat}"
    url = database(admin, name.replace("-", "_"))
    common = ["--storage", url, "--tracking-uri", tracking, "--campaign", name, "--repeat", str(repeat)]
    t0, cpu0 = time.perf_counter(), servers_cpu_s()
    procs = [_child(args, ["--role", "worker", "--workspace", str(workspace / name / str(i)), *common])
             for i in range(n)]  # fmt: skip
    results = [_result(p, f"worker {i} of {name}") for i, p in enumerate(procs)]
    wall, servers_cpu = time.perf_counter() - t0, servers_cpu_s() - cpu0
    trials = optuna.load_study(study_name=name, storage=url).get_trials()
    span = (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()
    done = [t for r in results for t in r["trials"]]
    return {
        "workers": n,
        "repeat": repeat,
        "trials": len(trials),
        "span_s": span,
        "wall_s": wall,
        "trials_per_min": 60 * len(trials) / span,
        "trials_per_min_wall": 60 * len(trials) / wall,
        "claim_ms": [1e3 * c for r in results for c in r["claims_s"]],
        "path_ms": [1e3 * t["tracking"] for t in done],  # critical path besides scoring, claim included
        "trial_s": [t["wall"] for t in done],
        "end_wait_s": [r["loop_s"] - r["in_trials_s"] for r in results],  # waiting for others at the end
        "servers_cpu_ms_per_trial": 1e3 * servers_cpu / len(trials),
    }


def tracking_pair(args, admin: str, tracking: str, workspace: Path, repeat: int) -> dict:
    out = {"repeat": repeat}
    order = ARMS[repeat % 3 :] + ARMS[: repeat % 3]
    for arm in order:
        role = ["--role", "arm", "--arm", arm, "--repeat", str(repeat), "--workspace", str(workspace)]
        if arm == "postgres":
            role += ["--storage", database(admin, f"track_{repeat}"), "--tracking-uri", tracking]
        cpu0 = servers_cpu_s()
        out[arm] = _result(_child(args, role), f"the {arm} arm of pair {repeat}")
        out[arm]["servers_cpu_ms_per_trial"] = 1e3 * (servers_cpu_s() - cpu0) / args.trials
        out[arm]["writer_cpu_ms_per_trial"] = 1e3 * out[arm].pop("writer_cpu_s") / args.trials
    bare = out["bare"]
    out["same_archs"] = out["sqlite"]["archs"] == out["postgres"]["archs"] == bare["archs"]
    for arm in ("sqlite", "postgres"):
        a = out[arm]
        overhead = (a["loop_s"] - a["measuring_s"]) - (bare["loop_s"] - bare["measuring_s"])
        out[f"{arm}_share"] = overhead / a["loop_s"]
        out[f"{arm}_ms_per_trial"] = 1e3 * overhead / args.trials
    for arm in ARMS:
        del out[arm]["archs"]
    return out


def summarise(runs: list[dict], pairs: list[dict]) -> dict:
    by_n = {}
    for n in sorted({r["workers"] for r in runs}):
        mine = [r for r in runs if r["workers"] == n]
        by_n[n] = {
            "trials_per_min": spread([r["trials_per_min"] for r in mine]),
            "trials_per_min_wall": spread([r["trials_per_min_wall"] for r in mine]),
            "trial_s": spread([t for r in mine for t in r["trial_s"]]),
            "claim_ms": spread([c for r in mine for c in r["claim_ms"]]),
            "path_ms": spread([p for r in mine for p in r["path_ms"]]),
            "end_wait_s": spread([w for r in mine for w in r["end_wait_s"]]),
            "servers_cpu_ms_per_trial": spread([r["servers_cpu_ms_per_trial"] for r in mine]),
            "exact_budget": all(r["trials"] == mine[0]["trials"] for r in mine),
        }
    tracking = {
        "pairs": len(pairs),
        "same_archs": all(p["same_archs"] for p in pairs),
        **{f"{arm}_share": spread([p[f"{arm}_share"] for p in pairs]) for arm in ("sqlite", "postgres")},
        **{
            f"{arm}_ms_per_trial": spread([p[f"{arm}_ms_per_trial"] for p in pairs])
            for arm in ("sqlite", "postgres")
        },
        **{f"{arm}_loop_s": spread([p[arm]["loop_s"] for p in pairs]) for arm in ARMS},
        **{
            f"{arm}_writer_cpu_ms_per_trial": spread([p[arm]["writer_cpu_ms_per_trial"] for p in pairs])
            for arm in ARMS
        },
        **{
            f"{arm}_servers_cpu_ms_per_trial": spread([p[arm]["servers_cpu_ms_per_trial"] for p in pairs])
            for arm in ARMS
        },
    }
    return {"workers": by_n, "tracking": tracking}


def print_tables(summary: dict, trials: int) -> None:
    print(
        f"\nthroughput, one campaign of {trials} trials on one PostgreSQL study, median [min, max] over repeats"
    )
    print(f"{'workers':>7} {'trials/min':>20} {'(whole wall)':>14} {'trial s':>9} {'claim ms':>18} "
          f"{'path ms':>9} {'end wait s':>11} {'servers CPU ms/trial':>21}")  # fmt: skip
    for n, row in summary["workers"].items():
        t = row["trials_per_min"]
        print(f"{n:>7} {t['median']:>8.1f} [{t['min']:.1f}, {t['max']:.1f}] {row['trials_per_min_wall']['median']:>14.1f} "
              f"{row['trial_s']['median']:>9.3f} {row['claim_ms']['median']:>7.1f} (p90 {row['claim_ms']['p90']:>5.1f}) "
              f"{row['path_ms']['median']:>9.1f} {row['end_wait_s']['median']:>11.1f} "
              f"{row['servers_cpu_ms_per_trial']['median']:>21.0f}")  # fmt: skip
    k = summary["tracking"]
    print(
        f"\ntracking overhead vs a bare loop ({k['pairs']} interleaved triples, same architectures: {k['same_archs']})"
    )
    for arm in ("sqlite", "postgres"):
        s, ms = k[f"{arm}_share"], k[f"{arm}_ms_per_trial"]
        print(f"{arm:>9}: median {s['median']:.1%} of a trial [{s['min']:.1%}, {s['max']:.1%}], "
              f"{ms['median']:.1f} ms a trial [{ms['min']:.1f}, {ms['max']:.1f}]; CPU a trial: writer "
              f"{k[arm + '_writer_cpu_ms_per_trial']['median']:.0f} ms, servers "
              f"{k[arm + '_servers_cpu_ms_per_trial']['median']:.0f} ms")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--supernet", help="psvit-digits supernet checkpoint (default: train one, 1 epoch)")
    parser.add_argument(
        "--supernet-epochs", type=int, default=1, help="when training one (default %(default)s)"
    )
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="throughput runs per number of workers")
    parser.add_argument("--pairs", type=int, default=3, help="tracking triples (sqlite, postgres, bare)")
    parser.add_argument("--target", default="cpu:threads=1,batch=1")
    parser.add_argument("--measure-budget-s", type=float, default=0.3)
    parser.add_argument("--workspace", type=Path, default=Path("vitnas-runs/benchmarks"))
    parser.add_argument("--postgres-bin", help="folder of PostgreSQL's programs (default: found)")
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--quick", action="store_true", help="8 trials, 1 repeat, 1 triple")
    parser.add_argument("--role", choices=("worker", "arm"), help=argparse.SUPPRESS)
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--storage", help=argparse.SUPPRESS)
    parser.add_argument("--tracking-uri", help=argparse.SUPPRESS)
    parser.add_argument("--campaign", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.trials, args.repeats, args.pairs = 8, 1, 1
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space(SPACE)
    if args.role:
        result = run_worker(args, space) if args.role == "worker" else run_arm(args, space)
        print(json.dumps(result))
        return
    started = datetime.now(timezone.utc)
    workspace = (args.workspace / f"search-workers-{started:%Y%m%dT%H%M%S}").resolve()
    if args.supernet is None:
        args.workspace = workspace
        args.supernet = str(supernet(args, space)[0])
    load_before = os.getloadavg()
    runs, pairs = [], []
    with postgres(_postgres_bin(args.postgres_bin)) as admin:
        with mlflow_server(f"{admin.replace('+psycopg', '')}/{database(admin, 'mlflow').rsplit('/', 1)[1]}",
                           workspace / "mlflow-server") as tracking:  # fmt: skip
            for repeat in range(args.repeats):
                for n in WORKERS[repeat % 3 :] + WORKERS[: repeat % 3]:
                    runs.append(throughput_run(args, admin, tracking, workspace, n, repeat))
                    r = runs[-1]
                    print(f"{n} worker(s), repeat {repeat}: {r['trials']} trials, {r['trials_per_min']:.1f}/min "
                          f"over {r['span_s']:.0f} s", flush=True)  # fmt: skip
            for repeat in range(args.pairs):
                pairs.append(tracking_pair(args, admin, tracking, workspace / "tracking", repeat))
                p = pairs[-1]
                print(f"tracking triple {repeat}: sqlite {p['sqlite_share']:.1%}, postgres {p['postgres_share']:.1%}",
                      flush=True)  # fmt: skip
    summary = summarise(runs, pairs)
    print_tables(summary, args.trials)
    load_after = os.getloadavg()
    print(f"\nload average (1, 5, 15 min): before {load_before}, after {load_after}")
    result = {
        "benchmark": "search_workers",
        "date": started.isoformat(timespec="seconds"),
        "wall_s": (datetime.now(timezone.utc) - started).total_seconds(),
        "machine": {**machine(), "load_average_before": load_before, "load_average_after": load_after},
        "settings": {
            "space": SPACE,
            "trials": args.trials,
            "repeats": args.repeats,
            "pairs": args.pairs,
            "target": args.target,
            "measure_budget_s": args.measure_budget_s,
            "supernet": args.supernet,
            "sampler": "random (seed = repeat; each worker after the first gets a seed of its own)",
            "stores": "PostgreSQL on 127.0.0.1 (study, cache, MLflow's backend) + mlflow server; "
            "tracking pairs: sqlite files vs that set-up vs no store",
            "order": "worker counts rotate per repeat; arms rotate per triple",
        },  # fmt: skip
        "summary": summary,
        "throughput_runs": runs,
        "tracking_pairs": pairs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
