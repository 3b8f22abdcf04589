"""Weights on disk are safetensors, always: never a pickle a user could have been handed.

Every read goes through ``read_tensors``: a file that is not readable safetensors (truncated,
overwritten), that no longer matches the hash recorded for it, or whose parameters hold NaN or
infinite values is refused in one line naming the file (and the tensor): weights that were
corrupted must never be scored, exported or trained on silently.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from nas.errors import UserError, one_line
from nas.files import write_atomically

#: file_hash results by (path, inode, size, mtime): a checkpoint is hashed once per process
_HASHES: dict[tuple, str] = {}
_SETTLED_NS = 3_000_000_000


def save_weights(
    model_or_state: nn.Module | dict, path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    return write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors header's metadata; ``UserError`` when the file is missing (weights are read
    from local files only, never fetched) or not readable safetensors."""
    if not Path(path).is_file():
        raise UserError(f"{path}: no such weights file (weights are read from local files only)")
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except SafetensorError as err:
        raise UserError(
            f"{path}: not a readable safetensors file ({one_line(err)}; truncated or corrupted?)"
        ) from None


def check_file(path: Path, expect_hash: str | None = None, recorded_in: str | Path | None = None) -> None:
    """``UserError`` unless ``path`` is a readable safetensors file whose ``file_hash`` is
    ``expect_hash`` (when given), the hash recorded in ``recorded_in`` (a sidecar, a recipe)."""
    read_metadata(path)  # a missing or truncated file fails here, before it is hashed
    if expect_hash:
        actual = file_hash(path)
        if actual != expect_hash:
            raise UserError(
                f"{path}: does not match the hash recorded in {recorded_in or 'its record'} "
                f"(file {actual}, recorded {expect_hash}; corrupted or replaced?)"
            )


def read_tensors(
    path: str | Path,
    device: str | torch.device = "cpu",
    *,
    expect_hash: str | None = None,
    recorded_in: str | Path | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, after checking that it parses and, with ``expect_hash``,
    that its ``file_hash`` is the one recorded in ``recorded_in`` (a sidecar, a recipe)."""
    path = Path(path)
    check_file(path, expect_hash, recorded_in)
    try:
        return load_file(str(path), device=str(device))
    except SafetensorError as err:
        raise UserError(
            f"{path}: not a readable safetensors file ({one_line(err)}; truncated or corrupted?)"
        ) from None


def check_finite(path: str | Path, state: dict[str, torch.Tensor], names) -> None:
    """``UserError`` naming the first of ``names`` (the model's parameters) holding NaN or inf.
    Buffers are not checked: some models keep -inf masks on purpose."""
    for name in names:
        tensor = state.get(name)
        if tensor is not None and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise UserError(
                f"{path}: tensor {name} holds {bad} NaN or infinite value(s) of {tensor.numel()} "
                "(corrupted, or saved from a diverged run)"
            )


def load_weights(
    model: nn.Module,
    path: str | Path,
    strict: bool = True,
    expect_hash: str | None = None,
    recorded_in: str | Path | None = None,
) -> nn.Module:
    """Load a safetensors file into ``model``; a mismatch is a one-line error naming the keys.
    ``expect_hash``: the file's recorded ``file_hash`` (e.g. ``weights_hash`` in ``train.yaml``)."""
    path = Path(path)
    state = read_tensors(path, expect_hash=expect_hash, recorded_in=recorded_in)
    check_finite(path, state, (name for name, _ in model.named_parameters()))
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
    """16 hex digits of SHA-256 of a file's bytes (checkpoints are identified by content).

    Remembered per (path, inode, size, mtime) for the life of the process: loading a checkpoint
    verifies its hash and the search records it, one read of the file for both. A file modified
    in the last seconds is not remembered (file times are coarse: a rewrite within the same tick
    would keep the mtime, as git's "racy clean" entries), and any rewrite after is hashed afresh.
    """
    path = Path(path).resolve()
    st = os.stat(path)
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _HASHES:
        return _HASHES[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()[:16]
    if time.time_ns() - st.st_mtime_ns > _SETTLED_NS:
        if len(_HASHES) > 256:
            _HASHES.clear()
        _HASHES[key] = value
    return value
