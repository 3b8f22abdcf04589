"""Stand-alone (re)training of an exported architecture (any family), from its ``train.yaml``.

The recipe names the architecture, how to start (inherited supernet weights, or scratch), the
data and the hyperparameters (the same ones as supernet training). The run reports test
accuracy, the one place test data is used, writes ``trained.safetensors`` next to the recipe,
and logs to MLflow with a tag linking back to the search trial it came from.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nas.arch import format_validation_error, load_arch
from nas.data import load_splits
from nas.errors import UserError
from nas.evaluation import classification_accuracy
from nas.families import family_of
from nas.names import ARCH_HASH, ROLE, SOURCE_RUN
from nas.training import distributed
from nas.training.classifier import train_classifier
from nas.training.config import TrainConfig
from nas.weights import load_weights, save_weights


class Recipe(BaseModel):
    """``train.yaml``; relative paths are relative to the file."""

    model_config = ConfigDict(extra="forbid")

    arch: str = "arch.yaml"
    init: Literal["inherited", "scratch"] = "inherited"
    weights: str | None = "weights.safetensors"
    weights_hash: str | None = None  # file_hash of the weights as exported: verified before training
    data: str = "digits"
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False)
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    label_smoothing: float = 0.1
    aug: str = "light"
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
            aug=self.aug,
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


def train_from_recipe(
    path: str | Path,
    *,
    epochs: int | None = None,
    device: str = "auto",
    runtime: dict | None = None,
    progress: bool = True,
) -> TrainOutcome | None:
    """Train what ``train.yaml`` describes (``epochs`` overrides the recipe's) on ``device``; None on
    processes other than rank 0.

    ``runtime``: how to run it, not what (``precision``, ``accum_steps``, ``compile``,
    ``loader_workers``). Runs in this process or as one of torchrun's; rank 0 writes.
    """
    recipe, folder = load_recipe(path)
    if epochs is not None:
        recipe = recipe.model_copy(update={"epochs": epochs})
    config = recipe.hyperparameters().replace(**(runtime or {}))
    arch = load_arch(folder / recipe.arch)
    model = family_of(arch).build(arch)  # a psvit subnet, or a timm model with its reduction schedule
    if recipe.init == "inherited":
        if not recipe.weights:
            raise UserError(f"{path}: init inherited needs weights (or set init: scratch)")
        load_weights(model, folder / recipe.weights, expect_hash=recipe.weights_hash, recorded_in=path)
    splits = load_splits(recipe.data, arch.image_size, seed=None, aug=config.aug)
    world = distributed.start(device, config.precision)
    try:
        with _tracking(recipe, arch, path, config, world) as run:
            step = family_of(arch).training_step(arch, config, world.device)
            history = train_classifier(model, splits, config, world, run=run, progress=progress, step=step)
            if not world.main:
                return None
            test = classification_accuracy(model, splits.test, device=world.device)["accuracy"]
            out = save_weights(
                model, folder / "trained.safetensors", metadata={"arch_hash": arch.arch_hash()}
            )
            if run is not None:
                run.log_metrics({"test_accuracy": test})
                run.set_tags({"weights": str(out)})
    finally:
        world.close()
    return TrainOutcome(test, history[-1]["val_accuracy"], out, getattr(run, "run_id", None), history)


def _tracking(recipe: Recipe, arch, path: Path, config: TrainConfig, world: distributed.World):
    if not recipe.tracking_uri or not world.main:
        return contextlib.nullcontext()
    from nas.tracking import training_run

    tags = {ROLE: "train", ARCH_HASH: arch.arch_hash(), "recipe": str(Path(path).resolve())}
    if recipe.source_run_id:
        tags[SOURCE_RUN] = recipe.source_run_id
    return training_run(
        recipe.tracking_uri,
        recipe.experiment,
        f"train-{arch.arch_hash()}",
        {**recipe.model_dump(exclude={"tracking_uri"}), **config.to_dict(), **world.describe()},
        tags,
    )
