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
from nas.evaluation import classification_accuracy
from nas.families import require
from nas.families.timm import base_model
from nas.space import SearchSpace
from nas.training import distributed
from nas.training.classifier import train_classifier
from nas.training.config import TrainConfig
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
    device: str = "auto",
    progress: bool = True,
    adaptive=None,
    **adaptive_options,
) -> FinetuneOutcome | None:
    """Train the space's model (starting from ``init`` or the space's weights) and save it to ``out``.

    The validation split is the one ``vitnas search --data`` scores on, and is never trained on.
    Runs in this process or as one of torchrun's; rank 0 writes (the others return None).
    ``adaptive`` (a ``nas.adaptive_spec.AdaptiveSpec``) trains AdaViT's decision networks instead,
    with ``adaptive_options`` (``train_backbone``, ``resume``, ``force``, ``tracking_uri``); without
    it an adaptive space's backbone is trained (from ``init`` or scratch), as a timm space's model.
    """
    if adaptive is not None:
        from nas.adaptive_finetune import adaptive_finetune

        return adaptive_finetune(
            space, out, adaptive, data=data, config=config, init=init, device=device, progress=progress,
            **adaptive_options,
        )  # fmt: skip
    if space.family == "adaptive":
        from nas.families.adaptive import backbone_model

        model = backbone_model(space, init)
    else:
        require(space, "timm", "vitnas finetune (train a psvit space's supernet with vitnas train-supernet)")
        model = base_model(space, init)
    splits = load_splits(data, space.spec.image_size, aug=config.aug)
    world = distributed.start(device, config.precision)
    try:
        history = train_classifier(model, splits, config, world, desc="finetune", progress=progress)
        if not world.main:
            return None
        val = classification_accuracy(model, splits.val, device=world.device)["accuracy"]
        metadata = {
            "model": space.spec.model, "space": space.name, "data": splits.spec.spec, "epochs": str(config.epochs),
            "precision": config.precision, "world_size": str(world.size),
        }  # fmt: skip
        path = save_weights(model, out, metadata=metadata)
    finally:
        world.close()
    return FinetuneOutcome(path, val, history)
