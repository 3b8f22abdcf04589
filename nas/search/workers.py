"""Which trial a campaign process runs next: alone on its study, or as one of several workers.

Alone (a sqlite study: one process per campaign, ``nas.search.lock``), ``LocalBudget`` hands out
the trials still missing, and the writer creates each one's row.

On a PostgreSQL study any number of ``vitnas search`` processes, on one machine or many, may run
the same campaign, as Optuna's own distributed mode does; ``SharedBudget`` coordinates them through
the study itself. Before scoring a candidate, a worker claims it in a short critical section (a
PostgreSQL advisory lock of the campaign) that reads the study (Optuna's cached storage reads only
what changed) and then:

- fails the RUNNING trials whose heartbeat (``nas.search.heartbeat``) is older than the grace
  period: their worker is dead; interrupted, so they do not count. (Only once this worker has
  itself reached the database for a grace period: after a restart, the others need time to beat.)
- counts the budget: trials done (completed, or failed on their own) plus trials RUNNING anywhere
  must stay under ``--trials``. When they do not, the worker waits for the running ones (one may be
  a dead worker's, failed once stale) and stops once the budget is done: exactly ``--trials``;
- refuses an architecture RUNNING in another worker: the worker asks its sampler again (up to
  ``MAX_REDRAWS`` times; a tiny space may leave no other choice);
- creates the trial's row (RUNNING, the architecture hash, a first heartbeat): its number is the
  study's; the writer fills in the parameters and attributes afterwards, off the critical path;
- gives the mirror the other workers' newly finished trials, so the sampler sees them a trial
  after they were written (the writer is kept at most a trial or two behind: ``LAG``).

Each worker's sampler gets a seed of its own (``worker_seed``): the same seed everywhere would
propose the same candidates everywhere. The set-up (tables, study, MLflow experiment and parent run)
runs inside the same critical section, so that workers starting together do not race to create
them. A database that goes away mid-campaign is waited for (``nas.retry``).
"""

from __future__ import annotations

import enum
import hashlib
import math
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from datetime import datetime

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from nas.names import ARCH_HASH
from nas.retry import Notice, describe, is_transient, last_seen_away, with_retries
from nas.search.heartbeat import HEARTBEAT, Heartbeat
from nas.search.mirror import INTERRUPTED, RUN_ID, StudyMirror, counts_toward_budget, fail_interrupted_run
from nas.tracking import Campaign

#: Architectures running elsewhere are refused this many times in a row, then one is let through.
MAX_REDRAWS = 8
#: A trial is a dead worker's once its heartbeat is this many intervals old.
GRACE_BEATS = 3
#: Messages the writer may be behind while it writes (two a trial): see ``BackgroundWriter``.
LAG = 4
#: Study system attribute: how many workers have joined the campaign (each one's seed differs).
WORKERS = "vitnas:workers"
#: Trial system attribute: the worker running it, ``host pid``.
WORKER = "vitnas:worker"
#: What ``propose`` returns: an asked trial of the mirror's working study, and its architecture.
Proposal = tuple[optuna.Trial, object]


class Refusal(enum.Enum):
    FULL = "the budget is spent or taken by running trials"
    DUPLICATE = "the architecture is running in another worker"


@dataclass(frozen=True)
class Claim:
    """A trial's place in the study: its row and number (None: the writer creates the row)."""

    row: int | None = None
    number: int | None = None


def worker_seed(seed: int, ordinal: int) -> int:
    """The sampler seed of the ``ordinal``-th worker to join: the campaign's seed for the first."""
    if ordinal == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}/{ordinal}".encode()).digest()[:4], "big")


class LocalBudget:
    """A campaign alone on its study: the trials still missing, one after the other."""

    def __init__(self, done: int, trials: int):
        self.done, self.trials = done, trials

    def next_trial(self, mirror: StudyMirror, propose: Callable[[], Proposal]) -> tuple | None:
        if self.done >= self.trials:
            return None
        self.done += 1
        return (*propose(), Claim())

    def quiet(self, writer) -> Callable:
        """What keeps the stores still while a latency is measured."""
        return writer.paused

    def running(self):
        return nullcontext()


class SharedBudget:
    """One worker of a campaign on a PostgreSQL study (see the module's docstring)."""

    def __init__(self, url: str, name: str, trials: int, heartbeat_s: float):
        self.trials, self.done = trials, 0
        self.heartbeat_s, self.grace_s = heartbeat_s, GRACE_BEATS * heartbeat_s
        self._key = int.from_bytes(hashlib.sha256(f"vitnas.claims:{name}".encode()).digest()[:8], "big") >> 1
        self._engine = create_engine(
            url, pool_pre_ping=True, pool_size=1, max_overflow=0, isolation_level="AUTOCOMMIT"
        )
        self._offset = 0.0  # the database server's clock minus this machine's
        self._notice = Notice("the study's database")
        self._in_section = False
        self._started = time.monotonic()

    # -- the critical section ------------------------------------------------------------------
    @contextmanager
    def section(self) -> Iterator[None]:
        """Inside: no other worker of this campaign is in its section (reentrant). A lost connection
        lets go."""
        if self._in_section:
            yield
            return
        self._in_section = True
        try:
            with self._locked():
                yield
        finally:
            self._in_section = False

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._engine.connect() as conn:
            server = conn.execute(
                text(
                    "select extract(epoch from clock_timestamp()) from (select pg_advisory_lock(:k)) as held"
                ),
                {"k": self._key},
            ).scalar()
            self._offset = float(server) - time.time()
            try:
                yield
            finally:
                with suppress(DBAPIError):  # the session is gone, and its lock with it
                    conn.execute(text("select pg_advisory_unlock(:k)"), {"k": self._key})

    def now(self) -> float:
        """The database server's clock (Unix seconds)."""
        return time.time() + self._offset

    # -- joining ---------------------------------------------------------------------------------
    def join(self, study: optuna.Study, storage: optuna.storages.RDBStorage, tracker: Campaign) -> int:
        """Inside ``section``, once the study and the campaign's parent run exist: count this worker
        in and close the MLflow runs of trials failed as interrupted; this worker's ordinal (0 for
        the first ever). Trials that dead workers left RUNNING are failed by its claims, once it has
        been up for a grace period."""
        self._study, self._storage = study, storage
        self._study_id = storage.get_study_id_from_name(study.study_name)
        ordinal = storage.get_study_system_attrs(self._study_id).get(WORKERS, 0)
        storage.set_study_system_attr(self._study_id, WORKERS, ordinal + 1)
        _, trials, failed = self._read(claim=None)
        for trial in failed:
            fail_interrupted_run(tracker, trial.number, trial.user_attrs.get(RUN_ID))
        self.close_orphans(tracker, trials)
        self._heartbeat = Heartbeat(storage, self.now, self.heartbeat_s)
        return ordinal

    def running(self) -> Heartbeat:
        """The heartbeat of this worker's trials, for the block."""
        return self._heartbeat

    def quiet(self, writer) -> Callable:
        @contextmanager
        def paused() -> Iterator[None]:
            with writer.paused(), self._heartbeat.paused():
                yield

        return paused

    # -- claiming ----------------------------------------------------------------------------------
    def next_trial(self, mirror: StudyMirror, propose: Callable[[], Proposal]) -> tuple | None:
        """``(trial, arch, claim)`` for the next trial to score, or None once the budget is done."""
        pending, redraws = None, 0
        while True:
            if pending is None:
                if self.done >= self.trials:
                    return None
                pending = propose()
            trial, arch = pending
            if self._heartbeat.error is not None:
                raise RuntimeError(f"the heartbeat stopped: {describe(self._heartbeat.error)}")
            claim = (arch.arch_hash(), redraws >= MAX_REDRAWS)
            outcome, trials, failed = with_retries(
                lambda claim=claim: self._read(claim), on_wait=self._notice
            )
            mirror.learn(trials)
            for stale in failed:
                mirror.fail_run(stale.number, stale.user_attrs.get(RUN_ID))
            if isinstance(outcome, Claim):
                self._heartbeat.add(outcome.row)
                return trial, arch, outcome
            if outcome is Refusal.DUPLICATE:
                mirror.discard(trial)
                pending, redraws = None, redraws + 1
            elif self.done >= self.trials:
                mirror.discard(trial)
                return None
            else:  # others' trials take the rest of the budget: one may fail, or be a dead worker's
                time.sleep(min(1.0, self.heartbeat_s))

    def _read(self, claim: tuple[str, bool] | None):
        """In the section: read the study, fail stale trials, count; with ``claim`` (architecture
        hash, duplicates allowed) also claim. ``(Claim | Refusal | None, trials read, trials failed)``."""
        with self.section():
            now = self.now()
            trials = self._study.get_trials(deepcopy=False)
            running = [t for t in trials if t.state == TrialState.RUNNING]
            judged = self._judging()
            stale = [
                t for t in running if judged and now - t.system_attrs.get(HEARTBEAT, -math.inf) > self.grace_s
            ]
            failed = [t for t in stale if self._fail_stale(t)]
            live = [t for t in running if all(t is not s for s in stale)]
            self.done = sum(map(counts_toward_budget, trials))
            if claim is None:
                return None, trials, failed
            arch_hash, duplicates_allowed = claim
            if self.done + len(live) >= self.trials:
                return Refusal.FULL, trials, failed
            if not duplicates_allowed and any(t.user_attrs.get(ARCH_HASH) == arch_hash for t in live):
                return Refusal.DUPLICATE, trials, failed
            row = self._storage.create_new_trial(self._study_id, _claim_row(arch_hash, now))
            # the study's number: every worker creates rows in this section only
            return Claim(row, len(trials)), trials, failed

    def _judging(self) -> bool:
        """Whether heartbeats may be judged: this worker has been up, and has reached its stores without
        a break (``nas.retry``), for a whole grace period. After an outage the others need time to
        beat again, as this one did; a stale trial found meanwhile is failed a little later."""
        quiet_since = max(self._started, last_seen_away())
        return time.monotonic() - quiet_since >= self.grace_s

    def _fail_stale(self, trial: FrozenTrial) -> bool:
        """Interrupted, then failed (the order resuming relies on); False if it finished meanwhile."""
        try:
            self._storage.set_trial_user_attr(trial._trial_id, INTERRUPTED, True)
            self._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            return False
        return True

    # -- leaving -----------------------------------------------------------------------------------
    def abandon(self, tracker: Campaign) -> None:
        """After Ctrl-C: this worker's claimed trials still RUNNING are failed as interrupted, with
        their runs (best effort: a database that is away leaves them to the heartbeat)."""
        try:
            for row in self._heartbeat.trials():
                trial = self._storage.get_trial(row)
                if trial.state == TrialState.RUNNING and self._fail_stale(trial):
                    fail_interrupted_run(tracker, trial.number, trial.user_attrs.get(RUN_ID))
        except Exception as err:
            if not is_transient(err):
                raise

    def close_orphans(self, tracker: Campaign, trials: list[FrozenTrial] | None = None) -> None:
        """Runs still RUNNING in MLflow whose trial was failed as interrupted (the worker that
        failed it died before it told MLflow): failed too."""
        if trials is None:
            trials = with_retries(lambda: self._study.get_trials(deepcopy=False), on_wait=self._notice)
        interrupted = {
            t.number for t in trials if t.state == TrialState.FAIL and t.user_attrs.get(INTERRUPTED)
        }
        for run in tracker.trial_runs(only_finished=False):
            if run.status == "RUNNING" and run.trial_number in interrupted:
                fail_interrupted_run(tracker, run.trial_number, run.run_id)

    def close(self) -> None:
        self._engine.dispose()


def _claim_row(arch_hash: str, now: float) -> FrozenTrial:
    """What a claimed trial's row holds until the writer fills it in: the architecture, a first
    heartbeat, and who runs it (``host pid``, for the operator)."""
    return FrozenTrial(
        number=0, state=TrialState.RUNNING, value=None, values=None, datetime_start=datetime.now(),
        datetime_complete=None, params={}, distributions={}, user_attrs={ARCH_HASH: arch_hash},
        system_attrs={HEARTBEAT: now, WORKER: f"{socket.gethostname()} {os.getpid()}"},
        intermediate_values={}, trial_id=0,
    )  # fmt: skip
