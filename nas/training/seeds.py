"""Seeds for the random streams of a run, derived from the run's seed alone (so resume-safe)."""

from __future__ import annotations

import hashlib


def stream_seed(seed: int, epoch: int, stream: str) -> int:
    """A 56-bit seed for one random stream of one epoch: the same on every process and machine."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{epoch}:{stream}".encode(), digest_size=7).digest(), "big")
