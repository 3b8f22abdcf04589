"""The training loop: every model vitnas trains goes through ``fit``.

Per optimizer step: set the learning rate, run the *step* over this process's micro-batches
(forward under autocast, backward of the loss scaled by the accumulation count), average the
gradients over processes once, unscale, clip, step. Per epoch: validate and checkpoint on rank 0.
What differs between the supernet and a plain model is only the step: ``SupervisedStep`` here,
the sandwich rule in ``nas.supernet.train``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from nas.training.batches import Batches, MicroBatch
from nas.training.config import TrainConfig
from nas.training.distributed import World
from nas.training.optim import lr_at, set_lr
from nas.training.precision import autocast, grad_scaler

#: the history's per-epoch timings (the rest of a record is exactly reproducible)
TIMING_KEYS = ("seconds", "images_per_s", "data_wait_share")


@dataclass
class StepContext:
    """What a step needs to run its forwards and backwards the way the run asks."""

    device: torch.device
    precision: str
    scaler: torch.amp.GradScaler
    micro_batches: int

    def forward(self):
        """The autocast context for a forward pass."""
        return autocast(self.device, self.precision)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate ``loss``'s gradients, as a share of the step (micro-batches average)."""
        self.scaler.scale(loss / self.micro_batches).backward()


class Step(Protocol):
    """One optimizer step's forwards and backwards over this process's micro-batches."""

    def start_epoch(self, epoch: int) -> None: ...

    def __call__(self, model: nn.Module, batches: list[MicroBatch], ctx: StepContext) -> float:
        """Run the backwards; return the step's loss for the progress bar and history."""
        ...


def classification_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy against class indices (smoothed) or soft targets (Mixup's, smoothed already)."""
    if target.is_floating_point():
        return -(target * logits.float().log_softmax(dim=-1)).sum(dim=-1).mean()
    return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)


class SupervisedStep:
    """A plain model: cross-entropy on every micro-batch."""

    def __init__(self, label_smoothing: float):
        self.label_smoothing = label_smoothing

    def start_epoch(self, epoch: int) -> None:
        pass

    def __call__(self, model: nn.Module, batches: list[MicroBatch], ctx: StepContext) -> float:
        losses = []
        for x, target in batches:
            with ctx.forward():
                logits = model(x)
            loss = classification_loss(logits, target, self.label_smoothing)
            ctx.backward(loss)
            losses.append(loss.detach())
        return torch.stack(losses).mean().item()


@dataclass
class Hooks:
    """What the caller does at the end of an epoch, on rank 0: ``validate`` (metrics of the model),
    ``save`` (the checkpoint of the history so far), ``report`` (the epoch's line, given to ``log``);
    then on every process, once rank 0 has saved: ``after_epoch(epochs done)`` (e.g. Ray Train's
    per-epoch report, which every worker must make)."""

    validate: Callable[[nn.Module], dict]
    save: Callable[[list[dict]], None] = lambda history: None
    after_epoch: Callable[[int], None] = lambda epoch: None
    report: Callable[[dict], str] | None = None
    log: Callable[[str], None] = print


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: Step,
    batches: Batches,
    config: TrainConfig,
    world: World,
    hooks: Hooks,
    *,
    start: int = 0,
    end: int | None = None,
    history: list[dict] | None = None,
    desc: str = "train",
    progress: bool = True,
) -> list[dict]:
    """Train epochs ``start`` .. ``end`` (default: ``config.epochs``); returns the history of all epochs."""
    end, history = config.epochs if end is None else end, list(history or [])
    steps = batches.steps_per_epoch
    warmup, total = round(config.warmup_epochs * steps), config.epochs * steps
    scaler = grad_scaler(world.device, config.precision)
    ctx = StepContext(world.device, config.precision, scaler, config.accum_steps)
    forward = torch.compile(model) if config.compile else model
    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(
        total=total, initial=start * steps, unit="step", desc=desc, disable=not (progress and world.main),
        dynamic_ncols=True, file=sys.stderr,
    )  # fmt: skip
    try:
        for epoch in range(start, end):
            model.train()
            step.start_epoch(epoch)
            losses, waited, t0 = [], 0.0, time.perf_counter()
            t_ready = t0
            for i, micro in enumerate(batches.epoch(epoch)):
                waited += time.perf_counter() - t_ready
                lr = lr_at(epoch * steps + i, total, warmup, config)
                set_lr(optimizer, lr)
                optimizer.zero_grad(set_to_none=True)
                losses.append(step(forward, micro, ctx))
                world.reduce_gradients(params)
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                bar.update()
                bar.set_postfix(epoch=f"{epoch + 1}/{config.epochs}", loss=f"{losses[-1]:.3f}", lr=f"{lr:.2e}")
                t_ready = time.perf_counter()
            seconds = time.perf_counter() - t0
            record = {  # the timings are TIMING_KEYS
                "epoch": epoch + 1,
                "train_loss": world.mean(sum(losses) / len(losses)),
                "lr": lr,
                "images_per_s": steps * config.batch_size / seconds,
                "data_wait_share": world.mean(waited / seconds),
            }
            if world.main:
                model.eval()
                record.update(hooks.validate(model))
                record["seconds"] = time.perf_counter() - t0
                history.append(record)
                hooks.save(history)
                if hooks.report is not None:
                    (bar.write if progress else hooks.log)(hooks.report(record))
            else:
                history.append(record)
            world.barrier()
            hooks.after_epoch(epoch + 1)
    finally:
        bar.close()
    return history
