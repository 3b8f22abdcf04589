"""The device a run computes on, named as a flag names it: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

One grammar for every device flag (``vitnas train --device``, ``vitnas search --eval-device``), and a
device this machine lacks is a one-line ``UserError`` before any work, not a CUDA error from deep
inside torch at the first tensor moved.
"""

from __future__ import annotations

import re

import torch

from nas.errors import UserError

_CUDA = re.compile(r"cuda(?::(\d+))?")


def resolve_device(spec: str, *, flag: str = "--device") -> torch.device:
    """The ``torch.device`` that ``spec`` names on this machine: ``auto`` is the first GPU when CUDA is
    available, else the CPU; ``cuda`` is ``cuda:0``. ``flag`` is the option named in errors."""
    text = spec.strip()
    if text == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = _CUDA.fullmatch(text)
    if match is None:
        raise UserError(f"{flag} {spec!r}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        why = "a build without CUDA" if torch.version.cuda is None else "no GPU found"
        raise UserError(
            f"{flag} {text}: CUDA is not available on this machine (torch {torch.__version__}, {why}); "
            f"use {flag} cpu"
        )
    index, count = int(match[1] or 0), torch.cuda.device_count()
    if index >= count:
        raise UserError(f"{flag} {text}: no GPU {index} here ({count} found: cuda:0 to cuda:{count - 1})")
    return torch.device("cuda", index)
