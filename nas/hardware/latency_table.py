"""Building a latency table: every part a space needs, measured on the target, plus the overhead fit.

What ``vitnas latency-table build`` runs. Each *pass* measures every grid point (every part of
``nas.hardware.parts.space_parts`` at up to ``grid`` token counts) and every fit subnet once, in a
shuffled order, so that a stretch of machine noise spreads over all of them rather than biasing a
few; the table keeps every pass and predicts from the medians. Parts and subnets are measured in
the same process, in the same state: eager CPU latency depends on the allocator's state (glibc
malloc thresholds), so a table serves best a process in the same state as the one that built it.
Build on a machine as quiet as the one the search will measure on: under load a whole subnet (a
millisecond here) is interrupted more often than a part (a tenth of that), and the fitted overhead
takes in the load of the moment.

The file is rewritten atomically every few seconds and on the way out, so an interrupted build
resumes where it stopped: points that already have their measurement for a pass are skipped.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from nas.arch import ArchConfig
from nas.errors import UserError
from nas.hardware.fingerprint import fingerprint
from nas.hardware.measure import measure
from nas.hardware.parts import Part, space_parts
from nas.hardware.predictor import LatencyTable, fit_overhead, mape
from nas.hardware.target import Target
from nas.space import SearchSpace
from nas.supernet.subnet import VitnasSubnet

GRID_POINTS = 4  # token counts measured per part (all of them when a part sees no more)
PART_BUDGET_S = 0.15  # measure() time budget per part and pass
PASSES = 3
FIT_SUBNETS = 16  # whole subnets measured to fit the overhead
SUBNET_BUDGET = 8  # a whole subnet's time budget, in part budgets
SAVE_EVERY_S = 5.0


@dataclass
class BuildReport:
    table: LatencyTable
    path: Path
    measured_now: int
    reused: int
    fit_mape: float  # of the fitted overhead on the fit subnets, in %


def build_table(
    space: SearchSpace,
    target: Target,
    path: str | Path,
    *,
    force: bool = False,
    passes: int = PASSES,
    budget_s: float = PART_BUDGET_S,
    fit_subnets: int = FIT_SUBNETS,
    grid: int = GRID_POINTS,
    progress: bool = True,
) -> BuildReport:
    """Measure what ``space`` needs on ``target`` into the table at ``path`` (``passes`` times each),
    then fit the overhead on ``fit_subnets`` whole subnets. Resumes an unfinished table for the same
    space, target and machine, and adds passes to a finished one; ``force`` starts afresh."""
    path = Path(path)
    _check_target(space, target)
    table = _start(space, target, path, force, budget_s)
    points = [(p, n) for p, counts in space_parts(space).items() for n in grid_points(counts, grid)]
    archs = _fit_archs(space, fit_subnets)
    todo = [job for i in range(passes) for job in _pass_todo(table, points, archs, i)]
    reused = sum(len(v) for parts in table.parts.values() for v in parts.values())
    reused += sum(len(s["measured_ms"]) for s in table.subnets.values())
    saver = _Saver(table, path)
    bar = tqdm(total=len(todo), desc="latency table", unit="point", disable=not progress)
    with _gc_frozen():
        try:
            for job in todo:
                _run(table, job, target, budget_s)
                bar.update()
                saver.tick()
            sums = [table.parts_sum(a) for a in archs]
            measured = [table.subnet_ms(a.arch_hash()) for a in archs]
            table.overhead = fit_overhead(sums, measured)
        finally:
            bar.close()
            saver.tick(final=True)
    fit = mape([table.overhead.apply(s) for s in sums], measured)
    return BuildReport(table, path, measured_now=len(todo), reused=reused, fit_mape=fit)


def grid_points(counts: set[int], most: int = GRID_POINTS) -> list[int]:
    """Up to ``most`` of the token counts a part can see, evenly spread and always both ends."""
    xs = sorted(counts)
    if len(xs) <= most:
        return xs
    return sorted({xs[round(i * (len(xs) - 1) / (most - 1))] for i in range(most)})


def default_table_path(space: SearchSpace, target: Target, workspace: str | Path = "vitnas-runs") -> Path:
    slug = re.sub(r"[^A-Za-z0-9.]+", "_", target.key()).strip("_")
    return Path(workspace) / "latency-tables" / f"{space.name}-{fingerprint(target).digest()}-{slug}.json"


Job = tuple[Part, int] | ArchConfig


def _pass_todo(
    table: LatencyTable, points: list[tuple[Part, int]], archs: list[ArchConfig], i: int
) -> list[Job]:
    """Pass ``i``'s measurements still missing, parts and subnets mixed in a seeded shuffle."""
    jobs: list[Job] = [(p, n) for p, n in points if len(table.parts.get(p.key, {}).get(n, [])) <= i]
    jobs += [a for a in archs if len(table.subnets.get(a.arch_hash(), {}).get("measured_ms", [])) <= i]
    random.Random(i).shuffle(jobs)
    return jobs


def _run(table: LatencyTable, job: Job, target: Target, budget_s: float) -> None:
    if isinstance(job, ArchConfig):
        shape = target.input_shape(job.image_size, job.in_chans)
        ms = measure(
            VitnasSubnet(job), target, input_shape=shape, time_budget_s=SUBNET_BUDGET * budget_s
        ).median_ms
        entry = table.subnets.setdefault(job.arch_hash(), {"arch": job.to_dict(), "measured_ms": []})
        entry["measured_ms"].append(ms)
        return
    part, n = job
    module, shape = part.module(n)
    ms = measure(module, target, input_shape=(target.batch, *shape), time_budget_s=budget_s).median_ms
    table.parts.setdefault(part.key, {}).setdefault(n, []).append(ms)


class _Saver:
    """Rewrites the table every ``SAVE_EVERY_S`` and on the way out, adding up the build time."""

    def __init__(self, table: LatencyTable, path: Path):
        self.table, self.path = table, path
        self.since = self.saved = time.monotonic()

    def tick(self, final: bool = False) -> None:
        now = time.monotonic()
        if final or now - self.saved >= SAVE_EVERY_S:
            self.table.build_s += now - self.since
            self.since = self.saved = now
            self.table.save(self.path)


@contextlib.contextmanager
def _gc_frozen() -> Iterator[None]:
    """``measure`` runs a full ``gc.collect()`` per call, which walks every object torch and timm
    created on import (0.1-0.3 s here, longer than measuring a part); frozen, they are skipped."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _check_target(space: SearchSpace, target: Target) -> None:
    if space.family != "psvit":
        raise UserError(f"space {space.name} is a {space.family} space: latency tables cover psvit spaces")
    target.require_available()
    if target.resolution not in (None, space.spec.image_size):
        raise UserError(
            f"target {target}: resolution {target.resolution} is not the space's image_size {space.spec.image_size}"
        )


def _start(space: SearchSpace, target: Target, path: Path, force: bool, budget_s: float) -> LatencyTable:
    """A fresh table, or the one at ``path`` when it is for the same space, target and machine."""
    fresh = LatencyTable(
        space={"name": space.name, "hash": space.content_hash(), "source": space.source},
        target=target.key(),
        fingerprint=fingerprint(target).to_dict(),
        budget_s=budget_s,
        malloc_env={k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
    )
    if force or not path.exists():
        return fresh
    old = LatencyTable.load(path)
    clash = [
        f"{what} {mine} (the file has {theirs})"
        for what, mine, theirs in (
            ("space", fresh.space["hash"], old.space["hash"]),
            ("target", fresh.target, old.target),
            ("fingerprint", fresh.digest, old.digest),
        )
        if mine != theirs
    ]
    if clash:
        raise UserError(
            f"{path} is a table for something else: {'; '.join(clash)}; pass --force to rebuild it"
        )
    old.overhead = None  # refitted on every build: parts, passes or subnets may have been added
    return old


def _fit_archs(space: SearchSpace, count: int) -> list[ArchConfig]:
    """The largest and smallest members (the ends of the range), then seeded random ones; distinct."""
    archs: dict[str, ArchConfig] = {}
    randoms = (space.sample(10_000 + s) for s in range(100 * count))
    for arch in itertools.chain([space.largest(), space.smallest()], randoms):
        if len(archs) >= count:
            break
        archs.setdefault(arch.arch_hash(), arch)
    return list(archs.values())
