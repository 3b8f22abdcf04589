"""Writing a file whole or not at all, with the permissions a plain write would give it.

A temporary file beside the target and a rename: a reader, or a kill mid-write, never sees half a
file. safetensors and ``tempfile`` create files 0600; the rename would carry that over, so the
temporary file gets the mode the user's umask gives any new file (0644 with the usual 022).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()


def write_atomically(path: str | Path, write: Callable[[str], None]) -> Path:
    """``write(temporary path)``, then rename it onto ``path`` (its folder is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(str(tmp))
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
