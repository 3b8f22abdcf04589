"""Store writes off a search's critical path: a child process runs them in order, paused on demand.

A trial's records are many small ORM transactions (Optuna writes each parameter with its own
queries; an MLflow child run takes five writes): ~40-50 ms of CPU a trial, on a small space a
fifth of it. A thread would not hide that cost, because the writes hold the GIL that the
campaign's own Python work (model extraction, FLOP tracing, the timing loop) needs; a process of
its own runs them on a core the campaign leaves idle. It pauses while latency is measured
(``paused``), so a measurement never shares the machine with a database write.

Messages run one at a time in submission order, so a campaign's ordering rules hold on disk. The
child is made by ``handler_factory()`` once it has started (``gate_calls``: by
``handler_factory(gate)``, and the handler wraps its stores in ``Gated(store, gate)``, so that a
measurement waits for one store call rather than a whole message: a trial's records on a server
take dozens of calls), gets ``(method, args)`` messages,
ignores Ctrl-C (the campaign decides when to stop it; a terminal sends SIGINT to both) and dies
with its parent (Linux). The first message that raises stops the writing; its error is raised in
the campaign at the next ``submit`` or ``drain``.

A store that goes away (a database restarted, a tracking server down) is waited for
(``nas.retry``): the message is tried again with growing pauses, outside the pause gate, so
measurements go on, and the campaign goes on queueing. The queue is bounded: past ``max_backlog``
messages waiting on a store that does not answer, ``submit`` raises ``StoreOutage`` and the
campaign stops (the trials not yet written run again on resume). ``lag``: while the writer is
working but behind (starved of CPU by other processes), ``submit`` waits until it is at most this
many messages behind, so that what the campaign told reaches the stores within a trial or two.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

from nas.errors import UserError
from nas.retry import RETRY_FOR_S, StoreOutage, describe, with_retries

#: The child's scheduling priority: lowest, so it writes with the CPU time scoring leaves idle
#: (at the default priority it took a fifth of the cores while subnets were evaluated).
NICENESS = 19
#: How often a wait on the child checks that it is still alive (seconds).
_POLL_S = 0.5
#: Messages queued behind a store that does not answer before the campaign stops (two a trial).
MAX_BACKLOG = 512
_PR_SET_PDEATHSIG = 1


def _context():
    """fork where the platform has it: the child starts in milliseconds with everything imported
    (it never touches torch); spawn elsewhere."""
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def _die_with_parent(parent: int) -> None:
    """Ask Linux to kill this process when its parent dies: a killed campaign's writes stop at once.
    A parent killed before the request was made (a busy machine starts the child late) is already
    gone: then the child ends here."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(0)


@contextmanager
def _sigint_deferred() -> Iterator[list]:
    """Ctrl-C recorded, not raised, inside the block; raised as usual when it ends. Queue and lock
    calls are not safe against an interruption half-way (a lock taken and never released, half a
    message read from a pipe), so the campaign makes them here; a wait inside can give up early
    by checking the list it gets (non-empty: Ctrl-C was pressed). A handler swap rather than a
    signal mask: any thread may receive the signal, Python runs handlers in the main thread."""
    pressed: list = []
    if threading.current_thread() is not threading.main_thread():  # Ctrl-C never lands here
        yield pressed
        return
    previous = signal.signal(signal.SIGINT, lambda *_: pressed.append(True))
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)
        if pressed and callable(previous):
            previous(signal.SIGINT, None)


def _lowest_priority() -> None:
    """Run only on CPU time nothing else wants: Linux's idle scheduling class, else the lowest nice."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(NICENESS)


class _Progress:
    """What the child shares with the campaign: messages handled, and since when (wall clock) it has
    been waiting for a store, with that store's last error."""

    def __init__(self, ctx):
        self.handled = ctx.Value("q", 0)
        self.stalled_since = ctx.Value("d", 0.0)
        self.error = ctx.Array("c", 400)

    def waiting(self, err: BaseException | None) -> None:
        if err is None:
            self.stalled_since.value = 0.0
            return
        if not self.stalled_since.value:
            self.stalled_since.value = time.time()
        self.error.value = describe(err).encode()[:399]


def _serve(
    handler_factory: Callable[..., object],
    jobs,
    replies,
    gate,
    progress: _Progress,
    retry_for_s: float,
    parent: int,
    gate_calls: bool,
):
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _lowest_priority()
    failed = False
    try:  # at the lowest priority this may run late, when a store has gone away: waited for too
        factory = partial(handler_factory, gate) if gate_calls else handler_factory
        handler = with_retries(partial(_gated, gate, factory), retry_for_s, progress.waiting)
    except BaseException as err:  # noqa: BLE001 - reported to the campaign
        replies.put(("error", str(err), isinstance(err, UserError)))
        failed = True
    while True:
        message = jobs.get()
        if message is None:
            return
        method, args = message
        if method == "sync":
            replies.put(("synced", args))
            continue
        if not failed:  # after a failure the rest is dropped: writing out of order would be worse
            try:
                call = partial(getattr(handler, method), *args)
                with_retries(
                    call if gate_calls else partial(_gated, gate, call), retry_for_s, progress.waiting
                )
            except BaseException as err:  # noqa: BLE001 - reported to the campaign
                user = isinstance(err, UserError)  # told as is: its message is the whole story
                replies.put(("error", str(err) if user else f"{type(err).__name__}: {err}", user))
                failed = True
        with progress.handled.get_lock():
            progress.handled.value += 1


def _gated(gate, call: Callable):
    with gate:
        return call()


class Gated:
    """``target`` with every method call made while holding ``gate`` (the writer's pause gate)."""

    def __init__(self, target, gate):
        self._target, self._gate = target, gate

    def __getattr__(self, name: str):
        value = getattr(self._target, name)
        return partial(self._call, value) if callable(value) else value

    def _call(self, method: Callable, *args, **kwargs):
        with self._gate:
            return method(*args, **kwargs)


class BackgroundWriter:
    """An ordered message queue served by a child process."""

    def __init__(
        self,
        handler_factory: Callable[..., object],
        name: str = "vitnas-writer",
        *,
        retry_for_s: float = RETRY_FOR_S,
        max_backlog: int = MAX_BACKLOG,
        lag: int | None = None,
        gate_calls: bool = False,
    ):
        ctx = _context()
        self._jobs, self._replies, self._gate = ctx.Queue(), ctx.Queue(), ctx.Lock()
        self._progress = _Progress(ctx)
        self._process = ctx.Process(
            target=_serve,
            args=(
                handler_factory,
                self._jobs,
                self._replies,
                self._gate,
                self._progress,
                retry_for_s,
                os.getpid(),
                gate_calls,
            ),
            name=name,
            daemon=True,
        )
        with _sigint_deferred():  # not interrupted half-way; the child ignores Ctrl-C from its start
            self._process.start()
        self._syncs = self._submitted = 0
        self._max_backlog, self._lag = max_backlog, lag
        self._failure: tuple | None = None

    def _raise(self, reply: tuple) -> None:
        self._failure = reply  # raised again by every later call: nothing more gets written
        _, message, user_error = reply
        if user_error:
            raise UserError(message)
        raise RuntimeError(f"writing the campaign's records failed: {message}")

    def submit(self, method: str, *args) -> None:
        """Queue ``handler.method(*args)``; raises the error of an earlier message instead, if one failed."""
        with _sigint_deferred():
            if self._failure is None:
                try:
                    reply = self._replies.get_nowait()
                except queue.Empty:
                    reply = None
                if reply is not None and reply[0] == "error":  # (a "synced" of an interrupted drain is stale)
                    self._failure = reply
        if self._failure is not None:
            self._raise(self._failure)
        self._wait_for_room()
        with _sigint_deferred():
            self._jobs.put((method, args))
            self._submitted += 1

    def backlog(self) -> int:
        """Messages submitted and not yet handled."""
        return self._submitted - self._progress.handled.value

    def _wait_for_room(self) -> None:
        """Past ``max_backlog`` with the writer waiting for a store: ``StoreOutage``. Behind by more
        than ``lag`` (or ``max_backlog``) while it writes: wait for it."""
        while True:
            backlog, since = self.backlog(), self._progress.stalled_since.value
            if since and backlog >= self._max_backlog:
                error = self._progress.error.value.decode(errors="replace")
                raise StoreOutage(
                    f"the campaign's records are {backlog // 2} trials behind: a store has not answered for "
                    f"{time.time() - since:.0f} s ({error}); stopped: run the same command again once it "
                    "answers, to resume (the trials not yet recorded run again)"
                )
            if backlog < self._max_backlog and (since or self._lag is None or backlog <= self._lag):
                return
            self._check_alive()
            time.sleep(0.02)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No message (``gate_calls``: no store call) is handled inside this block (one under way is
        let finish first)."""
        acquired = False
        try:
            with _sigint_deferred() as pressed:
                while not pressed and not (acquired := self._gate.acquire(timeout=_POLL_S)):
                    self._check_alive()
            yield
        finally:
            if acquired:
                with _sigint_deferred():
                    self._gate.release()

    def drain(self) -> None:
        """Wait until every submitted message has been handled; raise the first error, if any.
        Ctrl-C stops the wait (the writer goes on)."""
        if self._failure is not None:
            self._raise(self._failure)
        with _sigint_deferred() as pressed:
            self._syncs += 1
            self._jobs.put(("sync", self._syncs))
            while not pressed:
                try:
                    reply = self._replies.get(timeout=_POLL_S)
                except queue.Empty:
                    self._check_alive()
                    continue
                if reply[0] == "error":
                    self._failure = reply
                    break
                if reply == ("synced", self._syncs):
                    return
        if self._failure is not None:
            self._raise(self._failure)

    def _check_alive(self) -> None:
        if not self._process.is_alive():
            raise RuntimeError(
                f"the campaign's record writer died (exit code {self._process.exitcode}); "
                "run the same command again to resume"
            )

    def close(self) -> None:
        """Handle what is queued, then end the child (errors are left to ``drain``)."""
        if self._process.is_alive():
            self._jobs.put(None)
            self._process.join()
        self._jobs.close()
        self._replies.close()

    def abort(self) -> None:
        """End the child now, dropping what is queued (it may be waiting for a store that is away)."""
        self._process.kill()
        self._process.join()
        self._jobs.cancel_join_thread()  # messages still in the pipe are dropped, not flushed
        self.close()
