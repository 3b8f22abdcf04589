"""The Optuna storage of a campaign: opening it, and whether several processes may share it."""

from __future__ import annotations

import pickle

import optuna
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError

from nas.errors import UserError, explain_database_error
from nas.sqlite_tuning import tune_sqlite


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The Optuna storage at ``url`` (any SQLAlchemy URL); ``UserError`` naming it (password hidden)
    when its server cannot be reached. A sqlite file gets ``tune_sqlite``'s settings: Optuna commits
    every suggested parameter on its own, and with each commit waiting for the disk ~0.7 s of a
    psvit-digits trial went there, ~0.06 s with them. A server's pooled connections are checked
    before use, so that a restarted database costs a reconnect, not an error."""
    server = not url.startswith("sqlite:")
    try:
        storage = optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True} if server else None)
    except OperationalError as err:
        if not server:
            raise  # a file's problem: nas.errors tells it with the file's name
        raise UserError(f"Optuna storage {shown(url)}: {explain_database_error(err.orig or err)}") from None
    tune_sqlite(storage.engine)
    return storage


def reopened(storage: optuna.storages.RDBStorage) -> optuna.storages.RDBStorage:
    """The same storage on an engine of its own: what a forked process needs (the inherited pool
    holds its parent's connections). Optuna's storage pickles to its URL and settings; unpickled,
    it skips the schema checks of opening it anew (~0.02 s instead of ~0.4 s)."""
    copy = pickle.loads(pickle.dumps(storage))
    tune_sqlite(copy.engine)
    return copy


def is_shared(url: str) -> bool:
    """Whether several ``vitnas search`` processes may run one campaign on this study: on
    PostgreSQL (row locks, advisory locks, a server's clock). sqlite, and any other database, keep
    one process per campaign (``nas.search.lock``)."""
    try:
        return make_url(url).get_backend_name() == "postgresql"
    except ArgumentError:
        return False


def shown(url: str) -> str:
    """A database URL as it may be printed: its password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url
