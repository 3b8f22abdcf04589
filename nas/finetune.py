"""A quick fine-tune of a timm space's model on the user's data.

A reduction-schedule search (``family: timm``) scores each candidate by the accuracy of the patched
model, which means nothing with random weights, and nothing downloads here: no pretrained weights.
``vitnas finetune`` trains the model (from a local weights file, or from scratch) for a few epochs
on the search's data and writes ``weights.safetensors`` for ``vitnas search --weights``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nas.data import load_splits
from nas.errors import UserError
from nas.evaluation import classification_accuracy
from nas.space import SearchSpace
from nas.supernet.train import TrainConfig
from nas.timm_base import timm_base_model
from nas.train import fit
from nas.weights import save_weights

#: A few epochs of the supernet trainer's recipe, without subnets: what ``vitnas finetune`` runs.
QUICK = TrainConfig(epochs=3, random_subnets=0)


@dataclass
class FinetuneOutcome:
    weights: Path
    val_accuracy: float
    history: list[dict]


def finetune(
    space: SearchSpace,
    out: str | Path,
    *,
    data: str = "digits",
    config: TrainConfig = QUICK,
    init: str | Path | None = None,
    progress: bool = True,
) -> FinetuneOutcome:
    """Train the space's model (starting from ``init`` or the space's weights) and save it to ``out``.

    The validation split is the one ``vitnas search --data`` scores on, and is never trained on.
    """
    if space.family != "timm":
        raise UserError(f"space {space.name} is a supernet space: train it with vitnas train-supernet")
    model = timm_base_model(space, init)
    splits = load_splits(data, space.spec.image_size)
    history = fit(model, splits, config, progress=progress)
    val = classification_accuracy(model, splits.val)["accuracy"]
    metadata = {"model": space.spec.model, "space": space.name, "data": splits.spec.spec, "epochs": str(config.epochs)}
    path = save_weights(model, out, metadata=metadata)
    return FinetuneOutcome(path, val, history)
