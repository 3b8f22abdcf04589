"""Reading campaigns from MLflow for the dashboard: read-only, cached for a short while.

Only ``search_experiments``, ``search_runs``, ``get_run`` and artifact downloads are called, and a
sqlite store is opened only if its file exists (SQLAlchemy would create an empty one). A campaign's
trials are loaded page by page with a tag filter and kept ``ttl_s`` seconds, so a 5,000-run
campaign is read once per TTL however many requests ask for it.
"""

from __future__ import annotations

import gc
import math
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from sqlalchemy.engine import make_url

from nas.errors import UserError
from nas.names import ACCURACY, ARCH_HASH, CAMPAIGN, LATENCY, ROLE, SUPERNET_HASH, TRIAL_NUMBER
from nas.pareto import pareto_ranks
from nas.tracking import campaign_budget, filter_equals

PAGE = 1000
ACC, LAT = ACCURACY, LATENCY


class NotFound(LookupError):
    """A campaign or run the store does not hold (the server answers 404)."""


class TTLCache:
    """Values reloaded at most every ``ttl_s`` seconds; one loader per key at a time, so requests that
    arrive together while a big campaign loads wait for that load instead of starting their own."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self.ttl_s, self._clock = ttl_s, clock
        self._entries: dict = {}
        self._locks: dict = {}
        self._guard = threading.Lock()

    def get(self, key, load: Callable):
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            hit = self._entries.get(key)
            if hit is not None and self._clock() - hit[0] < self.ttl_s:
                return hit[1]
            value = load()
            self._entries[key] = (self._clock(), value)
            return value

    def clear(self) -> None:
        with self._guard:
            self._entries.clear()


@dataclass(frozen=True)
class CampaignInfo:
    """A campaign's parent run: where it is and what it was run with."""

    experiment_id: str
    experiment: str
    name: str
    run_id: str
    status: str
    params: dict[str, str]
    tags: dict[str, str]

    @property
    def ref(self) -> str:
        """``<experiment id>/<name>``: names are unique within an experiment only."""
        return f"{self.experiment_id}/{self.name}"

    @property
    def target(self) -> str:
        return self.params.get("target") or self.tags.get("target", "")

    @property
    def space(self) -> str:
        return self.params.get("space", "")

    @property
    def budget_ms(self) -> float | None:
        """The budget ``best_under_budget`` was last computed for (as ``vitnas pareto`` reads it)."""
        return campaign_budget(self.tags, self.params)


@dataclass(frozen=True)
class Trial:
    """One trial's child run, with what the plots need."""

    run_id: str
    run_name: str
    trial_number: int
    arch_hash: str
    status: str
    metrics: dict[str, float]
    tags: dict[str, str]

    @classmethod
    def from_run(cls, run: Run) -> Trial:
        tags = run.data.tags
        number_tag = tags.get(TRIAL_NUMBER, "")
        return cls(
            run.info.run_id,
            run.info.run_name or "",
            int(number_tag) if number_tag.lstrip("-").isdigit() else -1,
            tags.get(ARCH_HASH, ""),
            run.info.status,
            {k: v for k, v in run.data.metrics.items() if math.isfinite(v)},
            dict(tags),
        )


@dataclass(frozen=True)
class Trials:
    """A campaign's trials as loaded, with what every page needs computed once per load."""

    all: list[Trial]  # any status, by trial number
    points: list[Trial]  # finished, with an accuracy and a latency, by trial number
    front: list[Trial]  # the non-dominated points (accuracy max, latency min), fastest first

    @classmethod
    def of(cls, trials: list[Trial]) -> Trials:
        points = [t for t in trials if t.status == "FINISHED" and ACC in t.metrics and LAT in t.metrics]
        ranks = pareto_ranks([(t.metrics[ACC], t.metrics[LAT]) for t in points], ("max", "min"))
        front = sorted(
            (t for t, r in zip(points, ranks) if r == 0),
            key=lambda t: (t.metrics[LAT], -t.metrics[ACC], t.trial_number),
        )
        return cls(trials, points, front)


_gc_guard = threading.Lock()
_gc_holders = 0


@contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic garbage collection while MLflow builds its ~60 ORM objects per run: with it, reading
    5,000 runs spent three quarters of its time collecting here (17.5 s instead of 4 s). Reference
    counting still frees what is not in a cycle; collection resumes when the last load ends."""
    global _gc_holders
    with _gc_guard:
        _gc_holders += 1
        gc.disable()
    try:
        yield
    finally:
        with _gc_guard:
            _gc_holders -= 1
            if _gc_holders == 0:
                gc.enable()


def number(text: str | None) -> float | None:
    """A param as a finite float, None for "None", "", NaN or anything else."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def open_client(tracking_uri: str) -> MlflowClient:
    """A client on an existing store; ``UserError`` (one line) when there is none to read."""
    if tracking_uri.startswith("file:") or "://" not in tracking_uri:
        raise UserError(
            f"tracking URI {tracking_uri!r}: use sqlite:///path/mlflow.db or an MLflow server (http://host:port)"
        )
    if tracking_uri.startswith("sqlite:"):
        db = make_url(tracking_uri).database
        if not db or db == ":memory:" or not Path(db).is_file():
            raise UserError(f"tracking URI {tracking_uri!r}: no MLflow database at {db!r}")
    client = MlflowClient(tracking_uri)
    try:
        client.search_experiments(max_results=1)
    except MlflowException as err:
        raise UserError(f"tracking URI {tracking_uri!r}: cannot read it: {err.message}") from None
    return client


class Store:
    """The campaigns and trials of one tracking store, as the dashboard reads them."""

    def __init__(self, tracking_uri: str, ttl_s: float = 30.0):
        self.tracking_uri = tracking_uri
        self.client = open_client(tracking_uri)
        self.cache = TTLCache(ttl_s)

    def _search(self, experiment_ids: list[str], filter_string: str) -> Iterator[Run]:
        token = None
        while True:
            page = self.client.search_runs(experiment_ids, filter_string, max_results=PAGE, page_token=token)
            yield from page
            token = page.token
            if not token:
                return

    def campaigns(self) -> list[CampaignInfo]:
        """Every campaign of every active experiment, by experiment then name."""
        return self.cache.get("campaigns", self._load_campaigns)

    def _load_campaigns(self) -> list[CampaignInfo]:
        names = {e.experiment_id: e.name for e in self.client.search_experiments()}
        if not names:
            return []
        oldest: dict[tuple[str, str], Run] = {}
        for run in self._search(list(names), f"tags.`{ROLE}` = 'campaign'"):
            key = (run.info.experiment_id, run.data.tags.get(CAMPAIGN, run.info.run_name))
            best = oldest.get(key)
            if best is None or (run.info.start_time, run.info.run_id) < (
                best.info.start_time,
                best.info.run_id,
            ):
                oldest[key] = run  # as Campaign does: the first-created parent run is the campaign
        infos = [
            CampaignInfo(
                exp,
                names[exp],
                name,
                run.info.run_id,
                run.info.status,
                dict(run.data.params),
                dict(run.data.tags),
            )  # fmt: skip
            for (exp, name), run in oldest.items()
        ]
        return sorted(infos, key=lambda c: (c.experiment, c.name))

    def campaign(self, ref: str) -> CampaignInfo:
        for info in self.campaigns():
            if info.ref == ref:
                return info
        raise NotFound(f"no campaign {ref!r} in {self.tracking_uri}")

    def trials(self, info: CampaignInfo) -> Trials:
        """The campaign's trial runs (any status) and their front."""
        return self.cache.get(("trials", info.ref), lambda: self._load_trials(info))

    def _load_trials(self, info: CampaignInfo) -> Trials:
        where = f"tags.`{ROLE}` = 'trial' and {filter_equals(f'tags.`{CAMPAIGN}`', info.name)}"
        with collector_paused():
            runs = self._search([info.experiment_id], where)
            # the name is any string a store holds: a filter for one with both quote kinds may match more
            trials = [Trial.from_run(r) for r in runs if r.data.tags.get(CAMPAIGN) == info.name]
        return Trials.of(sorted(trials, key=lambda t: (t.trial_number, t.run_id)))

    def ranking(self, info: CampaignInfo) -> dict | None:
        """The ranking trust of the supernet the campaign scored with (``vitnas rank-check``'s newest
        run for its weights hash), or None: not measured, or no supernet (a timm space)."""
        digest = info.tags.get(SUPERNET_HASH)
        if not digest:
            return None
        from nas.ranking.record import from_store

        return self.cache.get(("ranking", digest), lambda: from_store(self.client, digest))

    def run(self, run_id: str) -> tuple[Run, str | None]:
        """A trial's run and the text of its ``arch.yaml`` artifact (None when it has none)."""
        return self.cache.get(("run", run_id), lambda: self._load_run(run_id))

    def _load_run(self, run_id: str) -> tuple[Run, str | None]:
        try:
            run = self.client.get_run(run_id)
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise NotFound(f"no run {run_id!r} in {self.tracking_uri}") from None
            raise
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = self.client.download_artifacts(run_id, "arch.yaml", tmp)
            except (MlflowException, OSError):
                return run, None
            return run, Path(path).read_text()
