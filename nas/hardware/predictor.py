"""Latency prediction from a per-target lookup table of measured parts (nn-Meter's kernel-level idea).

nn-Meter (Zhang et al., MobiSys 2021) predicts a network's latency as the sum of its kernels'
latencies. Here the kernels are the parts of ``nas.hardware.parts`` (stem, cells with their token
reduction, inter-stage pooling, head), measured on the target over a small grid of token counts by
``nas.hardware.latency_table.build_table``. ``LatencyPredictor.predict`` sums the parts of an
architecture, interpolated linearly in the token count, plus an overhead fitted (robustly: Theil-Sen)
on a few whole subnets measured during the build; isolated parts run with warmer caches than inside
a network, so their sum falls short, here by about 20 %::

    latency ≈ constant + scale · Σ parts

The table is a JSON file that records every pass's measurement of every point (the median is used)
and the fingerprint of the machine; a table from another machine is refused unless forced.
"""

from __future__ import annotations

import bisect
import json
import statistics
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from scipy.stats import theilslopes

from nas.arch import ArchConfig
from nas.errors import UserError
from nas.families import require
from nas.files import write_atomically
from nas.hardware.fingerprint import Fingerprint
from nas.hardware.parts import decompose
from nas.hardware.target import Target

FORMAT = "vitnas-latency-table/1"


def interpolate(points: Mapping[int, float], n: float) -> float:
    """Latency at ``n`` tokens: exact at grid points, linear between them, linear extrapolation
    from the two nearest points outside (never below zero); one point is a constant."""
    if n in points:
        return points[n]
    xs = sorted(points)
    if len(xs) == 1:
        return points[xs[0]]
    i = min(max(bisect.bisect_left(xs, n), 1), len(xs) - 1)
    x0, x1 = xs[i - 1], xs[i]
    y0, y1 = points[x0], points[x1]
    return max(0.0, y0 + (y1 - y0) * (n - x0) / (x1 - x0))


def mape(predicted, measured) -> float:
    """Mean absolute percentage error, in %."""
    p, m = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    return float(np.mean(np.abs(p - m) / m) * 100) if len(m) else 0.0


@dataclass
class Overhead:
    """What the sum of isolated parts misses: caches and branch predictors are warmer for a part
    measured on its own than inside a network, and the forward has some glue of its own."""

    constant_ms: float = 0.0
    scale: float = 1.0

    def apply(self, parts_ms: float) -> float:
        return self.constant_ms + self.scale * parts_ms


def fit_overhead(parts_ms: list[float], measured_ms: list[float]) -> Overhead:
    """``measured ≈ constant + scale · Σ parts`` by Theil-Sen (the median of pairwise slopes):
    least squares (with a per-part term too) chased single noisy subnets on this shared machine,
    fitting a scale of 2.2 after one bad pass; the median ignores them. With under three subnets,
    or an implausible line (the glue saving time, or latency falling as parts grow: noise swamping
    a narrow range), the median ratio alone, so that predictions stay positive."""
    s, y = np.asarray(parts_ms, dtype=float), np.asarray(measured_ms, dtype=float)
    if len(y) == 0:
        return Overhead()
    if len(y) >= 3:
        scale, constant, *_ = theilslopes(y, s)
        if scale > 0 and constant >= 0:
            return Overhead(constant_ms=float(constant), scale=float(scale))
    return Overhead(scale=float(np.median(y / s)))


@dataclass
class LatencyTable:
    """The file: parts ``{key: {tokens: [ms per pass]}}``, the fit subnets ``{arch hash: {"arch",
    "measured_ms": [ms per pass]}}``, the fitted overhead and where it all was measured."""

    space: dict
    target: str
    fingerprint: dict
    budget_s: float
    parts: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    subnets: dict[str, dict] = field(default_factory=dict)
    overhead: Overhead | None = None
    build_s: float = 0.0
    malloc_env: dict = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return Fingerprint(**self.fingerprint).digest()

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "space": self.space,
            "target": self.target,
            "fingerprint": self.fingerprint,
            "fingerprint_digest": self.digest,
            "budget_s": self.budget_s,
            "build_s": round(self.build_s, 3),
            "malloc_env": self.malloc_env,
            "overhead": None if self.overhead is None else vars(self.overhead),
            "parts": {k: {str(n): ms for n, ms in sorted(v.items())} for k, v in sorted(self.parts.items())},
            "subnets": self.subnets,
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def save(self, path: Path) -> None:
        """Atomic: a reader (or a crash) never sees half a file."""
        text = json.dumps(self.to_dict(), indent=1)
        write_atomically(path, lambda tmp: Path(tmp).write_text(text))

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such latency table (build one with `vitnas latency-table build`)")
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT!r}")
            return cls(
                space=data["space"],
                target=data["target"],
                fingerprint=data["fingerprint"],
                budget_s=data["budget_s"],
                build_s=data["build_s"],
                malloc_env=data["malloc_env"],
                parts={k: {int(n): ms for n, ms in v.items()} for k, v in data["parts"].items()},
                subnets=data["subnets"],
                overhead=Overhead(**data["overhead"]) if data["overhead"] else None,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise UserError(f"{path}: not a vitnas latency table ({type(err).__name__}: {err})") from None

    def subnet_ms(self, arch_hash: str) -> float:
        return statistics.median(self.subnets[arch_hash]["measured_ms"])

    def parts_sum(self, arch: ArchConfig) -> float:
        """Σ interpolated parts of ``arch`` (medians over passes)."""
        total = 0.0
        for part, n in decompose(arch):
            passes = self.parts.get(part.key)
            if not passes:
                raise UserError(
                    f"latency table for space {self.space['name']} has no part {part.key!r} "
                    f"(architecture {arch.arch_hash()} is outside that space): build a table for its space"
                )
            total += interpolate({m: statistics.median(v) for m, v in passes.items()}, n)
        return total


class LatencyPredictor:
    """Predicted latency (ms, at the table's target batch and resolution) of psvit architectures."""

    def __init__(self, table: LatencyTable):
        if table.overhead is None:
            raise UserError(
                "latency table is incomplete (its build was interrupted): run `vitnas latency-table build` again"
            )
        self.table = table

    @classmethod
    def load(
        cls, path: str | Path, expect: Fingerprint, target: Target, force: bool = False
    ) -> LatencyPredictor:
        """The table at ``path`` for ``target`` on the machine ``expect`` describes.

        A table built for another target is refused; one built on another machine (another
        fingerprint) is refused unless ``force``.
        """
        table = LatencyTable.load(path)
        if table.target != target.key():
            raise UserError(f"latency table {path} was built for target {table.target}, not {target.key()}")
        if table.digest != expect.digest():
            if not force:
                raise UserError(
                    f"latency table {path} was measured on fingerprint {table.digest} ({describe(table.fingerprint)}), "
                    f"this machine is {expect.digest()} ({describe(expect.to_dict())}): rebuild it here or force"
                )
            warnings.warn(
                f"using latency table {path} from fingerprint {table.digest} on {expect.digest()}",
                stacklevel=2,
            )
        return cls(table)

    @property
    def fingerprint(self) -> Fingerprint:
        return Fingerprint(**self.table.fingerprint)

    @property
    def target(self) -> Target:
        return Target.parse(self.table.target)

    def predict(self, arch: ArchConfig) -> float:
        require(arch, "psvit", "a latency table's prediction")
        return self.table.overhead.apply(self.table.parts_sum(arch))


def describe(fp: dict) -> str:
    gpu = f", {fp['gpu_name']}" if fp.get("gpu_name") else ""
    return (
        f"{fp['cpu_model']}, {fp['cores']} cores{gpu}, torch {fp['torch_version']}, {fp['threads']} threads"
    )
