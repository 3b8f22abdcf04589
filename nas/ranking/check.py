"""``vitnas rank-check``: how far a supernet's inherited-weight accuracy ranks subnets as training them
from scratch does, measured on the user's own supernet and data.

Steps: pick subnets (``picking``); train each ``seeds`` times from scratch through the one training
loop, each run tested on its held-out images (``folds``, ``standalone``: cached per run, so an
interrupted check resumes and a check of another supernet reuses every run); score each subnet with
the weights it inherits on the validation split (what a search scores it by); compare the two
rankings with bootstrap intervals (``stats``); write the result into the checkpoint's sidecar and
MLflow (``record``).

Where runs compute: on a CPU, ``workers`` processes side by side (default: one per core, up to 4,
each with its share of the threads); on a GPU, or under ``torchrun``, one run at a time in this
process group (every process takes part in each run, rank 0 writes).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from nas.errors import UserError
from nas.ranking import folds, picking, stats
from nas.ranking.standalone import Cache, Job, correctness, decode, recipe_fields

FORMAT = "vitnas-ranking/1"
STUCK = 0.9  # a run whose last training loss is above this share of chance's (ln classes) did not train
MAX_AUTO_WORKERS = 4


@dataclass(frozen=True)
class RankCheckConfig:
    """What a rank-check measures (see ``vitnas rank-check --help``)."""

    subnets: int = 20
    epochs: int = 25
    seeds: int = 2
    holdout: str = "auto"  # auto (cv for in-memory data, else val), cv or val
    folds: int = folds.DEFAULT_FOLDS
    pick_seed: int = 0
    pool: int | None = None  # random members the spread is picked from (default: 6 per subnet)
    top_k: int = 5
    campaigns: tuple[str, ...] = ()  # pick these campaigns' fronts instead of a spread
    data: str | None = None  # default: the data the supernet was trained on
    workers: int = 0  # CPU processes side by side; 0: one per core, up to 4
    device: str = "auto"
    precision: str = "fp32"
    replicates: int = stats.REPLICATES
    confidence: float = stats.CONFIDENCE

    def __post_init__(self):
        for name, low in (("subnets", 3), ("epochs", 1), ("seeds", 1), ("top_k", 1), ("replicates", 100)):
            if getattr(self, name) < low:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least {low}")
        if not 0 < self.confidence < 1:
            raise UserError(f"confidence {self.confidence}: must be between 0 and 1")

    def recipe(self):
        """The stand-alone training recipe: the supernet's hyperparameters at ``epochs`` (seed set per
        run), warming up over a fifth of the epochs: with the supernet's one epoch, some small ViTs
        trained from scratch on digits never left chance (1 of 40 runs at 25 epochs)."""
        from nas.training.config import TrainConfig

        return TrainConfig(epochs=self.epochs, precision=self.precision, warmup_epochs=self.epochs / 5)


@dataclass
class RankCheckResult:
    ranking: dict
    trained_now: int
    reused: int
    wall_s: float
    sidecars: list[Path] = field(default_factory=list)
    run_id: str | None = None


def default_workspace(checkpoint: Path) -> Path:
    """The workspace a checkpoint lives in (``WS/supernet/<space>/`` or ``WS/frozen/<hash>/``), else
    ``./vitnas-runs``: the stand-alone cache and MLflow store go there."""
    folder = checkpoint.resolve()
    if folder.parent.name in ("supernet", "frozen"):
        return folder.parent.parent
    return Path("vitnas-runs").resolve()


def rank_check(
    supernets: str | Path | list,
    config: RankCheckConfig,
    *,
    workspace: str | Path | None = None,
    tracking_uri: str | None = None,
    cache: str | Path | None = None,
    write: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> RankCheckResult | None:
    """Measure ranking trust (see the module docstring). ``supernets``: a checkpoint, or the
    sub-supernets of a few-shot split (each trained with a ``pin``; a subnet is scored by the one its
    kind belongs to). Returns None on processes other than rank 0 under torchrun."""
    from nas.supernet import checkpoint as ckpt

    t0 = time.perf_counter()
    paths = [Path(p) for p in (supernets if isinstance(supernets, (list, tuple)) else [supernets])]
    folders = [ckpt.resolve(p) for p in paths]
    nets = [_load(folder) for folder in folders]
    space = nets[0][0].space
    for folder, (net, meta) in zip(folders[1:], nets[1:]):
        if net.space_hash != nets[0][0].space_hash or meta["data"] != nets[0][1]["data"]:
            raise UserError(
                f"--supernet {folder}: a few-shot split's sub-supernets share one space and data; this one "
                f"differs from {folders[0]}"
            )
    workspace = Path(workspace) if workspace else default_workspace(folders[0])
    cache = Cache(cache or workspace / "rank-check" / "standalone")
    splits, spec = _data(config, nets[0][1], space)
    holdout = folds.resolve(config.holdout, config.folds, splits)
    world = _world(config)
    try:
        picks = _picks(config, space, workspace, tracking_uri)
        recipe = config.recipe()
        jobs = [
            [
                Job(p.arch.to_dict(), p.arch.arch_hash(), r, recipe.replace(seed=recipe.seed + r).to_dict(),
                    spec.to_dict(), space.spec.image_size, (holdout.kind, holdout.folds))
                for r in range(config.seeds)
            ]
            for p in picks
        ]  # fmt: skip
        flat = [job for runs in jobs for job in runs]
        todo = _todo(flat, cache, world)
        if world.main:
            log(
                f"rank-check of {folders[0]}: {len(picks)} subnets x {config.seeds} stand-alone run(s) of "
                f"{config.epochs} epochs ({holdout.describe()}); {len(flat) - len(todo)} done before, "
                f"{len(todo)} to train"
            )
        _run(todo, cache, splits, world, config, progress)
        if not world.main:
            return None
        results = [[cache.get(job) for job in runs] for runs in jobs]
        ranking = _ranking(
            config, picks, results, nets, folders, splits, holdout, spec, time.perf_counter() - t0
        )
    finally:
        world.close()
    out = RankCheckResult(ranking, len(todo), len(flat) - len(todo), time.perf_counter() - t0)
    if write:
        from nas.ranking import record

        out.sidecars = [  # a few-shot split: each sub-supernet's sidecar, under its own weights hash
            ckpt.write_ranking(folder, {**ranking, "weights_hash": meta["weights_hash"]})
            for folder, (_, meta) in zip(folders, nets)
        ]
        uri = tracking_uri or _default_uri(workspace)
        out.run_id = record.log_ranking(uri, ranking, folders[0])
    return out


# -- steps ----------------------------------------------------------------------------------------
def _load(folder: Path):
    """(supernet in eval mode, sidecar) of a checkpoint, hash checked."""
    from nas.families import require
    from nas.supernet import checkpoint as ckpt

    net, meta = ckpt.load_checkpoint(folder)
    require(net.space, "psvit", "a rank-check")
    return net.eval(), meta


def _data(config: RankCheckConfig, meta: dict, space):
    from nas.data import DataSpec, load_splits, parse_data_spec

    spec = parse_data_spec(config.data) if config.data else DataSpec.from_dict(meta["data"])
    splits = load_splits(spec, space.spec.image_size, aug=config.recipe().aug)
    if splits.num_classes != space.spec.num_classes:
        raise UserError(
            f"--data {spec.spec}: {splits.num_classes} classes, the supernet's space has {space.spec.num_classes}"
        )
    return splits, spec


def _world(config: RankCheckConfig):
    from nas.training import distributed

    return distributed.start(config.device, config.precision)


def _picks(config: RankCheckConfig, space, workspace: Path, tracking_uri: str | None) -> list[picking.Pick]:
    if config.campaigns:
        return picking.from_campaigns(tracking_uri or _default_uri(workspace), list(config.campaigns), space)
    return picking.spread(space, config.subnets, config.pick_seed, config.pool)


def _default_uri(workspace: Path) -> str:
    from nas.tracking import default_tracking_uri

    return default_tracking_uri(workspace)


def _todo(jobs: list[Job], cache: Cache, world) -> list[Job]:
    """The runs not in the cache, as rank 0 sees them (every process gets rank 0's list)."""
    todo = [job for job in jobs if cache.get(job) is None] if world.main else None
    if world.size > 1:
        import torch.distributed as dist

        box = [todo]
        dist.broadcast_object_list(box, src=0)
        todo = box[0]
    return todo


def _workers(config: RankCheckConfig, world) -> int:
    """Processes side by side: only for one process on a CPU (a GPU or torchrun runs one at a time)."""
    if world.size > 1 or world.device.type != "cpu":
        return 1
    return config.workers or max(1, min(MAX_AUTO_WORKERS, os.cpu_count() or 1))


def _run(todo: list[Job], cache: Cache, splits, world, config: RankCheckConfig, progress: bool) -> None:
    from tqdm import tqdm

    from nas.ranking.standalone import run_in_worker, train_run

    if not todo:
        return
    workers = min(_workers(config, world), len(todo))
    bar = tqdm(
        total=len(todo), unit="run", desc="stand-alone runs", disable=not (progress and world.main),
        dynamic_ncols=True, file=sys.stderr,
    )  # fmt: skip
    try:
        if workers == 1:
            for job in todo:
                result = train_run(job, splits, world)
                if world.main:
                    cache.put(job, result)
                    bar.update()
            world.barrier()
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        threads = max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(run_in_worker, job, threads): job for job in todo}
            try:
                for future in as_completed(futures):
                    cache.put(futures[future], future.result())
                    bar.update()
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    finally:
        bar.close()


def _inherited(nets, arch) -> np.ndarray:
    """The arch's inherited-weight model: from the (sub-)supernet whose pin it matches."""
    from nas.supernet.sampling import parse_pin, pin_matches

    for net, meta in nets:
        pin = meta["config"].get("pin", "")
        if not pin or pin_matches(arch, parse_pin(pin, net.space)):
            return net.extract(arch)
    raise UserError(f"arch {arch.arch_hash()}: none of the few-shot sub-supernets covers its kinds")


def _ranking(config, picks, results, nets, folders, splits, holdout, spec, wall_s) -> dict:
    """The record written to the sidecar and MLflow: the numbers, how they were measured, every subnet."""
    inherited = np.stack([correctness(_inherited(nets, p.arch), splits.val) for p in picks])
    runs = [[decode(r["correct"]) for r in subnet_runs] for subnet_runs in results]
    measured = stats.Measurements(inherited, runs)
    agree = stats.agreement(
        measured, config.top_k, config.confidence, config.replicates, seed=config.pick_seed
    )
    tau, n = agree["kendall_tau"], len(picks)
    inh_acc, sa_acc = measured.inherited_accuracy(), measured.standalone_accuracy()
    meta = nets[0][1]
    return {
        "format": FORMAT,
        "summary": summary_line(tau, n),
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "space": nets[0][0].space.name,
        "weights_hash": meta["weights_hash"],
        "supernet": {
            "checkpoints": [str(f) for f in folders],
            "weights_hashes": [m["weights_hash"] for _, m in nets],
            "epoch": meta["epoch"],
            "config": meta["config"],
        },
        "subnets_compared": n,
        "kendall_tau": tau.to_dict(),
        "spearman_rho": agree["spearman_rho"].to_dict(),
        "top_k": {
            "k": agree["k"],
            "overlap": agree["top_k_overlap"].to_dict(),
            "hit": agree["top_k_hit"].value == 1.0,
            "hit_share": agree["top_k_hit_share"],
        },
        "confidence": config.confidence,
        "bootstrap": {
            "replicates": config.replicates,
            "method": "percentile; resamples subnets, each subnet's stand-alone runs, and the evaluation images",
        },
        "seed_agreement_tau": stats.seed_agreement(measured),
        "stuck_runs": [  # stand-alone runs whose training loss never left chance: a recipe failure
            {"arch_hash": r["arch_hash"], "seed": r["seed"], "train_loss": r["train_loss"]}
            for subnet_runs in results
            for r in subnet_runs
            if r["train_loss"] > STUCK * math.log(splits.num_classes)
        ],
        "data": spec.to_dict(),
        "inherited": {"split": "val", "images": int(inherited.shape[1])},
        "standalone": {
            "epochs": config.epochs,
            "seeds": config.seeds,
            "holdout": {"kind": holdout.kind, "folds": holdout.folds, "text": holdout.describe()},
            "images_per_subnet": int(sum(len(r) for r in runs[0])),
            "recipe": recipe_fields(config.recipe()),
            "seconds": float(sum(r["seconds"] for subnet_runs in results for r in subnet_runs)),
        },
        "selection": {
            "by": "campaign fronts" if config.campaigns else "spread over FLOPs and kinds",
            "campaigns": list(config.campaigns),
            "seed": config.pick_seed,
            "pool": config.pool or picking.POOL_PER_SUBNET * config.subnets,
        },
        "subnets": [
            {
                "arch_hash": p.arch.arch_hash(),
                "mflops": p.mflops,
                "source": p.source,
                "inherited_acc": float(inh_acc[i]),
                "standalone_acc": float(sa_acc[i]),
                "standalone_runs": [r["accuracy"] for r in results[i]],
                "arch": p.arch.to_dict(),
            }  # fmt: skip
            for i, p in enumerate(picks)
        ],
        "wall_s": wall_s,
    }


def summary_line(tau: stats.Interval, n: int) -> str:
    """``ranking trust tau 0.xx [lo, hi], n subnets``: what pareto, search and the dashboard show."""
    return f"ranking trust tau {tau.value:.2f} [{tau.lo:.2f}, {tau.hi:.2f}], {n} subnets"


def format_subnets(ranking: dict) -> str:
    """The compared subnets as a table, cheapest first."""
    from nas.report import format_table

    rows = [
        {
            "arch": s["arch_hash"],
            "MFLOPs": round(s["mflops"], 2),
            "inherited": round(s["inherited_acc"], 4),
            "stand-alone": round(s["standalone_acc"], 4),
            "runs": " ".join(f"{a:.3f}" for a in s["standalone_runs"]),
        }  # fmt: skip
        for s in sorted(ranking["subnets"], key=lambda s: s["mflops"])
    ]
    return format_table(rows)


def format_result(ranking: dict) -> str:
    """The numbers in a few lines, for the terminal."""
    tau = stats.Interval.from_dict(ranking["kendall_tau"])
    rho = stats.Interval.from_dict(ranking["spearman_rho"])
    top = ranking["top_k"]
    overlap = stats.Interval.from_dict(top["overlap"])
    pct = round(100 * ranking["confidence"])
    seeds = ranking.get("seed_agreement_tau")
    lines = [
        f"Kendall tau {tau.text()}   Spearman rho {rho.text()}   ({pct} % bootstrap intervals, "
        f"{ranking['subnets_compared']} subnets)",
        f"top-{top['k']} overlap {overlap.text()}; the stand-alone best is "
        f"{'' if top['hit'] else 'not '}among the inherited top {top['k']} "
        f"(in {100 * top['hit_share']:.0f} % of bootstrap replicates)",
    ]
    for stuck in ranking.get("stuck_runs", []):
        lines.append(
            f"warning: stand-alone run of {stuck['arch_hash']} seed {stuck['seed']} never left chance (training "
            f"loss {stuck['train_loss']:.2f}): its accuracy says more about the recipe than the architecture"
        )
    if seeds is not None:
        lines.append(
            f"stand-alone seed 0 vs seed 1: Kendall tau {seeds:.2f} (how well the ground truth agrees with itself)"
        )
    lines.append(ranking["summary"])
    return "\n".join(lines)
