"""A plain classifier through the one loop: what ``vitnas train`` and ``vitnas finetune`` run."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from nas.data import Splits
from nas.evaluation import classification_accuracy
from nas.training.batches import Batches
from nas.training.config import TrainConfig
from nas.training.distributed import World
from nas.training.loop import Hooks, SupervisedStep, fit
from nas.training.optim import make_optimizer


def train_classifier(
    model: nn.Module,
    splits: Splits,
    config: TrainConfig,
    world: World,
    *,
    run=None,
    desc: str = "train",
    progress: bool = True,
    log: Callable[[str], None] = print,
    step=None,
) -> list[dict]:
    """Train ``model`` on ``splits.train`` (moved to the world's device), validating every epoch on
    rank 0 and logging each epoch to the MLflow ``run`` when given; returns the history. ``step``:
    the loss (``nas.training.loop.Step``; default cross-entropy with the config's label smoothing)."""
    torch.manual_seed(config.seed)
    model.to(world.device)
    world.broadcast_parameters(model)

    def validate(m: nn.Module) -> dict:
        val = classification_accuracy(m, splits.val, device=world.device)
        return {"val_accuracy": val["accuracy"], "val_loss": val["loss"]}

    def save(history: list[dict]) -> None:
        if run is not None:
            run.log_metrics({k: v for k, v in history[-1].items() if k != "epoch"}, step=history[-1]["epoch"])

    hooks = Hooks(
        validate,
        save,
        report=lambda r: f"epoch {r['epoch']}/{config.epochs}: loss {r['train_loss']:.4f}  val acc "
        f"{r['val_accuracy']:.4f}  ({r['seconds']:.1f} s)",
        log=log,
    )
    batches = Batches(splits.train, config, world, splits.num_classes)
    step = step or SupervisedStep(config.label_smoothing)
    return fit(model, make_optimizer(model, config), step, batches, config, world, hooks, desc=desc, progress=progress)
