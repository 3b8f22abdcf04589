"""Supernet training: the sandwich rule with in-place distillation (BigNAS: Yu et al. 2020; OFA:
Cai et al. 2020), run by the one training loop (``nas.training.loop``).

Every step trains, on each micro-batch, the largest subnet (cross-entropy with label smoothing),
the smallest (by default with its kinds drawn anew each step: see ``TrainConfig.smallest_kinds``)
and ``random_subnets`` random ones (soft cross-entropy against the largest subnet's detached
probabilities, plus ``subnet_label_weight`` times the hard-label cross-entropy); their gradients
sum in the shared weights before the loop's one reduction and AdamW step. How the subnets are drawn
(fair sampling, progressive shrinking, a few-shot pin) is ``nas.supernet.sampling``; each lever's
measured effect on ranking trust is in ``benchmarks/results/supernet_ranking.json``.

Determinism: every random stream of an epoch (batch order, augmentation, subnet draws) is seeded
from ``(seed, epoch)`` alone and every rank draws the same subnets, and checkpoints fall on epoch
boundaries with the optimizer state. So ``resume`` after a kill continues exactly as an unbroken run
with the same number of processes; with another number it continues the same optimisation (same
global batch and order) up to floating-point summation order, not bit for bit.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nas.arch import ArchConfig
from nas.data import DataSpec, Splits, load_splits
from nas.errors import UserError
from nas.families import require
from nas.space import SearchSpace, load_space
from nas.supernet import checkpoint as ckpt
from nas.supernet.evaluate import evaluate
from nas.supernet.sampling import (  # noqa: F401 (KIND_CHOICES, SmallestSizesChooser: re-exported)
    KIND_CHOICES,
    SmallestSizesChooser,
    SubnetSampler,
    parse_pin,
)
from nas.supernet.supernet import Supernet, space_hash
from nas.training import augment, distributed
from nas.training.batches import Batches, MicroBatch
from nas.training.config import TrainConfig
from nas.training.distributed import World
from nas.training.loop import Hooks, StepContext, classification_loss, fit
from nas.training.optim import make_optimizer
from nas.training.seeds import stream_seed


def sandwich_archs(space: SearchSpace, config: TrainConfig, draws: random.Random) -> list[ArchConfig]:
    """One step's subnets: largest, smallest (kinds per ``config.smallest_kinds``), random ones (drawn
    as ``config`` asks, with the schedules fully open: see ``SubnetSampler`` for a run's epochs)."""
    return SubnetSampler(space, config, draws).sandwich()


class SandwichStep:
    """The supernet's step: the sandwich's subnets on every micro-batch, distilled from the largest
    (``config.distill``; "none": every subnet learns from the labels alone)."""

    def __init__(self, space: SearchSpace, config: TrainConfig):
        self.space, self.config = space, config
        self.sampler = SubnetSampler(space, config)

    def start_epoch(self, epoch: int) -> None:
        self.sampler.start_epoch(epoch, random.Random(stream_seed(self.config.seed, epoch, "archs")))

    def __call__(self, net: nn.Module, batches: list[MicroBatch], ctx: StepContext) -> float:
        archs = self.sampler.sandwich()
        smoothing, distill = self.config.label_smoothing, self.config.distill == "largest"
        losses = []
        for x, target in batches:
            with ctx.forward():
                logits = net(x, archs[0])
            loss = classification_loss(logits, target, smoothing)
            ctx.backward(loss)
            teacher = logits.detach().float().softmax(dim=-1)
            for arch in archs[1:]:
                with ctx.forward():
                    student = net(x, arch)
                if not distill:
                    ctx.backward(classification_loss(student, target, smoothing))
                    continue
                loss_s = -(teacher * student.float().log_softmax(dim=-1)).sum(dim=-1).mean()
                if self.config.subnet_label_weight:
                    loss_s = loss_s + self.config.subnet_label_weight * classification_loss(
                        student, target, 0.0
                    )
                ctx.backward(loss_s)
            losses.append(loss.detach())
        return torch.stack(losses).mean().item()


@dataclass
class TrainResult:
    checkpoint: Path
    epoch: int
    history: list[dict]
    wall_s: float
    run_id: str | None = None

    @property
    def path(self) -> Path:
        """The weights file (``supernet.safetensors``), what ``load_checkpoint`` and search take."""
        return self.checkpoint

    @property
    def largest_acc(self) -> float:
        return self.history[-1]["val_acc_largest"] if self.history else float("nan")

    @property
    def smallest_acc(self) -> float:
        return self.history[-1]["val_acc_smallest"] if self.history else float("nan")


# -- the run --------------------------------------------------------------------------------------
def train_supernet(
    space: SearchSpace | str,
    data: str | DataSpec | Splits,
    workspace: str | Path,
    config: TrainConfig | None = None,
    *,
    device: str = "auto",
    resume: bool = False,
    force: bool = False,
    tracking_uri: str | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    log: Callable[[str], None] = print,
    on_epoch: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train (or with ``resume`` continue) the supernet of ``space``; checkpoint after every epoch.

    Runs in this process, or as one of the processes of ``torchrun`` or Ray Train (found from the
    environment). The checkpoint goes to ``WORKSPACE/supernet/<space-name>/``. ``stop_after`` ends
    this call after that many epochs in all (as if killed there; ``resume`` continues). With
    ``tracking_uri`` rank 0 logs the run to MLflow (params, per-epoch curves, the checkpoint path).
    A process group torchrun restarted after a failure resumes from the last checkpoint by itself.
    ``on_epoch(n)`` runs on every process once epoch n's checkpoint is written (Ray Train reports
    there: its ``report`` is a barrier every process must join).
    """
    space = load_space(space) if isinstance(space, str) else space
    config = config or TrainConfig()
    folder = ckpt.checkpoint_dir(workspace, space)
    resume = resume or (distributed.restarted() and (folder / ckpt.SIDECAR).is_file())
    check_run(space, config, folder, resume, force)
    splits = data if isinstance(data, Splits) else load_splits(data, space.spec.image_size, aug=config.aug)
    _check_data(space, splits)
    world = distributed.start(device, config.precision)
    try:
        return _train(
            space, splits, folder, config, world, resume, tracking_uri, progress, stop_after, log, on_epoch
        )
    finally:
        world.close()


def check_run(space: SearchSpace, config: TrainConfig, folder: Path, resume: bool, force: bool) -> None:
    """What ``train_supernet`` refuses before anything runs (a Ray Train driver checks it too): a
    space of another family, ``--compile``, and a checkpoint in ``folder`` without --resume or --force."""
    require(space, "psvit", "a supernet")
    if config.pin:
        parse_pin(config.pin, space)
    if config.compile:
        raise UserError(
            "--compile: the supernet runs different subnets every step, which torch.compile would recompile "
            "each time; compile plain models (vitnas train, vitnas finetune)"
        )
    if not resume and (folder / ckpt.SIDECAR).is_file() and not force:
        meta = ckpt.read_meta(folder)
        raise UserError(
            f"{folder}: a checkpoint is there already (epoch {meta['epoch']}/{meta['config']['epochs']}); "
            "pass --resume to continue it or --force to start over"
        )


def _train(
    space, splits, folder, config, world, resume, tracking_uri, progress, stop_after, log, on_epoch
) -> TrainResult:
    torch.manual_seed(config.seed)
    net = Supernet(space).to(world.device)
    batches = Batches(splits.train, config, world, splits.num_classes)
    optimizer = make_optimizer(net, config)
    start, history = 0, []
    if resume:
        start, history = _restore(folder, net, optimizer, splits.spec, config, world, log)
    world.broadcast_parameters(net)
    end = config.epochs if stop_after is None else min(config.epochs, stop_after)
    if start >= end:
        log(f"checkpoint {folder / ckpt.WEIGHTS} is at epoch {start}/{config.epochs}: nothing to do")
        return TrainResult(folder / ckpt.WEIGHTS, start, history, 0.0)
    if world.main:
        log(_batch_line(config, world, batches) + (f"; resuming at epoch {start}" if resume else ""))
    extremes = SubnetSampler(space, config.replace(smallest_kinds="fixed"))  # a pinned run's own extremes
    largest, smallest = extremes.largest(), extremes.smallest()
    t0 = time.perf_counter()

    def save(history: list[dict]) -> None:
        epoch = history[-1]["epoch"]
        meta = {
            "epoch": epoch, "config": config.to_dict(), "data": splits.spec.to_dict(), "history": history,
            "normalisation": {"mean": list(splits.mean), "std": list(splits.std)},
            "complete": epoch == config.epochs, "augmentation": augment.describe(config.aug),
            "runtime": {**world.describe(), "precision": config.precision, "global_batch": config.batch_size},
        }  # fmt: skip
        ckpt.save_checkpoint(folder, net, optimizer, meta)
        run.epoch(history[-1])

    hooks = Hooks(
        validate=lambda model: _validate(model, splits, largest, smallest),
        save=save,
        after_epoch=on_epoch or (lambda _epoch: None),
        log=log,
        report=lambda r: (
            f"epoch {r['epoch']}/{config.epochs}: loss {r['train_loss']:.4f}  val acc largest "
            f"{r['val_acc_largest']:.4f} smallest {r['val_acc_smallest']:.4f}  ({r['seconds']:.1f} s)"
        ),
    )
    uri = (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")) if world.main else None
    run = _Tracking(uri, space, splits.spec, config, folder, start, world)
    with run:
        history = fit(
            net, optimizer, SandwichStep(space, config), batches, config, world, hooks,
            start=start, end=end, history=history, desc=f"supernet {space.name}", progress=progress,
        )  # fmt: skip
        path = folder / ckpt.WEIGHTS
        run.finish(path)
    wall = time.perf_counter() - t0
    if world.main:
        log(
            f"checkpoint: {path}\nepoch {end}/{config.epochs}: val accuracy largest "
            f"{history[-1]['val_acc_largest']:.4f}, smallest {history[-1]['val_acc_smallest']:.4f} ({wall:.0f} s)"
        )
    return TrainResult(path, end, history, wall, run.run_id)


def _batch_line(config: TrainConfig, world: World, batches: Batches) -> str:
    return (
        f"global batch {config.batch_size} = {batches.micro} per micro-batch x {world.size} process(es) x "
        f"{config.accum_steps} accumulation step(s); {batches.steps_per_epoch} steps an epoch on {world.device}, "
        f"{config.precision}"
    )


def _validate(net: Supernet, splits: Splits, largest: ArchConfig, smallest: ArchConfig) -> dict:
    big, small = evaluate(net, largest, splits.val), evaluate(net, smallest, splits.val)
    return {
        "val_acc_largest": big.accuracy,
        "val_loss_largest": big.loss,
        "val_acc_smallest": small.accuracy,
        "val_loss_smallest": small.loss,
    }


def _check_data(space: SearchSpace, splits: Splits) -> None:
    if splits.num_classes != space.spec.num_classes:
        raise UserError(
            f"data {splits.spec.spec} has {splits.num_classes} classes, space {space.name!r} "
            f"expects {space.spec.num_classes}"
        )
    if len(splits.train) == 0 or len(splits.val) == 0:
        raise UserError(f"data {splits.spec.spec}: the train and validation splits must not be empty")


def _restore(
    folder: Path, net: Supernet, optimizer, data: DataSpec, config: TrainConfig, world: World, log
) -> tuple[int, list[dict]]:
    """Weights, optimizer state, epoch and history of the checkpoint in ``folder``, after checking
    that it is the same space, data and settings (epochs, precision and accumulation may change)."""
    meta = ckpt.read_meta(folder)
    ckpt.check_space(meta, net.space, folder)
    if meta["data"] != data.to_dict():
        raise UserError(
            f"{folder}: checkpoint was trained on data {meta['data']['spec']} (split seed "
            f"{meta['data']['seed']}), not {data.spec} (split seed {data.seed})"
        )
    changed = config.changes_on_resume(meta["config"])
    if changed:
        raise UserError(
            f"{folder}: resume continues with the checkpoint's settings; these differ: {', '.join(changed)} "
            "(give the checkpoint's values, or --force to start again)"
        )
    if meta["config"]["epochs"] != config.epochs and world.main:
        log(
            f"{folder}: the checkpoint planned {meta['config']['epochs']} epochs, continuing to {config.epochs} "
            "(the learning-rate schedule stretches from here on)"
        )
    before = meta.get("runtime", {}).get("world_size", 1)
    if before != world.size and world.main:
        log(
            f"{folder}: trained so far by {before} process(es), continuing with {world.size}: the same global "
            "batch and order, equal up to floating-point summation order (not bit-exact)"
        )
    loaded, _ = ckpt.load_checkpoint(folder, net.space)
    net.load_state_dict(loaded.state_dict())
    ckpt.load_optimizer(folder, net, optimizer, meta)
    return int(meta["epoch"]), list(meta["history"])


class _Tracking:
    """The run's MLflow record (``nas.tracking.training_run``), or nothing without a tracking URI."""

    def __init__(
        self, uri, space: SearchSpace, data: DataSpec, config: TrainConfig, folder: Path, start, world
    ):
        self.uri = uri
        self.run_id, self._ctx, self._run = None, None, None
        if self.uri:
            from nas.tracking import training_run

            params = {
                "space": space.name,
                "space_hash": space_hash(space),
                "space_file": space.source,
                "data": data.spec,
                "data_seed": data.seed,
                **config.to_dict(),
                **world.describe(),
                "sandwich": f"largest+smallest+{config.random_subnets} random",
                "checkpoint": str((folder / ckpt.WEIGHTS).resolve()),
            }
            tags = {"vitnas.role": "supernet", "space": space.name, "resumed_from_epoch": start}
            self._ctx = training_run(self.uri, "vitnas-supernet", f"supernet-{space.name}", params, tags)

    def __enter__(self):
        if self._ctx is not None:
            self._run = self._ctx.__enter__()
            self.run_id = self._run.run_id
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc) if self._ctx is not None else False

    def epoch(self, record: dict) -> None:
        if self._run is not None:
            metrics = {k: v for k, v in record.items() if k != "epoch"}
            self._run.log_metrics(metrics, step=record["epoch"])

    def finish(self, path: Path) -> None:
        if self._run is not None:
            self._run.set_tags({"checkpoint": str(path.resolve())})
            self._run.log_artifact(path.parent / ckpt.SIDECAR)
