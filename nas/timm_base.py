"""The timm model a ``family: timm`` space names, built here and never downloaded.

A reduction-schedule search patches this model once per candidate, so its weights decide what the
accuracies mean: the space's ``weights:`` file, a file given on the command line, or those written
by ``vitnas finetune``. Without weights the model is randomly initialised (accuracy near chance).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from nas.errors import UserError
from nas.space import SearchSpace
from nas.weights import load_weights


def timm_base_model(space: SearchSpace, weights: str | Path | None = None) -> nn.Module:
    """The space's model with its classes, image size and ``model_args``, in eval mode, with
    ``weights`` (or the space's ``weights:``, relative to the space file) loaded; ``UserError`` for
    anything that does not fit."""
    import timm

    spec = space.spec
    kwargs = {"num_classes": spec.num_classes, "img_size": spec.image_size, **spec.model_args}
    try:
        model = timm.create_model(spec.model, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError, AssertionError) as err:
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise UserError(f"space {spec.name}: timm cannot build {spec.model}({args}): {err}") from None
    blocks = len(getattr(model, "blocks", ()))
    if blocks != spec.depth:
        raise UserError(
            f"space {spec.name}: depth is {spec.depth}, but {spec.model} has {blocks} blocks; "
            "set depth to the model's block count"
        )
    path = weights_file(space, weights)
    if path is not None:
        load_weights(model, path)
    return model.eval()


def weights_file(space: SearchSpace, weights: str | Path | None = None) -> Path | None:
    """The weights a timm space's model gets: ``weights`` if given, else the space's ``weights:``
    (relative to the space file), else none."""
    if weights:
        return Path(weights)
    if space.spec.weights:
        return Path(space.source).parent / space.spec.weights
    return None
