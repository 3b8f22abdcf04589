"""Errors that reach the user, and the one line each known kind of failure is told in.

``UserError`` is raised by vitnas itself for bad input. ``failure_line`` also turns failures of
the machine rather than of vitnas (a read-only or full disk, a path through a file, a database
that cannot be opened or reached, a tracking server that does not answer, a weights file that is
not safetensors) into one line; anything else is a bug and keeps its traceback. Imports stay
light: the CLI reads this before anything heavy loads.
"""

from __future__ import annotations

import errno
import re

#: errno values of OSErrors that are the machine's or the user's doing, never vitnas's
_OS_ERRNOS = {
    errno.EACCES: "",
    errno.EPERM: "",
    errno.EROFS: "",
    errno.ENOSPC: " (free some space, or choose another location)",
    errno.EDQUOT: " (free some space, or choose another location)",
    errno.ENOTDIR: " (a part of that path is a file, not a folder)",
    errno.EISDIR: " (a folder where a file was expected)",
    errno.EFBIG: "",
    errno.ENAMETOOLONG: "",
    errno.ELOOP: "",
    errno.EIO: "",
}
#: sqlite's messages for a database file it cannot use, with what usually causes them
_SQLITE_HINTS = {
    "unable to open database file": "a missing or read-only folder? sqlite writes -wal/-shm files beside it",
    "attempt to write a readonly database": "the file or its folder is read-only",
    "database or disk is full": "no space left",
    "disk i/o error": "",
    "file is not a database": "not a sqlite file, or a corrupted one",
    "database is locked": "another process holds it",
}


class UserError(Exception):
    """An error in what the user gave (a file, a flag, a value): shown as one line, no traceback."""


def one_line(text: str) -> str:
    """Newlines and the indentation after them collapsed into single spaces."""
    return re.sub(r"\s*\n\s*", " ", str(text)).strip()


def failure_line(err: BaseException, where: str | None = None) -> str | None:
    """The one line to tell the user about ``err``, or None when it is not a known kind of failure
    (a bug: its traceback must stay visible). ``where``: the store or workspace the command used,
    named when the error itself names no file (sqlite's do not).

    Follows explicit causes (``raise ... from err``: MLflow wraps database errors so) but not the
    implicit context, where an unrelated earlier error would hide a bug.
    """
    seen = 0
    current: BaseException | None = err
    while current is not None and seen < 8:
        line = _known(current, where)
        if line is not None:
            return line
        current, seen = current.__cause__, seen + 1
    return None


def _known(err: BaseException, where: str | None) -> str | None:
    if isinstance(err, UserError):
        return one_line(err)
    if isinstance(err, OSError) and err.errno in _OS_ERRNOS:
        path = err.filename if err.filename is not None else where
        target = f" -> {err.filename2}" if err.filename2 is not None else ""
        prefix = f"{path}{target}: " if path is not None else ""
        return f"{prefix}{err.strerror or err}{_OS_ERRNOS[err.errno]}"
    kind = type(err)
    if kind.__name__ == "SafetensorError":  # safetensors' one error class (header, offsets, I/O)
        return f"{where + ': ' if where else ''}not a readable safetensors file ({one_line(err)})"
    if kind.__name__ in ("MlflowException", "RestException"):
        from nas.retry import describe, is_transient

        if is_transient(err):  # a tracking server that went away or keeps failing, not a bug of vitnas
            return f"MLflow{' at ' + where if where else ''}: {describe(err)}"
    if kind.__name__ == "OperationalError" and kind.__module__.startswith(("sqlalchemy", "sqlite3")):
        # the database could not be used (opened, written, reached), not a wrong query of vitnas's
        orig = getattr(err, "orig", None) or err
        place = f"database in {where}" if where else "database"
        return f"{place}: {explain_database_error(orig)}"
    return None


def explain_database_error(err: BaseException) -> str:
    """A database driver's message on one line (without the SQL), with sqlite's usual cause."""
    reason = one_line(err).split(" [SQL:")[0]
    hint = _SQLITE_HINTS.get(reason.lower(), "")
    return reason + (f" ({hint})" if hint else "")
