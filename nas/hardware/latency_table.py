"""Building a latency table: every part a space needs, measured on the target, plus the overhead fit.

What ``vitnas latency-table build`` runs. Each *pass* measures every grid point (every part of
``nas.hardware.parts.space_parts`` at a few token counts) and every fit subnet once, in a shuffled
order, so that a stretch of machine noise spreads over all of them rather than biasing a few; the
table keeps every pass and predicts from the medians.

Fewer points where the prediction does not need them (2229 measurements for psvit-digits before):

- The grid: both ends and the middle of a part's token counts (``GRID_POINTS``). Parts are nearly
  linear in the token count here (fixed costs dominate at these sizes); a part whose middle lies
  more than ``LINEAR_TOL`` off the line through its ends (medians so far) gets the quarter points too
  (``FINE_GRID_POINTS``) from the next pass on. For a smooth (quadratic) curve the error of the
  3-point interpolation at the quarters is a quarter of that deviation, about 1 % at the threshold.
- The passes: the first ``MIN_PASSES`` measure every point; a later pass only the points (and fit
  subnets) whose measurements so far differ by more than ``AGREE_TOL``. A median of three lies
  between the two values it would be added to, so skipping moves a point by at most half of that.

The progress bar counts the points planned (later passes' counts estimated until they start) and
its ETA is the mean time per part and per fit subnet so far times those left, not tqdm's moving
rate over jobs of mixed cost (a first ETA of 5:22 for a build of over 10 minutes).

Parts and subnets are measured in the same process, in the same state: eager CPU latency depends on
the process's OpenMP wait policy (read when torch loads; see ``nas.hardware.measure``), so a table
serves best a process started as the one that built it (``vitnas search`` as ``vitnas latency-table``). Build on a machine as quiet as the one the search will measure on: under
load a whole subnet (a millisecond here) is interrupted more often than a part (a tenth of that),
and the fitted overhead takes in the load of the moment.

On a deployment runtime (``backend=onnxruntime|openvino|tensorrt``) each point is a part exported to
ONNX with its own sample shape (``(N, C)`` tokens for a cell) and timed by that runtime as whole
candidates are. The export dominates: about 2.4 s a point on a 2-core CPU, so a pass over
psvit-digits' ~650 points took 26 minutes there against about 2 for eager.

The file is rewritten atomically every few seconds and on the way out, so an interrupted build
resumes where it stopped: points that already have their measurement for a pass are skipped.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import os
import random
import re
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from nas.arch import ArchConfig
from nas.errors import UserError
from nas.families import require
from nas.hardware.fingerprint import fingerprint
from nas.hardware.measure import measure
from nas.hardware.parts import Part, space_parts
from nas.hardware.predictor import LatencyTable, fit_overhead, interpolate, mape
from nas.hardware.table_defaults import FIT_SUBNETS, PART_BUDGET_S, PASSES
from nas.hardware.target import Target
from nas.space import SearchSpace
from nas.supernet.subnet import VitnasSubnet

GRID_POINTS = 3  # token counts measured per part: both ends and the middle (all when a part sees no more)
FINE_GRID_POINTS = 5  # ... and the quarters, for a part that is not linear enough
LINEAR_TOL = 0.05  # the middle's distance from the line through the ends, relative to the middle
MIN_PASSES = 2  # passes that measure every point; later ones only points whose passes disagree
AGREE_TOL = 0.03  # (max - min) / min of a point's measurements under which it has enough passes
SUBNET_BUDGET = 8  # a whole subnet's time budget, in part budgets
SAVE_EVERY_S = 5.0
ETA_PRIOR_JOBS = 5  # the first guess (from the budgets) weighs as much as this many jobs done
ETA_PRIOR = {"part": 0.5, "subnet": 0.8}  # that guess: seconds of work per second of budget
ETA_REPLAN_S = 2.0
EXTRA_PASS_SHARE = 0.5  # guessed share of points a pass after MIN_PASSES measures, until it can be counted
# (psvit-digits, 2 threads: 15-25 % at a load of 1-3 on 2 cores, 65 % under heavier load)
SHARE_MIN_POINTS = 30  # points measured twice before their share of disagreement replaces the guess


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
    """Measure what ``space`` needs on ``target`` into the table at ``path`` (up to ``passes`` times
    each, see the module docstring), then fit the overhead on ``fit_subnets`` whole subnets. Resumes
    an unfinished table for the same space, target and machine, and adds passes to a finished one;
    ``force`` starts afresh. ``grid``: token counts per part at first (``FINE_GRID_POINTS`` where
    the part is not linear)."""
    path = Path(path)
    _check_target(space, target)
    table = _start(space, target, path, force, budget_s)
    parts = space_parts(space)
    archs = _fit_archs(space, fit_subnets)
    reused = _measurements(table)
    saver = _Saver(table, path)
    eta = _Progress(budget_s, enabled=progress)
    with _gc_frozen():
        try:
            for i in range(passes):
                todo = _pass_todo(table, parts, archs, i, grid)
                later = functools.partial(_later_passes, table, parts, archs, i, passes, grid)
                eta.plan(f"latency table, pass {i + 1}/{passes}", todo, later)
                for job in todo:
                    start = time.perf_counter()
                    _run(table, job, target, budget_s)
                    eta.done(job, time.perf_counter() - start)
                    saver.tick()
            sums = [table.parts_sum(a) for a in archs]
            measured = [table.subnet_ms(a.arch_hash()) for a in archs]
            table.overhead = fit_overhead(sums, measured)
        finally:
            eta.close()
            saver.tick(final=True)
    fit = mape([table.overhead.apply(s) for s in sums], measured)
    return BuildReport(table, path, measured_now=_measurements(table) - reused, reused=reused, fit_mape=fit)


def grid_points(counts: set[int], most: int = GRID_POINTS) -> list[int]:
    """Up to ``most`` of the token counts a part can see, evenly spread and always both ends."""
    xs = sorted(counts)
    if len(xs) <= most:
        return xs
    return sorted({xs[round(i * (len(xs) - 1) / (most - 1))] for i in range(most)})


def part_grid(counts: set[int], measured: dict[int, list[float]], most: int = GRID_POINTS) -> list[int]:
    """The token counts to measure a part at: ``grid_points`` (ends and middle), the quarter points
    too once the middle is measured and lies over ``LINEAR_TOL`` off the line through the ends
    (medians so far), and every count the table already has (a point once measured stays measured)."""
    grid = set(grid_points(counts, most))
    coarse = sorted(grid)
    if len(coarse) >= 3 and all(measured.get(n) for n in coarse):
        ends, middle = (coarse[0], coarse[-1]), coarse[len(coarse) // 2]
        medians = {n: statistics.median(measured[n]) for n in (*ends, middle)}
        line = interpolate({n: medians[n] for n in ends}, middle)
        if abs(medians[middle] - line) > LINEAR_TOL * medians[middle]:
            grid.update(grid_points(counts, max(FINE_GRID_POINTS, most)))
    return sorted(grid | set(measured))


def wants_pass(measured: list[float], i: int) -> bool:
    """Whether pass ``i`` (0-based) measures a point that has ``measured`` so far: every pass up to
    ``MIN_PASSES``, then only while its measurements differ by more than ``AGREE_TOL``."""
    if len(measured) > i:
        return False  # this pass's measurement is there (a resumed build)
    if i < MIN_PASSES or len(measured) < 2:
        return True
    return (max(measured) - min(measured)) > AGREE_TOL * min(measured)


def default_table_path(space: SearchSpace, target: Target, workspace: str | Path = "vitnas-runs") -> Path:
    slug = re.sub(r"[^A-Za-z0-9.]+", "_", target.key()).strip("_")
    return Path(workspace) / "latency-tables" / f"{space.name}-{fingerprint(target).digest()}-{slug}.json"


Job = tuple[Part, int] | ArchConfig


def _pass_todo(
    table: LatencyTable, parts: dict[Part, set[int]], archs: list[ArchConfig], i: int, grid: int = GRID_POINTS
) -> list[Job]:
    """Pass ``i``'s measurements still missing (``part_grid``, ``wants_pass``), parts and subnets
    mixed in a seeded shuffle."""
    jobs: list[Job] = []
    for part, counts in parts.items():
        measured = table.parts.get(part.key, {})
        jobs += [(part, n) for n in part_grid(counts, measured, grid) if wants_pass(measured.get(n, []), i)]
    jobs += [a for a in archs if wants_pass(_subnet_measured(table, a), i)]
    random.Random(i).shuffle(jobs)
    return jobs


def _later_passes(
    table: LatencyTable, parts: dict[Part, set[int]], archs: list[ArchConfig], i: int, passes: int, grid: int
) -> dict[str, float]:
    """Estimated jobs of the passes after ``i``: every point of today's grids for the first
    ``MIN_PASSES``, after that the share of points whose measurements disagree so far."""
    points = sum(len(part_grid(c, table.parts.get(p.key, {}), grid)) for p, c in parts.items())
    series = [v for p in table.parts.values() for v in p.values()] + [
        _subnet_measured(table, a) for a in archs
    ]
    judged = [v for v in series if len(v) >= 2]
    share = (
        sum(wants_pass(v, MIN_PASSES) for v in judged) / len(judged)
        if len(judged) >= SHARE_MIN_POINTS
        else EXTRA_PASS_SHARE
    )
    later = [1.0 if j < MIN_PASSES else share for j in range(i + 1, passes)]
    return {"part": points * sum(later), "subnet": len(archs) * sum(later)}


def _subnet_measured(table: LatencyTable, arch: ArchConfig) -> list[float]:
    return table.subnets.get(arch.arch_hash(), {}).get("measured_ms", [])


def _measurements(table: LatencyTable) -> int:
    parts = sum(len(v) for points in table.parts.values() for v in points.values())
    return parts + sum(len(s["measured_ms"]) for s in table.subnets.values())


def _run(table: LatencyTable, job: Job, target: Target, budget_s: float) -> None:
    if isinstance(job, ArchConfig):
        shape = target.input_shape(job.image_size, job.in_chans)
        ms = measure(
            VitnasSubnet(job), target, input_shape=shape, time_budget_s=SUBNET_BUDGET * budget_s, remeasure=0
        ).median_ms  # no re-measurement: noise is what the passes are for
        entry = table.subnets.setdefault(job.arch_hash(), {"arch": job.to_dict(), "measured_ms": []})
        entry["measured_ms"].append(ms)
        return
    part, n = job
    module, shape = part.module(n)
    ms = measure(
        module, target, input_shape=(target.batch, *shape), time_budget_s=budget_s, remeasure=0
    ).median_ms
    table.parts.setdefault(part.key, {}).setdefault(n, []).append(ms)


class _Progress:
    """A bar over the points planned, with an ETA from the mean time per part point and per fit
    subnet so far (the jobs are shuffled, so those done are a fair sample of those left; a subnet
    costs ~15 parts) times the jobs left, the later passes' estimated (again every ``ETA_REPLAN_S``:
    their counts depend on the measurements). Before a few jobs are done the means lean on a guess
    from the budgets (``ETA_PRIOR``)."""

    def __init__(self, budget_s: float, enabled: bool = True):
        self.prior = {
            "part": ETA_PRIOR["part"] * budget_s,
            "subnet": ETA_PRIOR["subnet"] * SUBNET_BUDGET * budget_s,
        }
        self.spent = {"part": 0.0, "subnet": 0.0}
        self.count = {"part": 0, "subnet": 0}
        self.left = {"part": 0.0, "subnet": 0.0}
        self.later = {"part": 0.0, "subnet": 0.0}
        self._later: Callable[[], dict[str, float]] = lambda: {"part": 0.0, "subnet": 0.0}
        self._planned = time.monotonic()
        self.bar = tqdm(
            total=0,
            desc="latency table",
            unit="point",
            disable=not enabled,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} points [{elapsed}{postfix}]",
        )

    def plan(self, desc: str, todo: list[Job], later: Callable[[], dict[str, float]]) -> None:
        """A pass starts: its jobs are known; ``later()`` estimates the later passes' jobs by kind."""
        subnets = sum(isinstance(job, ArchConfig) for job in todo)
        self.left = {"part": float(len(todo) - subnets), "subnet": float(subnets)}
        self._later = later
        self.bar.set_description_str(desc, refresh=False)
        self._replan()
        self._show()

    def _replan(self) -> None:
        self.later, self._planned = self._later(), time.monotonic()
        self.bar.total = self.bar.n + round(sum(self.left.values()) + sum(self.later.values()))

    def done(self, job: Job, seconds: float) -> None:
        kind = "subnet" if isinstance(job, ArchConfig) else "part"
        self.spent[kind] += seconds
        self.count[kind] += 1
        self.left[kind] -= 1
        self.bar.update()
        if time.monotonic() - self._planned >= ETA_REPLAN_S:
            self._replan()
        self._show()

    def eta_s(self) -> float:
        """Seconds still to go, as estimated now."""
        return sum((self.left[k] + self.later[k]) * self.mean_s(k) for k in self.left)

    def mean_s(self, kind: str) -> float:
        return (self.spent[kind] + ETA_PRIOR_JOBS * self.prior[kind]) / (self.count[kind] + ETA_PRIOR_JOBS)

    def _show(self) -> None:
        minutes, seconds = divmod(round(self.eta_s()), 60)
        self.bar.set_postfix_str(f"ETA {minutes}:{seconds:02d}", refresh=self.bar.n == 0)

    def close(self) -> None:
        self.bar.close()


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
    """The objects torch and timm created on import, frozen: no collection during the build walks
    them (a full one takes 0.1-0.3 s here, longer than measuring a part)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _check_target(space: SearchSpace, target: Target) -> None:
    require(space, "psvit", "a latency table")
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
