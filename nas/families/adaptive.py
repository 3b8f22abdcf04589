"""The adaptive family: a timm ViT with AdaViT decision networks, searched over usage budgets
(``family: adaptive``).

A member is the space's model patched by ``nas.ops.adavit_patch`` at one budget per kind (patch,
head, block; 1.0: that kind is not decided). Every member shares one weights file, backbone and
decision networks, written by ``vitnas finetune --adaptive`` over the space's range of budgets:
the decision networks are *budget-conditioned* (``nas.ops.adavit.DecisionNet``), so one training
over a range serves every budget in it, and a candidate costs an evaluation, never a fine-tune.
(Thresholds on one network's keep probabilities would also need no fine-tune, but they move all
kinds together and leave the usage the network learned to keep unrelated to the threshold; the
budget input says what is wanted.) The file is frozen under the workspace when a campaign starts,
so export copies exactly what was scored. Without weights the model is randomly initialised.

Cost depends on the image: the scorer takes FLOPs and latency over a fixed sample of validation
images (``nas.hardware.input_cost``).
"""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

from nas.arch import AdaptiveArch
from nas.errors import UserError
from nas.families import Candidates, ExportedWeights
from nas.families.timm import (
    copy_scored_weights,
    create,
    freeze_weights,
    model_call,
    weights_digest,
    weights_file,
)
from nas.space import AdaptiveSpace, Chooser, SearchSpace

NAME = "adaptive"
WEIGHTS_TAG = "weights_hash"
FROZEN_TAG = "frozen_weights"
WEIGHTS = "weights.safetensors"
KINDS = ("patch", "head", "block")
#: the safetensors metadata key under which ``vitnas finetune --adaptive`` records its training
META_KEY = "adavit"

USAGE = """import timm
from nas.ops import adavit_patch
from nas.weights import load_weights
model = timm.create_model({call})
adavit_patch.apply(model, {schedule!r})
{load}model.eval()  # inference skips what the decisions drop"""


# -- drawing ------------------------------------------------------------------------------------
def draw(spec: AdaptiveSpace, chooser: Chooser) -> AdaptiveArch:
    a = spec.adavit
    usage = {}
    for kind in KINDS:
        options = getattr(a, kind)
        usage[kind] = chooser.choose(f"usage.{kind}", options) if len(options) > 1 else options[0]
    return AdaptiveArch(
        model=spec.model, image_size=spec.image_size, num_classes=spec.num_classes, usage=usage,
        head_mode=a.head_mode, start=a.start, model_args=spec.model_args,
    )  # fmt: skip


def _members(spec: AdaptiveSpace) -> set[str]:
    from nas.space import ReplayChooser

    a = spec.adavit
    combos = itertools.product(a.patch, a.head, a.block)
    return {
        draw(spec, ReplayChooser({f"usage.{k}": v for k, v in zip(KINDS, combo)})).to_json()
        for combo in combos
    }


def contains(spec: AdaptiveSpace, arch: AdaptiveArch) -> bool:
    return arch.to_json() in _members(spec)


def count(spec: AdaptiveSpace) -> int:
    a = spec.adavit
    return len(a.patch) * len(a.head) * len(a.block)


# -- description ----------------------------------------------------------------------------------
def describe_choices(choices: dict) -> list[str]:
    return [f"  {key:<12} {value}" for key, value in choices.items()]


def describe_arch(arch: AdaptiveArch) -> str:
    budgets = ", ".join(f"{k} {v:g}" for k, v in arch.usage.items()) or "none (the full model)"
    return f"{arch.model} @ {arch.image_size}px, AdaViT budgets {budgets} ({arch.head_mode} heads, from block {arch.start})"


def drawing(arch: AdaptiveArch) -> dict:
    """What the dashboard shows of a member: the model and its budgets."""
    return {"family": NAME, "model": arch.model, "image_size": arch.image_size, "num_classes": arch.num_classes,
            "usage": dict(arch.usage), "head_mode": arch.head_mode, "start": arch.start,
            "schedule": arch.schedule}  # fmt: skip


# -- models ---------------------------------------------------------------------------------------
def input_chw(arch: AdaptiveArch) -> tuple[int, int, int]:
    return (int(arch.model_args.get("in_chans", 3)), arch.image_size, arch.image_size)


def _model_kwargs(arch_or_spec) -> dict:
    return {
        "num_classes": arch_or_spec.num_classes,
        "img_size": arch_or_spec.image_size,
        **arch_or_spec.model_args,
    }


def patch(model, schedule: dict, name: str):
    """``adavit_patch.apply`` in place; a model or schedule it cannot take is a ``UserError``."""
    from nas.ops import adavit_patch

    try:
        return adavit_patch.apply(model, schedule)
    except ValueError as err:
        raise UserError(f"{name}: cannot apply AdaViT {schedule}: {err}") from None


def build(arch: AdaptiveArch, reduce: dict | None = None):
    """The member's patched model, randomly initialised (decision networks included)."""
    if reduce is not None:
        raise UserError("an adaptive architecture carries its own AdaViT decisions: it takes no --reduce")
    return patch(create(arch.model, **_model_kwargs(arch)), arch.schedule, arch.model)


def backbone_model(space: SearchSpace, init: str | Path | None = None):
    """The space's timm model without decision networks, with ``init`` (backbone weights) loaded:
    what ``vitnas finetune`` without ``--adaptive`` trains."""
    from nas.weights import load_weights

    spec = space.spec
    model = create(spec.model, **_model_kwargs(spec))
    _check_depth(spec, model)
    if init is not None:
        if _has_decisions(init):
            raise UserError(
                f"{init}: holds AdaViT decision networks; the backbone alone is trained without --adaptive"
            )
        load_weights(model, init)
    return model.eval()


def _check_depth(spec, model) -> None:
    blocks = len(getattr(model, "blocks", ()))
    if blocks != spec.depth:
        raise UserError(
            f"space {spec.name}: depth is {spec.depth}, but {spec.model} has {blocks} blocks; set depth to the model's block count"
        )


def adaptive_model(
    spec, weights: str | Path | None, *, start: int, head_mode: str, usage: dict | None = None
):
    """The model of a timm or adaptive space's spec patched with AdaViT (``start``, ``head_mode``),
    in eval mode, with ``weights`` loaded: an adaptive file (decision networks included) or plain
    backbone weights (the decision networks then start fresh)."""
    from nas.weights import load_weights

    model = create(spec.model, **_model_kwargs(spec))
    _check_depth(spec, model)
    schedule = {"kind": "adavit", "usage": usage or {}, "head_mode": head_mode, "start": start}
    if weights is not None and not _has_decisions(weights):
        load_weights(model, weights)  # a backbone: the decision networks are added after
        return patch(model, schedule, spec.model).eval()
    patch(model, schedule, spec.model)
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def _has_decisions(path: str | Path) -> bool:
    """Whether a weights file holds decision networks (``adavit.*`` tensors)."""
    from safetensors import safe_open

    from nas.weights import read_metadata

    read_metadata(path)  # a file that is not safetensors is a UserError here
    with safe_open(str(path), "pt") as f:
        return any(k.startswith("adavit.") for k in f.keys())


def trained_settings(path: str | Path) -> dict | None:
    """What ``vitnas finetune --adaptive`` recorded in a weights file (budget ranges, start, head
    mode), or None for a file it did not write."""
    from nas.weights import read_metadata

    text = read_metadata(path).get(META_KEY)
    return json.loads(text) if text else None


def check_trained(space: SearchSpace, path: Path) -> None:
    """``UserError`` when the weights' decision networks were trained for other settings or do not
    decide a kind the space searches."""
    trained = trained_settings(path)
    if trained is None:
        return
    a = space.spec.adavit
    for key in ("start", "head_mode"):
        if trained.get(key) != getattr(a, key):
            raise UserError(
                f"{path}: decision networks trained with {key} {trained.get(key)!r}, the space {space.name} "
                f"asks for {getattr(a, key)!r}"
            )
    ranges = trained.get("ranges", {})
    for kind in KINDS:
        if any(v < 1 for v in getattr(a, kind)) and kind not in ranges:
            raise UserError(
                f"{path}: the space searches {kind} budgets, but its decision networks were trained to decide "
                f"only {', '.join(ranges) or 'nothing'} (vitnas finetune --adaptive {kind}=LO..HI,...)"
            )


def base_model(space: SearchSpace, weights: str | Path | None = None):
    """The space's model with its decision networks and ``weights`` (or the space's ``weights:``)."""
    a = space.spec.adavit
    path = weights_file(space, weights)
    if path is not None:
        if not Path(path).is_file():
            raise UserError(f"{path}: no such weights file")
        check_trained(space, Path(path))
    return adaptive_model(space.spec, path, start=a.start, head_mode=a.head_mode)


def candidates(space, *, workspace, device, supernet, weights, data, val_subset) -> Candidates:
    """Copies of the space's adaptive model at each candidate's budgets, weights frozen under ``workspace``."""
    from nas.data import load_splits

    frozen = freeze_weights(weights_file(space, weights), workspace)
    base = base_model(space, frozen / WEIGHTS if frozen else None).to(device)
    splits = load_splits(data or "digits", space.spec.image_size, val_subset=val_subset)

    def candidate(arch: AdaptiveArch):
        return patch(copy.deepcopy(base), arch.schedule, arch.model).eval()

    return Candidates(
        build=candidate, val_data=splits.val, data_spec=splits.spec.spec,
        weights_hash=weights_digest(frozen / WEIGHTS) if frozen else None, weights_tag=WEIGHTS_TAG, frozen=frozen,
    )  # fmt: skip


def worker_inputs(folder: str) -> dict[str, str]:
    """A Ray worker's campaign settings for the frozen files shipped to ``folder``."""
    return {"weights": str(Path(folder) / WEIGHTS), "supernet": None}


def training_step(arch: AdaptiveArch, config, device):
    """Cross-entropy plus the usage loss at the architecture's budgets (and distillation from the model
    with every decision off), as ``vitnas finetune --adaptive`` trains: without the usage loss the
    decision networks would learn to keep everything."""
    from nas.adaptive_finetune import AdaptiveStep
    from nas.adaptive_spec import AdaptiveSpec

    spec = AdaptiveSpec({k: (v, v) for k, v in arch.usage.items()}, head_mode=arch.head_mode, start=arch.start)
    return AdaptiveStep(spec, config.label_smoothing, config.seed, device, config.epochs)


# -- export ---------------------------------------------------------------------------------------
def export_weights(arch: AdaptiveArch, record: dict, out: Path) -> ExportedWeights:
    """A copy of the weights file (backbone + decision networks) the campaign scored with."""
    digest = copy_scored_weights(record, out)
    call = model_call(arch.model, _model_kwargs(arch))
    if digest is None:
        usage = USAGE.format(call=call, schedule=arch.schedule, load="")
        return ExportedWeights([], "none: the campaign scored the model with random weights", None, usage)
    load = f'load_weights(model, "{out / WEIGHTS}")  # backbone + decision networks\n'
    usage = USAGE.format(call=call, schedule=arch.schedule, load=load)
    return ExportedWeights([WEIGHTS], f"backbone and decision networks {digest}", digest, usage)
