"""Weights on disk are safetensors, always: never a pickle a user could have been handed."""

from __future__ import annotations

import hashlib
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from nas.errors import UserError


def save_weights(
    model_or_state: nn.Module | dict, path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> nn.Module:
    """Load a safetensors file into ``model``; a mismatch is a one-line error naming the keys."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such weights file")
    state = load_file(str(path))
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor of the wrong shape
        raise UserError(
            f"{path}: weights do not fit this architecture ({str(err).splitlines()[-1].strip()})"
        ) from None
    problems = [
        f"missing {', '.join(result.missing_keys[:5])}" if result.missing_keys else "",
        f"unexpected {', '.join(result.unexpected_keys[:5])}" if result.unexpected_keys else "",
    ]
    if strict and any(problems):
        raise UserError(
            f"{path}: weights do not fit this architecture ({'; '.join(p for p in problems if p)})"
        )
    return model


def file_hash(path: str | Path) -> str:
    """16 hex digits of SHA-256 of a file's bytes (checkpoints are identified by content)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]
