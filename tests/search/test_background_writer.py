"""The background writer: a child process that handles messages in order, pauses on demand,
reports its errors to the campaign, ignores Ctrl-C and dies with its parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from functools import partial
from pathlib import Path

import pytest

from nas.errors import UserError
from nas.search.background_writer import BackgroundWriter


class FileLog:
    """A handler that appends what it is told to a file (the test reads it back)."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, text: str) -> None:
        with open(self.path, "a") as f:
            f.write(text + "\n")

    def sleep(self, seconds: float) -> None:
        self.write("sleeping")
        time.sleep(seconds)

    def fail(self, user: bool) -> None:
        raise (UserError if user else ValueError)("the store refused")


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def log(tmp_path) -> Path:
    return tmp_path / "log.txt"


@pytest.fixture
def writer(log):
    w = BackgroundWriter(partial(FileLog, log))
    yield w
    w.close()


def test_messages_are_handled_in_order_by_another_process(writer, log):
    for i in range(50):
        writer.submit("write", str(i))
    writer.drain()
    assert lines(log) == [str(i) for i in range(50)]
    assert writer._process.pid != os.getpid()


def test_nothing_is_handled_while_paused(writer, log):
    writer.submit("write", "before")
    writer.drain()
    with writer.paused():
        writer.submit("write", "during")
        time.sleep(0.5)  # room for a writer that ignored the pause (not a timing assertion)
        assert lines(log) == ["before"]
    writer.drain()
    assert lines(log) == ["before", "during"]


@pytest.mark.parametrize("user", [True, False])
def test_the_first_error_is_raised_in_the_campaign_and_later_messages_are_dropped(writer, log, user):
    writer.submit("write", "kept")
    writer.submit("fail", user)
    writer.submit("write", "dropped")
    with pytest.raises(UserError if user else RuntimeError, match="the store refused"):
        writer.drain()
    with pytest.raises(UserError if user else RuntimeError):
        writer.submit("write", "refused")
    assert lines(log) == ["kept"]


def test_ctrl_c_does_not_stop_the_writer(writer, log):
    os.kill(writer._process.pid, signal.SIGINT)
    writer.submit("write", "after Ctrl-C")
    writer.drain()
    assert lines(log) == ["after Ctrl-C"]


@pytest.fixture
def ctrl_c_raises():
    """Ctrl-C raises KeyboardInterrupt, even where the tests run with SIGINT ignored (a script's background job)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_ends_a_wait_cleanly_and_the_writer_goes_on(writer, log, ctrl_c_raises):
    """Ctrl-C while draining or waiting to pause: KeyboardInterrupt, and the queue still works."""
    writer.submit("sleep", 1.0)
    while lines(log) != ["sleeping"]:
        time.sleep(0.01)
    for wait in (writer.drain, writer.paused().__enter__):
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            wait()
    writer.submit("write", "after")
    writer.drain()
    assert lines(log) == ["sleeping", "after"]
    with writer.paused():  # the gate was not left taken
        pass


def test_a_writer_that_died_is_reported(writer, log):
    writer.submit("sleep", 600)
    while lines(log) != ["sleeping"]:  # it holds the gate now
        time.sleep(0.01)
    os.kill(writer._process.pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match="record writer died"):
        with writer.paused():
            pass
    with pytest.raises(RuntimeError, match="record writer died"):
        writer.drain()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="dying with the parent is Linux's prctl")
def test_the_writer_dies_with_a_killed_campaign(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, time
        from functools import partial
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_background_writer import FileLog
        from nas.search.background_writer import BackgroundWriter
        w = BackgroundWriter(partial(FileLog, {str(tmp_path / 'log.txt')!r}))
        print(w._process.pid, flush=True)
        time.sleep(600)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.05)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# -- a store that goes away ------------------------------------------------------------------------
class HttpStore:
    """A handler that posts each record to an HTTP server on 127.0.0.1 (a tracking server's stand-in:
    a real socket, refused while nothing listens)."""

    def __init__(self, port: int):
        self.port = port

    def post(self, text: str) -> None:
        import requests

        requests.post(f"http://127.0.0.1:{self.port}/", data=text, timeout=5).raise_for_status()


class Received:
    """The HTTP server that receives the records, on a port chosen before it listens."""

    def __init__(self):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.records: list[str] = []

    def listen(self):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        records = self.records

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                records.append(self.rfile.read(int(self.headers["Content-Length"])).decode())
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_records_wait_for_a_store_that_is_away_and_are_written_once_it_is_back():
    store = Received()
    writer = BackgroundWriter(partial(HttpStore, store.port))
    try:
        for i in range(5):
            writer.submit("post", str(i))  # nothing listens: queued, the first one retried
        time.sleep(1)  # (the writer meets the refusal meanwhile)
        assert writer.backlog() == 5 and store.records == []
        store.listen()
        writer.drain()
        assert store.records == [str(i) for i in range(5)]  # in order, each once
    finally:
        writer.close()
        if hasattr(store, "server"):
            store.server.shutdown()


def test_past_its_bound_the_queue_stops_the_campaign_in_one_line():
    from nas.retry import StoreOutage

    writer = BackgroundWriter(partial(HttpStore, Received().port), max_backlog=4)
    try:
        for i in range(4):
            writer.submit("post", str(i))
        with pytest.raises(StoreOutage, match=r"records are 2 trials behind: a store has not answered for \d+ s "
                                              r"\(.*Connection refused.*\); stopped: run the same command again"):  # fmt: skip
            writer.submit("post", "4")
    finally:
        writer.abort()  # it would wait for the store for minutes
