"""Writing a file whole or not at all, with the permissions a plain write would give it.

A temporary file beside the target and a rename: a reader, or a kill mid-write, never sees half a
file. safetensors and ``tempfile`` create files 0600; the rename would carry that over, so the
temporary file gets the mode the user's umask gives any new file (0644 with the usual 022).
"""

from __future__ import annotations

import os
import shutil
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


def freeze(sources: dict[str, Path], folder: Path) -> Path:
    """A folder holding ``sources`` (name -> file) as they are now, made once: each file hard-linked
    (a later atomic rewrite of the source gives the source a new inode and leaves the link as it
    was), or copied where a link cannot be made (another filesystem). An existing ``folder`` is
    taken as is: name it by the content's hash. Built beside ``folder`` and renamed into place, so
    a reader never sees part of it."""
    folder = Path(folder)
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    tmp.mkdir(exist_ok=True)
    try:
        for name, source in sources.items():
            target = tmp / name
            target.unlink(missing_ok=True)
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not folder.is_dir():  # another process froze the same content first: theirs stands
            raise
    return folder
