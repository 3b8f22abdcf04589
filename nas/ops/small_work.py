"""Making chains of small tensor ops cheap: one intra-op thread, and index tensors built once.

Token reduction at batch 1 is a chain of ops of a few microseconds each; their fixed costs (a
thread wake-up per parallel op, rebuilding index tensors that depend only on shapes) outweigh
their arithmetic. The token operators (`tome`, `evit`, `cluster`) use these two helpers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor

#: Below this many elements of token data (`B * N * C`) a reduction runs on one thread.
SERIAL_BELOW = 1 << 20


class _OneThread:
    """Sets torch's intra-op threads to 1 on entry and back to `threads` on exit."""

    __slots__ = ("threads",)

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def __enter__(self) -> None:
        torch.set_num_threads(1)

    def __exit__(self, *_) -> None:
        torch.set_num_threads(self.threads)


_UNCHANGED = nullcontext()


def serial(work: int) -> AbstractContextManager:
    """A context that runs the ops inside on one intra-op thread when `work` (elements touched) is small.

    Each op that PyTorch or MKL runs in parallel wakes the other threads first (OpenMP's passive
    wait: a futex wake and a reschedule per op; on a busy machine far more), which costs more than
    a 99 x 98 matmul or a top-k over 99 values. Switching costs ~0.2 µs; the count is restored on
    exit, errors included. Nothing changes under `torch.compile`/`torch.export` (no side effects
    in a graph), under `torch.fx` symbolic tracing (`work` is then a symbol, not an int), when the
    work is large, or when torch already runs on one thread.

    `torch.set_num_threads` sets OpenMP's and MKL's thread counts of the calling thread (other
    threads keep theirs, though one that starts torch's thread pool in that window would read 1).
    """
    if torch.compiler.is_compiling() or not isinstance(work, int) or work >= SERIAL_BELOW:
        return _UNCHANGED
    threads = torch.get_num_threads()
    return _UNCHANGED if threads == 1 else _OneThread(threads)


ConstantsBuilder = Callable[..., tuple[Tensor, ...]]
_BUILDERS: dict[str, ConstantsBuilder] = {}


def register_constants(kind: str, builder: ConstantsBuilder) -> None:
    """Name `builder(device, *shape) -> tensors` for `shape_constants(kind, ...)`."""
    if kind in _BUILDERS:
        raise ValueError(f"shape constants {kind!r} are already registered")
    _BUILDERS[kind] = builder


@functools.lru_cache(maxsize=512)
def _cached(kind: str, device: torch.device, *shape: int) -> tuple[Tensor, ...]:
    # outside inference mode, so that a model trained after an inference pass can use them in autograd
    with torch.inference_mode(False), torch.no_grad():
        return _BUILDERS[kind](device, *shape)


def shape_constants(kind: str, device: torch.device, *shape: int) -> tuple[Tensor, ...]:
    """The index tensors of `kind` for these shapes: built once per `(kind, device, shape)`, or
    freshly under `torch.compile`/`torch.export` (traced into the graph)."""
    if torch.compiler.is_compiling():
        return _BUILDERS[kind](device, *shape)
    return _cached(kind, device, *shape)
