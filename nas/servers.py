"""A tracking server or database that is not there, told in one line before any work starts.

MLflow's client retries a refused connection with growing pauses for about four minutes, and its
database store retries connecting for most of an hour; a wrong port, host or password is the
user's to fix, and is better said at once. Of a tracking server only the network is checked (a
TCP connection): what it then answers (authentication, versions) is MLflow's to tell.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

from nas.errors import UserError

CONNECT_TIMEOUT_S = 10.0


def require_reachable(url: str, what: str = "MLflow server") -> None:
    """``UserError`` unless a TCP connection to the host and port of ``url`` (http or https) opens."""
    parts = urlsplit(url)
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        host = None
    if not host:
        raise UserError(f"{what} {url!r}: not a server address (expected http://HOST:PORT)")
    shown = parts._replace(netloc=f"{host}:{port}").geturl()  # without any user or password
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        raise UserError(
            f"{what} {shown}: cannot connect ({reason}); is it running, on that host and port?"
        ) from None


def require_database(url: str, what: str = "tracking store") -> None:
    """``UserError`` unless the database server at the SQLAlchemy ``url`` accepts a connection."""
    from sqlalchemy import create_engine
    from sqlalchemy.exc import ArgumentError, OperationalError
    from sqlalchemy.pool import NullPool

    from nas.errors import explain_database_error

    try:
        engine = create_engine(url, poolclass=NullPool)
    except ArgumentError as err:
        raise UserError(f"{what} {url!r}: not a database URL ({err})") from None
    try:
        engine.connect().close()
    except OperationalError as err:
        shown = engine.url.render_as_string(hide_password=True)
        raise UserError(f"{what} {shown}: {explain_database_error(err.orig or err)}") from None
    finally:
        engine.dispose()
