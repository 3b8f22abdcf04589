"""AdamW and its learning-rate schedule: linear warm-up, then a cosine down to ``min_lr``."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from nas.training.config import TrainConfig

NO_DECAY_NAMES = ("cls_token", "pos_embed")


def make_optimizer(
    model: nn.Module, config: TrainConfig, lr_scale: Callable[[str], float] | None = None
) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms, class token and position embedding.

    ``lr_scale(name)`` gives a parameter's learning rate as a share of the schedule's (each group's
    ``lr_scale``, as timm's schedulers read it): a trained backbone can move slower than the new
    layers trained on top of it. Groups come in pairs (decay, no decay) per scale, in the order
    the scales first appear: without ``lr_scale``, the two groups of every earlier checkpoint.
    """
    pairs: dict[float, tuple[list, list]] = {}
    for name, p in model.named_parameters():
        decay, no_decay = pairs.setdefault(lr_scale(name) if lr_scale else 1.0, ([], []))
        (no_decay if p.ndim <= 1 or name.endswith(NO_DECAY_NAMES) else decay).append(p)
    groups = []
    for scale, (decay, no_decay) in pairs.items():
        groups += [
            {"params": decay, "weight_decay": config.weight_decay, "lr_scale": scale},
            {"params": no_decay, "weight_decay": 0.0, "lr_scale": scale},
        ]
    return torch.optim.AdamW(groups, lr=config.lr)


def lr_at(step: int, total: int, warmup: int, config: TrainConfig) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``lr`` to ``min_lr`` at ``total``."""
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's ``lr``, times each group's ``lr_scale`` (1 when it has none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
