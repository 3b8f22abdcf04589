"""One process per campaign: the lock a search holds from before its first write to its end.

Two processes writing one campaign corrupt it: Optuna numbers their trials in one sequence while
each believes it is alone, a resuming process fails the other's running trials as interrupted,
and on a new workspace both migrate the new MLflow and Optuna databases at once (alembic's
``table _alembic_tmp_experiments already exists``). So a search takes this lock before it opens
(and so creates) any store, and a second process stops at once, naming who holds it:

- the study in a sqlite file (the default): an advisory ``flock`` on ``<folder of the sqlite
  file>/locks/<campaign>.lock`` (``WORKSPACE/locks/`` by default), a file that holds the
  holder's host, pid and start time as JSON for the message. The kernel drops the lock when its
  process ends, however it ends, so a killed search leaves nothing stale behind.
- the study on PostgreSQL: a session advisory lock (``pg_try_advisory_lock``) on a hash of the
  campaign name, on a connection held open for the whole run (the server drops it with the
  session); the holder is named through its connection's ``application_name``. There, several
  local ``vitnas search`` processes may run one campaign together (``nas.search.workers``): they
  take the lock ``shared``, which keeps out only a process that takes it alone (a Ray driver).
  A restarted server drops the lock with the session; the run goes on without it.
- any other database: the ``flock`` in the workspace.

Reentrant within a process: a caller may take the lock early (before loading a supernet, say)
and ``run_campaign`` then takes it again for free.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from functools import partial
from pathlib import Path

from nas.errors import UserError

LOCKS = "locks"
#: ``application_name`` of a PostgreSQL lock holder (pid, start in Unix seconds, host): the server
#: keeps 63 bytes of it.
_PG_APP = "vitnas {pid} {start} {host}"
_HELD: dict[tuple[str, str], int] = {}  # (kind, key) -> depth, for this process


@contextmanager
def campaign_lock(name: str, storage: str, workspace: str | Path, shared: bool = False) -> Iterator[None]:
    """Hold the lock of campaign ``name`` (its Optuna study at the SQLAlchemy URL ``storage``)
    inside the block; ``UserError`` naming the holder when another process has it. ``shared``:
    on PostgreSQL, other shared holders are welcome (elsewhere the lock is always exclusive)."""
    backend = storage.split(":", 1)[0].split("+", 1)[0].lower()
    if backend in ("postgresql", "postgres"):
        kind, key = "pg-shared" if shared else "pg", f"{storage}\n{name}"
        lock = partial(_pg_lock, shared=shared)
    else:
        key = str(lock_path(name, storage, workspace))
        kind, lock = "file", _file_lock
    if (kind, key) in _HELD:
        _HELD[(kind, key)] += 1
        try:
            yield
        finally:
            _HELD[(kind, key)] -= 1
        return
    with lock(name, key):
        _HELD[(kind, key)] = 1
        try:
            yield
        finally:
            del _HELD[(kind, key)]


def lock_path(name: str, storage: str, workspace: str | Path) -> Path:
    """The lock file of a campaign: beside its sqlite study (so two workspaces sharing one study file
    share the lock), in the workspace for other databases. Names that are not plain file names get
    a digest, so two names never share a file."""
    folder = Path(workspace)
    if storage.startswith("sqlite:"):
        from sqlalchemy.engine import make_url

        db = make_url(storage).database
        if db and db != ":memory:":
            folder = Path(db).resolve().parent
    safe = re.sub(r"[^\w.-]", "_", name)[:100]
    if safe != name:
        safe += "-" + hashlib.sha256(name.encode()).hexdigest()[:12]
    return folder / LOCKS / f"{safe}.lock"


def _holder() -> dict:
    """This process as the lock's holder: host, pid, since when (local time, with its offset)."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def _busy(name: str, holder: dict | None, rule: str = "one process per campaign") -> UserError:
    who = f"pid {holder['pid']} on {holder['host']} since {holder['since']}" if holder else "another process"
    return UserError(
        f"campaign {name!r} is being run by {who}: {rule}; "
        "wait for it to end (or stop it), then run the same command to resume"
    )


# -- a sqlite study: flock ---------------------------------------------------------------------
@contextmanager
def _file_lock(name: str, path: str) -> Iterator[None]:
    file = Path(path)
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children
    except OSError as err:
        raise UserError(f"cannot create the campaign's lock file {file}: {err.strerror}") from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(name, _read_holder(fd)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"campaign": name, **_holder()}).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # free: nobody to name (a forked child sharing the lock ends with it)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _read_holder(fd: int, attempts: int = 20) -> dict | None:
    """The holder's record; it is written right after the lock is taken, so an empty file is
    read again a few times."""
    for _ in range(attempts):
        try:
            record = json.loads(os.pread(fd, 4096, 0) or b"null")
        except ValueError:
            record = None
        if isinstance(record, dict) and {"host", "pid", "since"} <= set(record):
            return record
        time.sleep(0.05)
    return None


# -- a PostgreSQL study: an advisory lock ------------------------------------------------------
def pg_key(name: str) -> int:
    """The advisory lock key of a campaign: 63 bits of a digest of its name (never negative, so
    ``pg_locks`` shows it as ``classid = key >> 32``, ``objid = key & 0xffffffff``)."""
    return int.from_bytes(hashlib.sha256(f"vitnas.campaign:{name}".encode()).digest()[:8], "big") >> 1


@contextmanager
def _pg_lock(name: str, key: str, shared: bool) -> Iterator[None]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import DBAPIError, OperationalError
    from sqlalchemy.pool import NullPool

    from nas.errors import explain_database_error
    from nas.search.storage import shown

    storage = key.split("\n", 1)[0]
    engine = create_engine(storage, poolclass=NullPool)
    lock, suffix = pg_key(name), "_shared" if shared else ""
    try:
        try:
            conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        except OperationalError as err:  # before anything runs: told at once, naming the store
            raise UserError(
                f"Optuna storage {shown(storage)}: {explain_database_error(err.orig or err)}"
            ) from None
        # autocommit: a session lock outlives transactions, and none is left open for hours
        with conn:
            app = _PG_APP.format(pid=os.getpid(), start=int(time.time()), host=socket.gethostname())[:63]
            conn.execute(text("select set_config('application_name', :app, false)"), {"app": app})
            if not conn.execute(text(f"select pg_try_advisory_lock{suffix}(:k)"), {"k": lock}).scalar():
                rule = "its local workers and a Ray driver cannot run it at once" if shared else _PG_RULE
                raise _busy(name, _pg_holder(conn, lock), rule)
            try:
                yield
            finally:
                with contextlib.suppress(DBAPIError):  # a restarted server ended the session, and the lock
                    conn.execute(text(f"select pg_advisory_unlock{suffix}(:k)"), {"k": lock})
    finally:
        engine.dispose()


#: Why a Ray driver is refused on a PostgreSQL campaign that another process runs.
_PG_RULE = "a Ray campaign runs alone (several local `vitnas search` workers may share one)"


def _pg_holder(conn, lock: int) -> dict | None:
    """Who holds the lock, from the holder's ``application_name`` (or its server session)."""
    from sqlalchemy import text

    row = conn.execute(
        text(
            "select a.application_name, a.client_addr, a.backend_start from pg_locks l "
            "join pg_stat_activity a on a.pid = l.pid where l.locktype = 'advisory' and l.granted "
            "and l.classid = cast(:hi as oid) and l.objid = cast(:lo as oid) and l.objsubid = 1"
        ),
        {"hi": lock >> 32, "lo": lock & 0xFFFFFFFF},
    ).first()
    if row is None:
        return None
    found = re.fullmatch(r"vitnas (\d+) (\d+) (.*)", row.application_name or "")
    if found:
        since = datetime.fromtimestamp(int(found[2])).astimezone().isoformat(timespec="seconds")
        return {"pid": int(found[1]), "since": since, "host": found[3]}
    since = row.backend_start.astimezone().isoformat(timespec="seconds") if row.backend_start else "?"
    return {"pid": "?", "host": row.client_addr or "the database host", "since": since}
