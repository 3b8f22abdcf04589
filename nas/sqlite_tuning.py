"""SQLite settings for the stores a campaign writes on every trial: the Optuna study, the MLflow
store and the latency cache. Each commits small transactions every trial, and by default each
commit waits for the disk.

Write-ahead log with ``synchronous=NORMAL``: a commit survives a killed process (what resuming a
campaign relies on), only a power cut can drop the last ones; readers (the dashboard, the MLflow
UI, a resumed run) no longer block the writer. A busy timeout makes parallel writers (several
campaigns on one workspace) wait for each other instead of failing. WAL needs a local disk, as
sqlite does anyway.
"""

from __future__ import annotations

import sqlite3
import time

from sqlalchemy import event
from sqlalchemy.engine import Engine

BUSY_TIMEOUT_MS = 60_000


def tune_sqlite(engine: Engine) -> None:
    """Apply the settings to every connection ``engine`` opens from now on (sqlite engines only)."""
    if engine.dialect.name != "sqlite" or event.contains(engine, "connect", _pragmas):
        return
    event.listen(engine, "connect", _pragmas)
    engine.dispose()  # pooled connections opened before lack the settings


def _pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    _switch_to_wal(cursor)
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _switch_to_wal(cursor, attempts: int = 100) -> None:
    """``journal_mode=WAL``, retried while another process holds the file: switching a new file
    fails at once with "database is locked" instead of waiting for the busy timeout."""
    for attempt in range(1, attempts + 1):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or attempt == attempts:
                raise
            time.sleep(0.02)
