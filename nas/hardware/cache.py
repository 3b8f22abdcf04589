"""Measured latencies in SQL, so that no campaign measures the same candidate twice.

One row per (architecture hash, fingerprint digest, target key), enforced by a unique constraint,
so campaigns on the same kind of machine share results and concurrent writers (several processes,
several machines on one PostgreSQL) cannot duplicate a row. Failed measurements are stored too, so
a candidate that runs out of memory is not retried forever; a failure never replaces a success.
The default is a sqlite file in the workspace (``nas.sqlite_tuning``: WAL, a busy timeout for
parallel writers); any SQLAlchemy URL works, e.g. ``postgresql+psycopg://user@host/vitnas``. A
server that cannot be reached when the cache opens is a one-line error; one that goes away later
(restarted) is waited for (``nas.retry``): a lookup or a store in the middle of a trial does not
fail the trial.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import (
    JSON,
    DateTime,
    Engine,
    String,
    Text,
    UniqueConstraint,
    case,
    create_engine,
    func,
    select,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from nas.errors import UserError, explain_database_error
from nas.hardware.fingerprint import Fingerprint
from nas.hardware.measure import MeasureResult
from nas.hardware.target import Target
from nas.retry import Notice, with_retries
from nas.sqlite_tuning import tune_sqlite

CACHE_FILE = "latency-cache.sqlite"
_PUT_ATTEMPTS = 2  # a lost insert race is retried once, as an update


class Base(DeclarativeBase):
    pass


class Measurement(Base):
    """One cached measurement; the latency statistics are columns so they can be queried in SQL."""

    __tablename__ = "latency_measurements"
    __table_args__ = (UniqueConstraint("arch_hash", "fingerprint", "target_key", name="uq_measurement_key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    arch_hash: Mapped[str] = mapped_column(String(128))
    fingerprint: Mapped[str] = mapped_column(String(64))
    target_key: Mapped[str] = mapped_column(String(256))
    status: Mapped[str] = mapped_column(String(16))  # "ok" or "failed"
    error: Mapped[str | None] = mapped_column(Text)
    median_ms: Mapped[float | None]
    p10_ms: Mapped[float | None]
    p90_ms: Mapped[float | None]
    mean_ms: Mapped[float | None]
    std_ms: Mapped[float | None]
    cv: Mapped[float | None]
    repeats: Mapped[int | None]
    record: Mapped[dict] = mapped_column(JSON)  # the full result, fingerprint and target
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


def default_url(workspace: str | Path = "vitnas-runs") -> str:
    return f"sqlite:///{Path(workspace) / CACHE_FILE}"


class ResultCache:
    """Latency results keyed by (arch hash, fingerprint, target); the table is created on first use."""

    def __init__(self, url: str | None = None, *, workspace: str | Path = "vitnas-runs"):
        self.url = url or default_url(workspace)
        self._engine = _engine(self.url)
        try:
            _create_table(self._engine)
        except OperationalError as err:
            if self._engine.dialect.name == "sqlite":
                raise  # a file's problem: nas.errors names it
            shown = self._engine.url.render_as_string(hide_password=True)
            raise UserError(f"latency cache {shown}: {explain_database_error(err.orig or err)}") from None
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        self._notice = Notice("the latency cache's database")

    def get(
        self, arch_hash: str, fingerprint: Fingerprint, target: Target, *, include_failed: bool = True
    ) -> MeasureResult | None:
        """The cached result, or None; ``include_failed=False`` treats a stored failure as absent."""

        def read():
            with self._sessions() as session:
                return session.scalar(_select_key(arch_hash, fingerprint, target))

        row = with_retries(read, on_wait=self._notice)
        if row is None or (row.status == "failed" and not include_failed):
            return None
        return MeasureResult.from_dict(row.record["result"])

    def put(self, arch_hash: str, fingerprint: Fingerprint, target: Target, result: MeasureResult) -> None:
        """Insert or replace (idempotent); a failure does not replace a stored success.

        Two writers may insert the same key at once: the unique constraint rejects the second,
        which then retries as an update.
        """
        with_retries(lambda: self._put(arch_hash, fingerprint, target, result), on_wait=self._notice)

    def _put(self, arch_hash: str, fingerprint: Fingerprint, target: Target, result: MeasureResult) -> None:
        for attempt in range(_PUT_ATTEMPTS):
            try:
                with self._sessions.begin() as session:
                    row = session.scalar(_select_key(arch_hash, fingerprint, target))
                    if row is None:
                        row = Measurement(
                            arch_hash=arch_hash, fingerprint=fingerprint.digest(), target_key=target.key()
                        )
                        session.add(row)
                    elif row.status == "ok" and not result.ok:
                        return
                    _fill(row, fingerprint, target, result)
                return
            except IntegrityError:
                if attempt == _PUT_ATTEMPTS - 1:
                    raise

    def stats(self) -> dict[str, int]:
        """Row counts: total, ok, failed, and distinct architectures, fingerprints and targets."""
        count = func.count
        query = select(
            count(),
            count(case((Measurement.status == "ok", 1))),
            count(Measurement.arch_hash.distinct()),
            count(Measurement.fingerprint.distinct()),
            count(Measurement.target_key.distinct()),
        )
        with self._sessions() as session:
            total, ok, archs, fingerprints, targets = session.execute(query).one()
        return {
            "total": total,
            "ok": ok,
            "failed": total - ok,
            "architectures": archs,
            "fingerprints": fingerprints,
            "targets": targets,
        }

    def close(self) -> None:
        self._engine.dispose()


def _select_key(arch_hash: str, fingerprint: Fingerprint, target: Target):
    return select(Measurement).where(
        Measurement.arch_hash == arch_hash,
        Measurement.fingerprint == fingerprint.digest(),
        Measurement.target_key == target.key(),
    )


def _fill(row: Measurement, fingerprint: Fingerprint, target: Target, result: MeasureResult) -> None:
    latency = result.latency
    row.status = "ok" if result.ok else "failed"
    row.error = result.error
    for name in ("median_ms", "p10_ms", "p90_ms", "mean_ms", "std_ms", "cv", "repeats"):
        setattr(row, name, getattr(latency, name) if latency else None)
    row.record = {"result": result.to_dict(), "fingerprint": fingerprint.to_dict(), "target": str(target)}
    row.created_at = datetime.now(timezone.utc)


def _engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError as err:
        raise UserError(f"bad cache URL {url!r}: {err}") from None
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed, pool_pre_ping=True)  # a restarted server costs a reconnect
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed)
    tune_sqlite(engine)
    return engine


def _create_table(engine: Engine, attempts: int = 5) -> None:
    """The table, created unless it exists. Processes opening a new cache together race: another
    one may create the table between the existence check and CREATE TABLE, or hold the file's lock
    while it does; the next attempt finds the table."""
    for attempt in range(1, attempts + 1):
        try:
            Base.metadata.create_all(engine)
            return
        except DBAPIError:
            if attempt == attempts:
                raise
            time.sleep(0.05 * attempt)
