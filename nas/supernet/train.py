"""Supernet training: the sandwich rule with in-place distillation (BigNAS: Yu et al. 2020; OFA:
Cai et al. 2020).

Every step trains, on one batch, the largest subnet (cross-entropy with label smoothing), the
smallest (by default with its kinds drawn anew each step: see ``TrainConfig.smallest_kinds``) and
``random_subnets`` random ones (soft cross-entropy against the largest subnet's
detached probabilities, plus ``subnet_label_weight`` times the hard-label cross-entropy), sums
their gradients into the shared weights, clips and takes one AdamW step. The learning rate warms up linearly, then follows a cosine down to ``min_lr``.

Determinism: every random stream of an epoch (loader order, augmentation shifts, subnet draws) is
seeded from ``(seed, epoch)`` alone, and checkpoints fall on epoch boundaries with the optimizer
state, so ``resume`` after a kill continues exactly as an unbroken run of the same seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from nas.arch import ArchConfig
from nas.data import DataSpec, Splits, augment, load_splits, make_loader
from nas.errors import UserError
from nas.space import SearchSpace, _ExtremeChooser, load_space
from nas.supernet import checkpoint as ckpt
from nas.supernet.evaluate import evaluate
from nas.supernet.supernet import Supernet, space_hash

SMALLEST_KINDS = ("fixed", "random")
KIND_CHOICES = (".attention", ".pool", ".method")  # choices of a kind, not of a size


class SmallestSizesChooser:
    """The smallest sizes of a space with kinds drawn from ``rng``: the sandwich's lower bound
    over sizes, without always training the same pooling and attention paths."""

    def __init__(self, rng: random.Random):
        self.rng, self.smallest = rng, _ExtremeChooser(largest=False)

    def choose(self, name, options):
        if name.endswith(KIND_CHOICES):
            return self.rng.choice(list(options))
        return self.smallest.choose(name, options)


def sandwich_archs(space: SearchSpace, config: TrainConfig, draws: random.Random) -> list[ArchConfig]:
    """One step's subnets: largest, smallest (kinds per ``config.smallest_kinds``), random ones."""
    if config.smallest_kinds == "random":
        smallest = space.draw(SmallestSizesChooser(draws))
    else:
        smallest = space.smallest()
    return [space.largest(), smallest] + [space.sample(draws) for _ in range(config.random_subnets)]


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters. The defaults train psvit-digits in about 9 minutes of one CPU core (about
    6.5 s an epoch) to about 99% (largest) and 87-90% (the space's smallest) validation accuracy."""

    epochs: int = 80
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    grad_clip: float = 5.0
    random_subnets: int = 2
    # "random": the smallest subnet of each step keeps the smallest sizes but draws its kinds
    # (attention, pooling, clustering method) at random; "fixed": the space's smallest every step.
    # Fixed kinds train the smallest's pooling and attention paths every step and the others only
    # in random draws, which biases inherited accuracy towards subnets that share those kinds.
    smallest_kinds: str = "random"
    # weight of the hard-label cross-entropy added to the other subnets' distillation loss (OFA
    # uses both); it lifts the small subnets while the largest is still a poor teacher
    subnet_label_weight: float = 1.0
    shift: int = 2  # augmentation: random translation by up to this many pixels
    seed: int = 0

    def __post_init__(self):
        checks = [
            ("epochs", self.epochs >= 1), ("batch_size", self.batch_size >= 1), ("lr", self.lr > 0),
            ("min_lr", 0 <= self.min_lr <= self.lr), ("weight_decay", self.weight_decay >= 0),
            ("warmup_epochs", self.warmup_epochs >= 0), ("label_smoothing", 0 <= self.label_smoothing < 1),
            ("grad_clip", self.grad_clip > 0), ("random_subnets", self.random_subnets >= 0), ("shift", self.shift >= 0),
            ("smallest_kinds", self.smallest_kinds in SMALLEST_KINDS),
        ]  # fmt: skip
        for name, ok in checks:
            if not ok:
                raise UserError(f"supernet training: {name} {getattr(self, name)} is out of range")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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


# -- the step -------------------------------------------------------------------------------------
def sandwich_step(
    net: Supernet, x: torch.Tensor, y: torch.Tensor, archs: list[ArchConfig], config: TrainConfig
) -> float:
    """Backward of the largest (``archs[0]``, hard labels) and of the others distilled from it.

    Gradients accumulate in the shared weights; returns the largest subnet's loss.
    """
    logits = net(x, archs[0])
    loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
    loss.backward()
    teacher = logits.detach().softmax(dim=-1)
    for arch in archs[1:]:
        student = net(x, arch).log_softmax(dim=-1)
        loss_s = -(teacher * student).sum(dim=-1).mean()
        if config.subnet_label_weight:
            loss_s = loss_s + config.subnet_label_weight * F.nll_loss(student, y)
        loss_s.backward()
    return loss.item()


def lr_at(step: int, total: int, warmup: int, config: TrainConfig) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``lr`` to ``min_lr``."""
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(net: Supernet, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms, class token and position embedding."""
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        (no_decay if p.ndim <= 1 or name in ("cls_token", "pos_embed") else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr)


def epoch_batches(data, config: TrainConfig, epoch: int, steps: int, warmup: int, optimizer):
    """One epoch of shuffled, augmented batches, each yielded after its step's learning rate is set.

    Order and augmentation are seeded from (seed, epoch) alone, so a resumed run sees the same batches.
    """
    loader = make_loader(
        data,
        config.batch_size,
        True,
        stream_seed(config.seed, epoch, "order"),
        drop_last=len(data) >= config.batch_size,
    )
    shifts = torch.Generator().manual_seed(stream_seed(config.seed, epoch, "augment"))
    for i, (x, y) in enumerate(loader):
        lr = lr_at(epoch * steps + i, config.epochs * steps, warmup, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        yield lr, augment(x, shifts, config.shift), y


def stream_seed(seed: int, epoch: int, stream: str) -> int:
    """A seed for one random stream of one epoch, from the run seed only (resume-safe)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{epoch}:{stream}".encode(), digest_size=7).digest(), "big")


# -- the run --------------------------------------------------------------------------------------
def train_supernet(
    space: SearchSpace | str,
    data: str | DataSpec | Splits,
    workspace: str | Path,
    config: TrainConfig = TrainConfig(),
    *,
    resume: bool = False,
    force: bool = False,
    tracking_uri: str | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train (or with ``resume`` continue) the supernet of ``space``; checkpoint after every epoch.

    The checkpoint goes to ``WORKSPACE/supernet/<space-name>/``. ``stop_after`` ends this call after
    that many epochs in all (as if killed there; ``resume`` continues). With ``tracking_uri`` the
    run is logged to MLflow (params, per-epoch curves, the checkpoint path).
    """
    space = load_space(space) if isinstance(space, str) else space
    if space.family != "psvit":
        raise UserError(f"space {space.name!r} is family {space.family}: a supernet needs a psvit space")
    splits = data if isinstance(data, Splits) else load_splits(data, space.spec.image_size)
    _check_data(space, splits)
    folder = ckpt.checkpoint_dir(workspace, space)
    torch.manual_seed(config.seed)
    net = Supernet(space)
    optimizer = make_optimizer(net, config)
    start, history = 0, []
    if resume:
        start, history = _restore(folder, net, optimizer, splits.spec, config, log)
    elif (folder / ckpt.SIDECAR).is_file() and not force:
        meta = ckpt.read_meta(folder)
        raise UserError(
            f"{folder}: a checkpoint is there already (epoch {meta['epoch']}/{meta['config']['epochs']}); "
            "pass --resume to continue it or --force to start over"
        )
    end = config.epochs if stop_after is None else min(config.epochs, stop_after)
    if start >= end:
        log(f"checkpoint {folder / ckpt.WEIGHTS} is at epoch {start}/{config.epochs}: nothing to do")
        return TrainResult(folder / ckpt.WEIGHTS, start, history, 0.0)
    run = _Tracking(tracking_uri, space, splits.spec, config, folder, start)
    with run:
        result = _fit(net, optimizer, space, splits, folder, config, start, end, history, run, progress, log)
    result.run_id = run.run_id
    return result


def _fit(
    net, optimizer, space, splits, folder, config, start, end, history, run, progress, log
) -> TrainResult:
    largest, smallest = space.largest(), space.smallest()
    steps = _steps_per_epoch(len(splits.train), config.batch_size)
    warmup = round(config.warmup_epochs * steps)
    t0 = time.perf_counter()
    bar = tqdm(
        total=config.epochs * steps,
        initial=start * steps,
        unit="step",
        desc=f"supernet {space.name}",
        disable=not progress,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    try:
        for epoch in range(start, end):
            net.train()
            draws = random.Random(stream_seed(config.seed, epoch, "archs"))
            losses, t_epoch, seen = [], time.perf_counter(), 0
            for lr, x, y in epoch_batches(splits.train, config, epoch, steps, warmup, optimizer):
                archs = sandwich_archs(space, config, draws)
                optimizer.zero_grad(set_to_none=True)
                losses.append(sandwich_step(net, x, y, archs, config))
                torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
                optimizer.step()
                seen += len(y)
                bar.update()
                bar.set_postfix(
                    epoch=f"{epoch + 1}/{config.epochs}",
                    loss=f"{losses[-1]:.3f}",
                    lr=f"{lr:.2e}",
                    img_s=f"{seen / (time.perf_counter() - t_epoch):.0f}",
                )
            history.append(
                _epoch_record(
                    net, splits, largest, smallest, epoch, losses, lr, time.perf_counter() - t_epoch
                )
            )
            meta = {
                "epoch": epoch + 1,
                "config": config.to_dict(),
                "data": splits.spec.to_dict(),
                "history": history,
                "complete": epoch + 1 == config.epochs,
            }
            path = ckpt.save_checkpoint(folder, net, optimizer, meta)
            run.epoch(history[-1])
            rec = history[-1]
            (bar.write if progress else log)(
                f"epoch {epoch + 1}/{config.epochs}: loss {rec['train_loss']:.4f}  val acc largest "
                f"{rec['val_acc_largest']:.4f} smallest {rec['val_acc_smallest']:.4f}  ({rec['seconds']:.1f} s)"
            )
    finally:
        bar.close()
    run.finish(path)
    wall = time.perf_counter() - t0
    log(
        f"checkpoint: {path}\nepoch {end}/{config.epochs}: val accuracy largest {history[-1]['val_acc_largest']:.4f}, "
        f"smallest {history[-1]['val_acc_smallest']:.4f} ({wall:.0f} s)"
    )
    return TrainResult(path, end, history, wall)


def _epoch_record(net, splits, largest, smallest, epoch, losses, lr, seconds) -> dict:
    net.eval()
    big, small = evaluate(net, largest, splits.val), evaluate(net, smallest, splits.val)
    return {
        "epoch": epoch + 1,
        "train_loss": sum(losses) / max(1, len(losses)),
        "lr": lr,
        "val_acc_largest": big.accuracy,
        "val_loss_largest": big.loss,
        "val_acc_smallest": small.accuracy,
        "val_loss_smallest": small.loss,
        "seconds": seconds,
    }


def _steps_per_epoch(n: int, batch_size: int) -> int:
    return n // batch_size if n >= batch_size else 1


def _check_data(space: SearchSpace, splits: Splits) -> None:
    if splits.num_classes != space.spec.num_classes:
        raise UserError(
            f"data {splits.spec.spec} has {splits.num_classes} classes, space {space.name!r} "
            f"expects {space.spec.num_classes}"
        )
    if len(splits.train) == 0 or len(splits.val) == 0:
        raise UserError(f"data {splits.spec.spec}: the train and validation splits must not be empty")


def _restore(
    folder: Path, net: Supernet, optimizer, data: DataSpec, config: TrainConfig, log
) -> tuple[int, list[dict]]:
    """Weights, optimizer state, epoch and history of the checkpoint in ``folder``, after checking
    that it is the same space, data and settings (epochs may grow)."""
    meta = ckpt.read_meta(folder)
    ckpt.check_space(meta, net.space, folder)
    if meta["data"] != data.to_dict():
        raise UserError(
            f"{folder}: checkpoint was trained on data {meta['data']['spec']} (split seed "
            f"{meta['data']['seed']}), not {data.spec} (split seed {data.seed})"
        )
    saved = {k: v for k, v in meta["config"].items() if k != "epochs"}
    changed = [f"{k} {saved[k]} -> {v}" for k, v in config.to_dict().items() if k in saved and saved[k] != v]
    if changed:
        raise UserError(
            f"{folder}: resume continues with the checkpoint's settings; these differ: {', '.join(changed)}"
        )
    if meta["config"]["epochs"] != config.epochs:
        log(
            f"{folder}: the checkpoint planned {meta['config']['epochs']} epochs, continuing to {config.epochs} "
            "(the learning-rate schedule stretches from here on)"
        )
    loaded, _ = ckpt.load_checkpoint(folder, net.space)
    net.load_state_dict(loaded.state_dict())
    ckpt.load_optimizer(folder, net, optimizer, meta)
    return int(meta["epoch"]), list(meta["history"])


class _Tracking:
    """The run's MLflow record (``nas.tracking.training_run``), or nothing without a tracking URI."""

    def __init__(
        self,
        uri: str | None,
        space: SearchSpace,
        data: DataSpec,
        config: TrainConfig,
        folder: Path,
        start: int,
    ):
        self.uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
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
