"""Signs of life of a worker's running trials, so that the other workers can tell a dead one's.

A worker on a shared study (``nas.search.workers``) writes the database server's clock into each
of its RUNNING trials (system attribute ``vitnas:heartbeat``) every ``interval_s``; a RUNNING trial
whose last beat is older than the grace period belongs to a worker that died (or lost the database
that long), and any worker fails it as interrupted. The server's clock, not the worker's: the
machines' clocks may disagree. Optuna's own heartbeat fails a stale trial before its callback can
mark it interrupted (and a finished trial takes no new attribute), so vitnas keeps its own.

A thread of the campaign process: the writer process may be starved of CPU or waiting for MLflow,
and a beat must not wait behind it. Beats are small (one row each) but still wait while a latency
is measured (``paused``), as the writer does. A trial that has finished (written by the writer, or
failed by another worker) drops out at its next beat.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import optuna
from optuna.exceptions import UpdateFinishedTrialError

from nas.retry import is_transient, seen_away

HEARTBEAT = "vitnas:heartbeat"


class Heartbeat:
    """Beats for the trials ``add``ed, every ``interval_s``, with the time ``clock()`` gives."""

    def __init__(self, storage: optuna.storages.BaseStorage, clock: Callable[[], float], interval_s: float):
        self._storage, self._clock, self._interval = storage, clock, interval_s
        self._trials: set[int] = set()
        self._writing = threading.Lock()  # held by a beat; ``paused`` holds it during a measurement
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vitnas-heartbeat", daemon=True)
        self.error: BaseException | None = None  # what stopped the beats (a bug: the campaign raises it)

    def add(self, trial_id: int) -> None:
        self._trials.add(trial_id)

    def trials(self) -> list[int]:
        """The trials beaten for, as far as it knows still running."""
        return list(self._trials)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()

    @contextmanager
    def paused(self) -> Iterator[None]:
        with self._writing:
            yield

    def _run(self) -> None:
        try:
            while not self._stop.wait(self._interval):
                with self._writing:
                    self.beat()
        except BaseException as err:  # noqa: BLE001 - raised in the campaign by its next claim
            self.error = err

    def beat(self) -> None:
        """One beat for every trial still running; a store that is away is tried at the next beat."""
        now = self._clock()
        for trial_id in list(self._trials):
            try:
                self._storage.set_trial_system_attr(trial_id, HEARTBEAT, now)
            except UpdateFinishedTrialError:
                self._trials.discard(trial_id)
            except Exception as err:
                if not is_transient(err):
                    raise
                seen_away()  # the other workers could not beat either: see nas.search.workers
                return
