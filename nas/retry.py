"""Store calls through short outages: which failures are a server that went away, and waiting for it.

A campaign on a team's PostgreSQL and MLflow server meets restarts: the database restarted for an
upgrade, the tracking server redeployed. Mid-campaign, a call that fails because a server is not
there (connection refused or dropped, the database starting up or shutting down, an HTTP 5xx) is
tried again with growing pauses, for up to ``RETRY_FOR_S``; then ``StoreOutage`` stops the
campaign in one line, and running the same command resumes it. Before the first trial nothing is
retried: a wrong port or password is told at once (``nas.errors``).

Only servers are waited for: a sqlite file's errors (read-only, full disk) never go away by
themselves, and keep their one-line error.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from typing import TypeVar

from nas.errors import UserError, one_line

T = TypeVar("T")
#: How long a store may stay away, mid-campaign, before the campaign stops (seconds).
RETRY_FOR_S = 300.0
FIRST_PAUSE_S, LONGEST_PAUSE_S = 0.2, 5.0
#: HTTP statuses of a server that is busy or restarting (MLflow's own retry list).
_HTTP_TRANSIENT = re.compile(r"failed with error code (429|50[0-4])\b")


_LAST_AWAY = [-float("inf")]  # when (monotonic) this process last met a store that was away


class StoreOutage(UserError):
    """A store stayed away longer than the campaign waits: stop, resume later."""


def seen_away() -> None:
    """Note that a store was away just now (``with_retries`` notes it; so may other callers)."""
    _LAST_AWAY[0] = time.monotonic()


def last_seen_away() -> float:
    """When (``time.monotonic``) this process last met a store that was away (-inf: never)."""
    return _LAST_AWAY[0]


def is_transient(err: BaseException) -> bool:
    """True when ``err`` (or what it was raised from) says a database or tracking server is not
    there right now, rather than that the request was wrong."""
    for link in _chain(err):
        kind, module = type(link).__name__, type(link).__module__
        if getattr(link, "connection_invalidated", False):  # SQLAlchemy saw the connection drop
            return True
        if module.startswith("psycopg") and {c.__name__ for c in type(link).__mro__} & _DRIVER_TRANSIENT:
            return True
        if module.startswith("requests") and kind in ("ConnectionError", "Timeout", "ConnectTimeout",
                                                       "ReadTimeout", "RetryError", "ChunkedEncodingError"):  # fmt: skip
            return True
        if kind in ("MlflowException", "RestException") and _mlflow_transient(link):
            return True
    return False


#: The PostgreSQL driver's classes (and base classes) of a server shutting down, starting up or
#: dropping the connection.
_DRIVER_TRANSIENT = {"OperationalError", "InterfaceError"}


def _mlflow_transient(err) -> bool:
    """A tracking server's answer that it is busy or failing (a ``RestException`` is a server's
    answer; another MLflow error with status 500 may come from a local store, and is not)."""
    if type(err).__name__ == "RestException":
        status = err.get_http_status_code()
        if isinstance(status, int) and (status >= 500 or status == 429):
            return True
    return bool(_HTTP_TRANSIENT.search(str(err)))


def _chain(err: BaseException, depth: int = 8):
    """``err`` and what it was raised from or during (MLflow raises its own error inside an
    ``except`` without ``from``: the network error is only its context)."""
    seen = set()
    todo = [err]
    while todo and len(seen) < depth:
        link = todo.pop(0)
        if link is None or id(link) in seen:
            continue
        seen.add(id(link))
        yield link
        todo += [link.__cause__, link.__context__, getattr(link, "orig", None)]


def describe(err: BaseException) -> str:
    """The first line of an error's message, short enough for a one-line report."""
    text = one_line(str(err)).split(" [SQL:")[0]
    return (text[:300] + "...") if len(text) > 300 else text or type(err).__name__


class Notice:
    """``on_wait`` for ``with_retries``: one line when ``what`` stops answering, one when it is back
    (above any progress bar), so a campaign that waits says why."""

    def __init__(self, what: str):
        self.what, self.waiting = what, False

    def __call__(self, err: BaseException | None) -> None:
        from tqdm.auto import tqdm

        if err is not None and not self.waiting:
            tqdm.write(f"{self.what} does not answer ({describe(err)}); waiting for it")
        elif err is None and self.waiting:
            tqdm.write(f"{self.what} answers again")
        self.waiting = err is not None


def with_retries(
    call: Callable[[], T],
    retry_for_s: float = RETRY_FOR_S,
    on_wait: Callable[[BaseException | None], None] | None = None,
) -> T:
    """``call()``, again after each transient failure (pauses from 0.2 s doubling up to 5 s, with
    jitter so that workers do not return in step) until it succeeds or ``retry_for_s`` have passed
    since the first failure: then ``StoreOutage``. ``on_wait(err)`` is told each failure, and
    ``on_wait(None)`` once it succeeds again."""
    first, pause = None, FIRST_PAUSE_S
    while True:
        try:
            result = call()
        except Exception as err:
            if not is_transient(err):
                raise
            seen_away()
            now = time.monotonic()
            first = now if first is None else first
            if now - first >= retry_for_s:
                raise StoreOutage(
                    f"a store has not answered for {now - first:.0f} s ({describe(err)}): stopped; "
                    "run the same command again once it answers, to resume"
                ) from err
            if on_wait is not None:
                on_wait(err)
            time.sleep(pause * random.uniform(0.75, 1.25))
            pause = min(2 * pause, LONGEST_PAUSE_S)
            continue
        if first is not None:
            seen_away()  # back now: the outage lasted until here
            if on_wait is not None:
                on_wait(None)
        return result
