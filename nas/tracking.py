"""All MLflow access of vitnas: training runs, and search campaigns (one parent run per campaign,
one child run per trial) with the Pareto tags and figures on them.

Everything goes through an explicit ``MlflowClient(tracking_uri)``, never the fluent API's global
state, so one process can write to several stores. A store is a sqlite file (``sqlite:///...``),
another SQLAlchemy database, or an MLflow server (``http://...``); MLflow 3.17's file store no
longer opens. The client retries a busy server by itself.

Tags vitnas sets: ``vitnas.role`` (``campaign``/``trial``), ``vitnas.campaign`` (its name),
``vitnas.failure`` (why a run failed), and on trials ``trial_number``, ``arch_hash``, ``pareto``,
``pareto_rank``, ``best_under_budget``.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import re
import sqlite3
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.environment_variables import MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT
from mlflow.exceptions import MlflowException
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH
from sqlalchemy.engine import make_url

from nas.arch import ArchConfig, TimmArch
from nas.errors import UserError, explain_database_error
from nas.names import (
    ACCURACY,
    ARCH_HASH,
    BUDGET,
    CAMPAIGN,
    FAILURE,
    LATENCY,
    PARETO,
    PARETO_RANK,
    RESUMED,
    ROLE,
    TRIAL_NUMBER,
)
from nas.pareto import best_under_budget, pareto_ranks
from nas.servers import require_database, require_reachable
from nas.sqlite_tuning import tune_sqlite

END_STATES = ("FINISHED", "FAILED", "KILLED")
_QUIET = MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.name
_PAGE = 1000


def filter_equals(key: str, value: str) -> str:
    """An MLflow filter clause for ``key`` (e.g. ``tags.`vitnas.campaign```) equal to any string ``value``.

    MLflow's filter parser has no escapes (a literal ends at the next quote of its kind), so the value
    goes in whichever quotes it does not contain. A value holding both kinds cannot be written exactly:
    it becomes ``LIKE`` with ``_`` for each quote and backslash, which may match more runs (``%`` and
    ``_`` in it are wildcards too), so a caller that may see such a value compares it again.
    """
    if "'" not in value:
        return f"{key} = '{value}'"
    if '"' not in value:
        return f'{key} = "{value}"'
    pattern = "".join("_" if ch in "'\"\\" else ch for ch in value)
    return f"{key} LIKE '{pattern}'"


def default_tracking_uri(workspace: str | Path) -> str:
    """The workspace's sqlite store: ``sqlite:///<abs>/mlflow.db``."""
    return f"sqlite:///{Path(workspace).resolve() / 'mlflow.db'}"


def connect(tracking_uri: str, after_fork: bool = False, read_only: bool = False) -> MlflowClient:
    """A client for the store; a sqlite file's folder is created first (SQLAlchemy will not), and
    its engine gets ``tune_sqlite``'s settings (a trial's writes took ~52 ms, ~42 ms with them).

    ``read_only``: for commands that only read (pareto, export, dashboard): a sqlite store must
    already exist (``require_store``), nothing is created and the journal mode is left alone.

    ``after_fork``: this process was forked from one that used the store; MLflow caches one store
    per URI, so its pooled database connections are the parent's: they are dropped, unclosed
    (SQLAlchemy's recipe for forked processes), and this process opens its own.
    """
    if tracking_uri.startswith("file:") or "://" not in tracking_uri:
        raise UserError(
            f"tracking URI {tracking_uri!r}: use sqlite:///path/mlflow.db or an MLflow server "
            "(http://host:port); MLflow's file store no longer opens"
        )
    db = _sqlite_path(tracking_uri)
    if read_only:
        require_store(tracking_uri)
    elif db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    elif _is_server(tracking_uri) and not after_fork:
        require_reachable(tracking_uri)  # a wrong port: one line now, not after MLflow's minutes of retries
    elif _is_database_server(tracking_uri) and not after_fork:
        require_database(tracking_uri)  # MLflow's database store retries connecting for most of an hour
    client = MlflowClient(tracking_uri)
    # MLflow keeps one store (and engine) per URI; it has no public way to reach the engine
    engine = getattr(getattr(getattr(client, "_tracking_client", None), "store", None), "engine", None)
    if engine is not None and after_fork:
        engine.dispose(close=False)
    if engine is not None and db is not None and not read_only:
        tune_sqlite(engine)
    return client


def require_store(tracking_uri: str) -> None:
    """``UserError`` unless a sqlite URI names an existing MLflow database: MLflow would create
    one (and its tables) on first use, and reading must never write. A server must at least be
    there (``nas.servers``); what it holds it answers for itself."""
    db = _sqlite_path(tracking_uri)
    if _is_server(tracking_uri):
        require_reachable(tracking_uri)
    if db is None:
        return
    if not db.is_file():
        raise UserError(f"no tracking store at {db} (run vitnas search first, or pass --tracking-uri)")
    try:
        with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)) as con:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as err:
        raise UserError(f"tracking store {db}: cannot read it: {explain_database_error(err)}") from None
    if "experiments" not in tables:
        raise UserError(f"{db}: not an MLflow tracking store (no experiments table)")


def _is_server(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("http://", "https://"))


def _is_database_server(tracking_uri: str) -> bool:
    return tracking_uri.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "mysql", "mssql")


def _sqlite_path(tracking_uri: str) -> Path | None:
    if not tracking_uri.startswith("sqlite:"):
        return None
    db = make_url(tracking_uri).database
    return None if not db or db == ":memory:" else Path(db).resolve()


def experiment_id(client: MlflowClient, tracking_uri: str, name: str) -> str:
    """The experiment's id, created when missing; beside a sqlite file its artifacts go to
    ``<workspace>/mlartifacts/<name>`` (MLflow's default would be ``./mlruns`` of whatever the
    current folder is); a server decides for itself."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        db = _sqlite_path(tracking_uri)
        location = (
            None if db is None else (db.parent / "mlartifacts" / re.sub(r"[^\w.-]", "_", name)).as_uri()
        )
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException as err:  # another process created it in between
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)
    if exp.lifecycle_stage == "deleted":
        raise UserError(
            f"MLflow experiment {name!r} is deleted in {tracking_uri}: restore it "
            "(mlflow experiments restore) or choose another experiment name"
        )
    return exp.experiment_id


def follow_moved_store(tracking_uri: str) -> list[str]:
    """Re-point the artifact locations of a copied or moved sqlite store into its own folder; returns
    the names of the experiments re-pointed.

    ``experiment_id`` gives an experiment of a sqlite store the location ``<store folder>/mlartifacts/
    <name>``, and MLflow keeps it absolute, in the experiment and in each run's ``artifact_uri``
    (derived from it when the run is created). A workspace copied (``cp -a ws ws2``) or moved keeps
    pointing at the original folder: runs resumed or created in the copy would write their artifacts
    into the original. MLflow has no API to change an experiment's artifact location (mlflow/mlflow
    #3719, #8700; ``mlflow db move-resources`` moves between MLflow's own tenant workspaces and
    rewrites no run URI), and a relative location would be resolved against the current folder. So
    a process that is about to write calls this first, and it rewrites those columns in the store's
    own sqlite file, in one transaction: the experiments whose location has vitnas's layout under
    another folder (a location the user chose is left alone), and the runs and logged models under
    them. The files are not touched: a copy has its own already, a move took them along.
    """
    db = _sqlite_path(tracking_uri)
    if db is None or not db.is_file():
        return []
    from urllib.parse import unquote, urlparse

    from sqlalchemy import create_engine, inspect, text
    from sqlalchemy.pool import NullPool

    engine = create_engine(tracking_uri, poolclass=NullPool)
    tune_sqlite(engine)  # the busy timeout: another process may be writing
    moved = []
    try:
        with engine.begin() as con:
            tables = set(inspect(con).get_table_names())
            if not {"experiments", "runs"} <= tables:
                return []
            for exp_id, name, location in con.execute(
                text("select experiment_id, name, artifact_location from experiments")
            ).all():
                url = urlparse(location or "")
                if url.scheme not in ("file", "") or not url.path:
                    continue
                old = Path(unquote(url.path))
                ours = db.parent / "mlartifacts" / re.sub(r"[^\w.-]", "_", name)
                if old == ours or old.parent.name != "mlartifacts" or old.name != ours.name:
                    continue
                params = {"id": exp_id, "new": ours.as_uri(), "old": location.rstrip("/") + "/"}
                con.execute(
                    text("update experiments set artifact_location = :new where experiment_id = :id"), params
                )
                for table, column in (("runs", "artifact_uri"), ("logged_models", "artifact_location")):
                    if table in tables:
                        con.execute(
                            text(
                                f"update {table} set {column} = :new || '/' || substr({column}, length(:old) + 1) "
                                f"where experiment_id = :id and substr({column}, 1, length(:old)) = :old"
                            ),
                            params,
                        )
                moved.append(name)
            _forget_stale_artifact_repos(con)
    finally:
        engine.dispose()
    return moved


def _forget_stale_artifact_repos(con) -> None:
    """MLflow caches each run's artifact repository in one dict per process, keyed by the run id
    alone, whatever the store (private: ``nas.internals.mlflow_artifact_repos``): a process that used
    the original workspace would go on writing a copied run's artifacts there. Cached entries of this
    store's runs that point elsewhere are dropped."""
    from sqlalchemy import bindparam, text

    from nas.internals import mlflow_artifact_repos

    cache = mlflow_artifact_repos()
    if not cache:
        return
    query = text("select run_uuid, artifact_uri from runs where run_uuid in :ids").bindparams(
        bindparam("ids", expanding=True)
    )
    for ids in _chunks(list(cache), 500):
        for run_id, uri in con.execute(query, {"ids": ids}).all():
            repo = cache.get(run_id)
            if repo is not None and getattr(repo, "artifact_uri", uri) != uri:
                cache.pop(run_id, None)


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The MLflow UI page of a run on a server; None for a database store (no UI behind it)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


# -- batched writes ----------------------------------------------------------------------------
def _check_params(params: dict) -> dict[str, str]:
    """Params as MLflow stores them (strings), refused before any run exists if MLflow would refuse them."""
    out = {str(k): str(v) for k, v in params.items()}
    for key, value in out.items():
        if len(key) > MAX_ENTITY_KEY_LENGTH:
            raise ValueError(
                f"MLflow param key {key[:40]!r}... is {len(key)} chars (at most {MAX_ENTITY_KEY_LENGTH})"
            )
        if len(value) > MAX_PARAM_VAL_LENGTH:
            raise ValueError(
                f"MLflow param {key!r} is {len(value)} chars long (at most {MAX_PARAM_VAL_LENGTH})"
            )
    return out


def _chunks(items: list, size: int) -> Iterator[list]:
    return (items[i : i + size] for i in range(0, len(items), size))


def _log_batch(
    client: MlflowClient,
    run_id: str,
    metrics: dict | None = None,
    params: dict | None = None,
    tags: dict | None = None,
    step: int = 0,
) -> None:
    """Metrics, params and tags in as few requests as MLflow's batch limits allow.

    Metrics whose value is None are skipped (not measured); the rest must be numbers.
    """
    now = int(time.time() * 1000)
    ms = [Metric(k, float(v), now, step) for k, v in (metrics or {}).items() if v is not None]
    ps = [Param(k, v) for k, v in _check_params(params or {}).items()]
    ts = [RunTag(str(k), str(v)) for k, v in (tags or {}).items()]
    # limits: 100 params, 100 tags, 1000 entities in all per request
    for m, p, t in zip_longest(_chunks(ms, 800), _chunks(ps, 100), _chunks(ts, 100), fillvalue=[]):
        client.log_batch(run_id, metrics=m, params=p, tags=t)


def _terminate(client: MlflowClient, run_id: str, status: str, failure: str | None = None) -> None:
    """End a run without MLflow's "View run at" line on server stores (one a trial would drown the
    progress bar, and costs a request): vitnas prints ``run_url`` where a link helps."""
    if failure:
        client.set_tag(run_id, FAILURE, failure[:1000])
    old = os.environ.get(_QUIET)
    os.environ[_QUIET] = "true"
    try:
        client.set_terminated(run_id, status)
    finally:
        if old is None:
            del os.environ[_QUIET]
        else:
            os.environ[_QUIET] = old


# -- training runs -----------------------------------------------------------------------------
class RunLogger:
    """What a training loop writes to its run."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        _log_batch(self.client, self.run_id, metrics=metrics, step=step or 0)

    def set_tags(self, tags: dict) -> None:
        _log_batch(self.client, self.run_id, tags=tags)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)


@contextmanager
def training_run(
    tracking_uri: str, experiment: str, run_name: str, params: dict, tags: dict
) -> Iterator[RunLogger]:
    """A run that ends FINISHED, FAILED on an exception (tagged with it), KILLED on Ctrl-C."""
    client = connect(tracking_uri)
    follow_moved_store(tracking_uri)  # a copied workspace writes into itself, not the original
    run = client.create_run(
        experiment_id(client, tracking_uri, experiment),
        run_name=run_name,
        tags=resolve_tags({k: str(v) for k, v in tags.items()}),
    )
    run_id = run.info.run_id
    try:
        _log_batch(client, run_id, params=params)
        yield RunLogger(client, run_id)
    except KeyboardInterrupt:
        _terminate(client, run_id, "KILLED", "interrupted")
        raise
    except BaseException as err:
        _terminate(client, run_id, "FAILED", f"{type(err).__name__}: {err}")
        raise
    _terminate(client, run_id, "FINISHED")


# -- campaigns ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrialRecord:
    """One trial's child run as the campaign reads it back."""

    run_id: str
    trial_number: int
    arch_hash: str
    status: str
    metrics: dict[str, float]
    tags: dict[str, str]

    def as_row(self) -> dict:
        """A flat row for tables, CSV and plots: ids, every metric, the Pareto tags."""
        rank = self.tags.get(PARETO_RANK, "")
        return {
            "trial_number": self.trial_number,
            "run_id": self.run_id,
            "arch_hash": self.arch_hash,
            **self.metrics,
            "pareto": self.tags.get(PARETO) == "true",
            "pareto_rank": int(rank) if rank.isdigit() else None,
            "best_under_budget": self.tags.get("best_under_budget") == "true",
        }

    @classmethod
    def from_run(cls, run: Run) -> TrialRecord:
        tags = run.data.tags
        return cls(
            run.info.run_id,
            int(tags.get(TRIAL_NUMBER, -1)),
            tags.get(ARCH_HASH, ""),
            run.info.status,
            dict(run.data.metrics),
            dict(tags),
        )


def campaign_budget(tags: dict, params: dict) -> float | None:
    """A campaign run's latency budget (None: none) from its tags and params: the budget its
    ``best_under_budget`` tags were last computed for, else the one it was last resumed or started with."""
    value = tags.get(BUDGET, tags.get(RESUMED + BUDGET, params.get(BUDGET)))
    try:
        budget = float(value)
    except (TypeError, ValueError):  # absent, "None" or "none": no budget
        return None
    return budget if math.isfinite(budget) and budget > 0 else None


class Campaign:
    """One search campaign in MLflow: a parent run, found again by its name on resume, and one
    child run per trial."""

    def __init__(
        self, tracking_uri: str, name: str, experiment: str = "vitnas", after_fork: bool = False,
        read_only: bool = False,
    ):  # fmt: skip
        """``read_only``: only query (pareto, export): the store must exist and nothing is created
        in it; a missing experiment is a campaign that does not exist."""
        if not name or re.search(r"['\"\\`]", name):
            raise UserError(f"campaign name {name!r}: must be non-empty, without quotes or backslashes")
        self.tracking_uri, self.name = tracking_uri, name
        self.client = connect(tracking_uri, after_fork=after_fork, read_only=read_only)
        if read_only:
            exp = self.client.get_experiment_by_name(experiment)
            self.experiment_id = None if exp is None else exp.experiment_id
        else:
            self.experiment_id = experiment_id(self.client, tracking_uri, experiment)
        self.parent_run_id: str | None = None

    # -- queries --
    def _search(self, filter_string: str) -> Iterator[Run]:
        """Every run of this campaign matching the filter, page by page (never all into pandas)."""
        if self.experiment_id is None:  # read-only, and the store has no vitnas experiment
            return
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id],
                f"{filter_equals(f'tags.`{CAMPAIGN}`', self.name)} and {filter_string}",
                max_results=_PAGE,
                page_token=token,
            )
            yield from page
            token = page.token
            if not token:
                return

    def _oldest(self, filter_string: str) -> Run | None:
        """The first-created matching run: concurrent creators all settle on the same one."""
        runs = list(self._search(filter_string))
        return min(runs, key=lambda r: (r.info.start_time, r.info.run_id), default=None)

    def _parent(self) -> str:
        if self.parent_run_id is None:
            raise RuntimeError("call start_or_resume() before logging trials")
        return self.parent_run_id

    def exists(self) -> bool:
        return self._oldest(f"tags.`{ROLE}` = 'campaign'") is not None

    def parent_run(self) -> Run | None:
        """The campaign's parent run as stored (its params and tags say what it scored with)."""
        return self._oldest(f"tags.`{ROLE}` = 'campaign'")

    def _trial(self, trial_number: int) -> Run | None:
        return self._oldest(f"tags.`{ROLE}` = 'trial' and tags.trial_number = '{int(trial_number)}'")

    def finished_trial(self, trial_number: int) -> TrialRecord | None:
        """The trial's run if it has FINISHED (a retried trial may have finished before its node died)."""
        run = self._trial(trial_number)
        return None if run is None or run.info.status != "FINISHED" else TrialRecord.from_run(run)

    def trial_run_id(self, trial_number: int) -> str:
        """The run of a trial number; ``UserError`` when the campaign has no such trial."""
        run = self._trial(trial_number)
        if run is None:
            raise UserError(f"campaign {self.name!r} has no trial {trial_number}")
        return run.info.run_id

    # -- the parent run --
    def start_or_resume(self, params: dict | None = None, tags: dict | None = None) -> str:
        """The campaign's parent run id, RUNNING: the existing run of this name, or a new one.

        Params are immutable in MLflow: on resume new keys are logged, and a value that differs
        from the first one is kept and the new one set as tag ``vitnas.resumed.<key>``.
        A copied or moved workspace's store is re-pointed at its own artifacts first (``follow_moved_store``).
        """
        follow_moved_store(self.tracking_uri)
        params, tags = _check_params(params or {}), {k: str(v) for k, v in (tags or {}).items()}
        where = f"tags.`{ROLE}` = 'campaign'"
        created = None
        if self._oldest(where) is None:
            created = self.client.create_run(
                self.experiment_id,
                run_name=self.name,
                tags=resolve_tags({**tags, CAMPAIGN: self.name, ROLE: "campaign"}),
            )
        run = self._oldest(where)
        if created is not None and created.info.run_id != run.info.run_id:
            self.client.delete_run(created.info.run_id)  # lost a race with another process
        logged = run.data.params
        changed = {RESUMED + k: v for k, v in params.items() if k in logged and logged[k] != v}
        _log_batch(
            self.client,
            run.info.run_id,
            params={k: v for k, v in params.items() if k not in logged},
            tags={**tags, **changed},
        )
        self.client.update_run(run.info.run_id, status="RUNNING")
        self.parent_run_id = run.info.run_id
        return self.parent_run_id

    def end(self, status: str = "FINISHED") -> None:
        if status not in END_STATES:
            raise ValueError(f"status must be one of {END_STATES}, got {status!r}")
        _terminate(self.client, self._parent(), status)

    # -- trials --
    def trial_run(
        self,
        trial_number: int,
        arch: ArchConfig | TimmArch,
        params_extra: dict | None = None,
        tags: dict | None = None,
        new: bool = False,
    ) -> str:
        """The RUNNING child run of a trial: params = the flattened architecture (+ extras), ``arch.yaml``.

        Running a trial number again reuses its run if it is the same architecture with the
        same params, and raises ``ValueError`` otherwise (MLflow params cannot change).
        ``new``: the caller knows the number has no run yet (a fresh Optuna trial), which saves a query.
        """
        parent = self._parent()
        params = _check_params({**arch.flatten(), **(params_extra or {})})
        digest = arch.arch_hash()
        run = None if new else self._trial(trial_number)
        if run is None:
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"trial-{trial_number}",
                tags={
                    MLFLOW_PARENT_RUN_ID: parent,
                    ROLE: "trial",
                    CAMPAIGN: self.name,
                    TRIAL_NUMBER: str(trial_number),
                    ARCH_HASH: digest,
                    **(tags or {}),
                },
            )
            _log_batch(self.client, run.info.run_id, params=params)
        else:
            logged = run.data.params
            clash = [k for k, v in params.items() if k in logged and logged[k] != v]
            if run.data.tags.get(ARCH_HASH) != digest or clash:
                raise ValueError(
                    f"trial {trial_number} of campaign {self.name!r} is already logged (run {run.info.run_id}) "
                    f"with arch {run.data.tags.get('arch_hash')} and other params ({', '.join(clash) or 'arch_hash'}); "
                    f"this is arch {digest}: MLflow params cannot change, use a new trial number or campaign"
                )
            _log_batch(
                self.client,
                run.info.run_id,
                params={k: v for k, v in params.items() if k not in logged},
                tags=tags,
            )
            self.client.update_run(run.info.run_id, status="RUNNING")
        self.client.log_text(run.info.run_id, arch.to_yaml(), "arch.yaml")
        return run.info.run_id

    def finish_trial(
        self, run_id: str, metrics: dict[str, float], state: str = "FINISHED", tags: dict | None = None
    ) -> None:
        if state not in END_STATES:
            raise ValueError(f"state must be one of {END_STATES}, got {state!r}")
        _log_batch(self.client, run_id, metrics=metrics, tags=tags)
        _terminate(self.client, run_id, state)

    def close_stale_trials(self, keep_running: Iterable[str] = ()) -> list[str]:
        """Trials left RUNNING by a killed process (all but ``keep_running``): FAILED, tagged interrupted."""
        keep = set(keep_running)
        stale = [
            r.info.run_id
            for r in self._search(f"tags.`{ROLE}` = 'trial' and attributes.status = 'RUNNING'")
            if r.info.run_id not in keep
        ]
        for run_id in stale:
            _terminate(self.client, run_id, "FAILED", "interrupted")
        return stale

    def trial_runs(self, only_finished: bool = True) -> list[TrialRecord]:
        """The campaign's trials (FINISHED only by default), by trial number."""
        where = f"tags.`{ROLE}` = 'trial'" + (" and attributes.status = 'FINISHED'" if only_finished else "")
        return sorted(
            (TrialRecord.from_run(r) for r in self._search(where)), key=lambda t: (t.trial_number, t.run_id)
        )

    # -- the Pareto front --
    def tag_pareto(
        self, acc_key: str = ACCURACY, lat_key: str = LATENCY, budget_ms: float | None = None
    ) -> list[dict]:
        """Tag every finished trial with its rank on (accuracy max, latency min), whatever the budget.

        ``pareto``/``pareto_rank`` (``none`` when a metric is missing) on all, ``best_under_budget``
        true on the most accurate trial within ``budget_ms`` (any latency when None), false on the
        others. Only tags that change are written, so re-tagging after a few new trials is cheap.
        The parent run's ``latency_budget_ms`` tag records the budget, for ``front_rows`` to read.
        Returns the front's rows (see ``TrialRecord.as_row``; each with the budget), fastest first.
        """
        trials, ranks, best = self._ranked(acc_key, lat_key, budget_ms)
        _log_batch(
            self.client, self._parent(), tags={BUDGET: "none" if budget_ms is None else repr(budget_ms)}
        )
        rows = []
        for i, (trial, rank) in enumerate(zip(trials, ranks, strict=True)):
            new = {
                PARETO: str(rank == 0).lower(),
                PARETO_RANK: "none" if rank is None else str(rank),
                "best_under_budget": str(i == best).lower(),
            }
            changed = {k: v for k, v in new.items() if trial.tags.get(k) != v}
            if changed:
                _log_batch(self.client, trial.run_id, tags=changed)
            rows.append(
                {**trial.as_row(), "pareto": rank == 0, "pareto_rank": rank, "best_under_budget": i == best,
                 BUDGET: budget_ms}
            )  # fmt: skip
        return sorted(
            (r for r in rows if r["pareto"]), key=lambda r: (r[lat_key], -r[acc_key], r["trial_number"])
        )

    def _ranked(self, acc_key: str, lat_key: str, budget_ms: float | None):
        """Finished trials, their Pareto ranks on (accuracy max, latency min), the best under the budget."""
        trials = self.trial_runs()
        acc = [t.metrics.get(acc_key) for t in trials]
        lat = [t.metrics.get(lat_key) for t in trials]
        ranks = pareto_ranks(list(zip(acc, lat, strict=True)), ("max", "min"))
        return trials, ranks, best_under_budget(acc, lat, math.inf if budget_ms is None else budget_ms)

    def recorded_budget(self) -> float | None:
        """The latency budget of the campaign (None: none): the one its ``best_under_budget`` tags were
        last computed for (parent tag ``latency_budget_ms``), else, for a campaign tagged before that
        tag existed, the budget it was started (or last resumed with a new one) with."""
        run = self._oldest(f"tags.`{ROLE}` = 'campaign'")
        return None if run is None else campaign_budget(run.data.tags, run.data.params)

    def front_rows(
        self, acc_key: str = ACCURACY, lat_key: str = LATENCY, budget_ms: float | None = None
    ) -> list[dict]:
        """The front as ``tag_pareto`` returns it, computed without writing anything (read-only).

        ``budget_ms`` None: the campaign's own budget (``recorded_budget``), so the trial marked is
        the one the search marked; ``math.inf``: the most accurate at any latency.
        """
        budget_ms = self.recorded_budget() if budget_ms is None else budget_ms
        budget_ms = None if budget_ms == math.inf else budget_ms
        trials, ranks, best = self._ranked(acc_key, lat_key, budget_ms)
        rows = [
            {
                **t.as_row(),
                "pareto": True,
                "pareto_rank": 0,
                "best_under_budget": i == best,
                BUDGET: budget_ms,
            }
            for i, (t, rank) in enumerate(zip(trials, ranks, strict=True))
            if rank == 0
        ]
        return sorted(rows, key=lambda r: (r[lat_key], -r[acc_key], r["trial_number"]))

    def log_front_artifacts(
        self,
        rows: list[dict] | None = None,
        budget_ms: float | None = None,
        acc_key: str = ACCURACY,
        lat_key: str = LATENCY,
    ) -> None:
        """``pareto.html`` (interactive, self-contained), ``pareto.png`` and ``pareto.csv`` on the parent run.

        ``rows``: every trial to show (default: all finished trials, as tagged by ``tag_pareto``).
        """
        from nas.plots import pareto_html, pareto_png

        rows = [t.as_row() for t in self.trial_runs()] if rows is None else rows
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            pareto_html(rows, budget_ms, out / "pareto.html", acc_key, lat_key)
            pareto_png(rows, budget_ms, out / "pareto.png", acc_key, lat_key)
            write_csv(rows, out / "pareto.csv")
            self.client.log_artifacts(self._parent(), tmp)


def write_csv(rows: list[dict], path: str | Path) -> None:
    """Rows to CSV; columns in first-seen order over all rows (trials can differ in metrics)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
