"""Stand-alone (re)training of an exported architecture, from its ``train.yaml``.

The recipe names the architecture, how to start (inherited supernet weights, or scratch), the
data and the hyperparameters (the same ones as supernet training). The run reports test
accuracy, the one place test data is used, writes ``trained.safetensors`` next to the recipe,
and logs to MLflow with a tag linking back to the search trial it came from.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from tqdm.auto import tqdm

from nas.arch import ArchConfig, format_validation_error, load_arch
from nas.data import load_splits
from nas.errors import UserError
from nas.evaluation import classification_accuracy
from nas.supernet.subnet import VitnasSubnet
from nas.supernet.train import TrainConfig, epoch_batches, make_optimizer
from nas.weights import load_weights, save_weights


class Recipe(BaseModel):
    """``train.yaml``; relative paths are relative to the file."""

    model_config = ConfigDict(extra="forbid")

    arch: str = "arch.yaml"
    init: Literal["inherited", "scratch"] = "inherited"
    weights: str | None = "weights.safetensors"
    data: str = "digits"
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    label_smoothing: float = 0.1
    seed: int = 0
    tracking_uri: str | None = None
    experiment: str = "vitnas-train"
    source_run_id: str | None = None

    def hyperparameters(self) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            min_lr=self.min_lr,
            weight_decay=self.weight_decay,
            warmup_epochs=self.warmup_epochs,
            label_smoothing=self.label_smoothing,
            random_subnets=0,
            seed=self.seed,
        )


@dataclass
class TrainOutcome:
    test_accuracy: float
    val_accuracy: float
    weights: Path
    run_id: str | None
    history: list[dict]


def load_recipe(path: str | Path) -> tuple[Recipe, Path]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such training recipe")
    try:
        return Recipe.model_validate(yaml.safe_load(path.read_text()) or {}), path.parent.resolve()
    except ValidationError as err:
        raise UserError(f"{path}: {format_validation_error(err)}") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None


def train_from_recipe(path: str | Path, *, epochs: int | None = None, progress: bool = True) -> TrainOutcome:
    """Train what ``train.yaml`` describes (``epochs`` overrides the recipe's)."""
    recipe, folder = load_recipe(path)
    if epochs is not None:
        recipe = recipe.model_copy(update={"epochs": epochs})
    arch = load_arch(folder / recipe.arch)
    if not isinstance(arch, ArchConfig):
        raise UserError(
            f"{path}: vitnas train trains psvit architectures; {arch.family} models train with timm's own scripts"
        )
    model = VitnasSubnet(arch)
    if recipe.init == "inherited":
        if not recipe.weights:
            raise UserError(f"{path}: init inherited needs weights (or set init: scratch)")
        load_weights(model, folder / recipe.weights)
    splits = load_splits(recipe.data, arch.image_size, seed=None)
    run_ctx = _tracking(recipe, arch, path)
    with run_ctx as run:
        history = fit(model, splits, recipe.hyperparameters(), run, progress)
        test = classification_accuracy(model, splits.test)["accuracy"]
        out = save_weights(model, folder / "trained.safetensors", metadata={"arch_hash": arch.arch_hash()})
        if run is not None:
            run.log_metrics({"test_accuracy": test})
            run.set_tags({"weights": str(out)})
    return TrainOutcome(test, history[-1]["val_accuracy"], out, getattr(run, "run_id", None), history)


def fit(model, splits, config: TrainConfig, run=None, progress: bool = True) -> list[dict]:
    """Train ``model`` on ``splits.train``, validating each epoch (logged to ``run`` if given).

    nanoGPT-style loop: per-step learning rate, augmentation, label smoothing, clipping.
    """
    torch.manual_seed(config.seed)
    optimizer = make_optimizer(model, config)
    steps = max(1, len(splits.train) // config.batch_size)
    warmup = round(config.warmup_epochs * steps)
    history = []
    bar = tqdm(
        total=config.epochs * steps, unit="step", desc="train", disable=not progress, dynamic_ncols=True, file=sys.stderr
    )
    for epoch in range(config.epochs):
        model.train()
        t0, losses = time.perf_counter(), []
        for _lr, x, y in epoch_batches(splits.train, config, epoch, steps, warmup, optimizer):
            loss = F.cross_entropy(model(x), y, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(epoch=f"{epoch + 1}/{config.epochs}", loss=f"{losses[-1]:.3f}")
        val = classification_accuracy(model, splits.val)
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": sum(losses) / len(losses),
                "val_accuracy": val["accuracy"],
                "val_loss": val["loss"],
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": time.perf_counter() - t0,
            }
        )
        if run is not None:
            run.log_metrics({k: v for k, v in history[-1].items() if k != "epoch"}, step=epoch + 1)
    bar.close()
    return history


def _tracking(recipe: Recipe, arch: ArchConfig, path: Path):
    if not recipe.tracking_uri:
        return contextlib.nullcontext()
    from nas.tracking import training_run

    tags = {"vitnas.role": "train", "arch_hash": arch.arch_hash(), "recipe": str(Path(path).resolve())}
    if recipe.source_run_id:
        tags["vitnas.source_run_id"] = recipe.source_run_id
    return training_run(
        recipe.tracking_uri,
        recipe.experiment,
        f"train-{arch.arch_hash()}",
        recipe.model_dump(exclude={"tracking_uri"}),
        tags,
    )
