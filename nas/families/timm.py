"""The timm family: an existing timm ViT patched with a token-reduction schedule (``family: timm``).

A member is the space's model with a ToMe or EViT schedule (``nas.ops.timm_patch``); every member
shares the model's weights: the space's ``weights:`` file, a file given on the command line, or
those written by ``vitnas finetune``, frozen under the workspace when a campaign starts so that
export copies exactly the file scored. Without weights the model is randomly initialised
(accuracy near chance). Nothing downloads: ``pretrained=False`` always.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

from nas.arch import TimmArch
from nas.errors import UserError
from nas.families import Candidates, ExportedWeights
from nas.space import Chooser, ReplayChooser, SearchSpace, TimmSpace

NAME = "timm"
WEIGHTS_TAG = "weights_hash"
FROZEN_TAG = "frozen_weights"  # the campaign's frozen copy of what it scored
WEIGHTS = "weights.safetensors"

USAGE = """import timm
from nas.ops import timm_patch
model = timm.create_model({call})
timm_patch.apply(model, {schedule!r})"""


# -- drawing ------------------------------------------------------------------------------------
def draw(spec: TimmSpace, chooser: Chooser) -> TimmArch:
    red = spec.reduction
    kind = chooser.choose("reduction", red.kind) if len(red.kind) > 1 else red.kind[0]
    schedule: dict[str, Any] = {"kind": "none"}
    if kind == "tome":
        r = chooser.choose("tome.r", red.tome.r)
        rule = chooser.choose("tome.rule", red.tome.rule)
        schedule = _tome_schedule(r, rule, spec.depth)
    elif kind == "evit":
        keep = chooser.choose("evit.keep_rate", red.evit.keep_rate)
        layers = chooser.choose("evit.layers", [",".join(map(str, ls)) for ls in red.evit.layers])
        schedule = {"kind": "evit", "keep_rate": keep, "layers": [int(b) for b in layers.split(",")]}
    return TimmArch(
        model=spec.model,
        image_size=spec.image_size,
        num_classes=spec.num_classes,
        schedule=schedule,
        model_args=spec.model_args,
    )


def _tome_schedule(r: int, rule: str, depth: int) -> dict[str, Any]:
    """Per-block merges: ``constant`` r everywhere, ``decreasing`` from 2r down to 0 (ToMe paper)."""
    if r == 0:
        return {"kind": "none"}
    if rule == "constant":
        return {"kind": "tome", "r": [r] * depth}
    return {
        "kind": "tome",
        "r": [round(2 * r * (1 - b / (depth - 1))) if depth > 1 else r for b in range(depth)],
    }


def _timm_members(spec: TimmSpace) -> set[str]:
    """Canonical JSON of every member (schedules are dicts, so the archs themselves don't hash)."""
    red = spec.reduction
    params: list[dict[str, Any]] = []
    for kind in red.kind:
        if kind == "tome":
            params += [
                {"reduction": kind, "tome.r": r, "tome.rule": rule}
                for r in red.tome.r
                for rule in red.tome.rule
            ]
        elif kind == "evit":
            layers = [",".join(map(str, ls)) for ls in red.evit.layers]
            params += [
                {"reduction": kind, "evit.keep_rate": k, "evit.layers": ls}
                for k in red.evit.keep_rate
                for ls in layers
            ]
        else:
            params.append({"reduction": kind})
    return {draw(spec, ReplayChooser(p)).to_json() for p in params}


def contains(spec: TimmSpace, arch: TimmArch) -> bool:
    return arch.to_json() in _timm_members(spec)


def count(spec: TimmSpace) -> int:
    return len(_timm_members(spec))


# -- description ----------------------------------------------------------------------------------
def describe_choices(choices: dict) -> list[str]:
    return [f"  {key:<12} {value}" for key, value in choices.items()]


def describe_arch(arch: TimmArch) -> str:
    return f"{arch.model} @ {arch.image_size}px, schedule {arch.schedule}"


def drawing(arch: TimmArch) -> dict:
    """What the dashboard shows of a member: the model and its schedule."""
    return {"family": NAME, "model": arch.model, "image_size": arch.image_size,
            "num_classes": arch.num_classes, "schedule": arch.schedule}  # fmt: skip


# -- models ---------------------------------------------------------------------------------------
def create(name: str, **kwargs):
    """``timm.create_model(name, pretrained=False, **kwargs)``; ``UserError`` when timm cannot."""
    import timm

    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError, AssertionError) as err:
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"timm cannot build {name}({args}): {reason} (see timm.list_models())") from None


def patch(model, schedule: dict, name: str):
    """``timm_patch.apply`` in place; a schedule the model cannot take is a ``UserError``."""
    if schedule == {"kind": "none"}:
        return model
    from nas.ops import timm_patch

    try:
        return timm_patch.apply(model, schedule)
    except ValueError as err:
        raise UserError(f"{name}: cannot apply {schedule}: {err}") from None


def input_chw(arch: TimmArch) -> tuple[int, int, int]:
    return (int(arch.model_args.get("in_chans", 3)), arch.image_size, arch.image_size)


def build(arch: TimmArch, reduce: dict | None = None):
    """The member's patched model, randomly initialised (``reduce``: another schedule instead of its own)."""
    model = create(arch.model, **_model_kwargs(arch))
    return patch(model, arch.schedule if reduce is None else reduce, arch.model)


def _model_kwargs(arch: TimmArch) -> dict[str, Any]:
    return {"num_classes": arch.num_classes, "img_size": arch.image_size, **arch.model_args}


def base_model(space: SearchSpace, weights: str | Path | None = None):
    """The space's model with its classes, image size and ``model_args``, in eval mode, with
    ``weights`` (or the space's ``weights:``, relative to the space file) loaded; ``UserError`` for
    anything that does not fit."""
    from nas.weights import load_weights

    spec = space.spec
    model = create(spec.model, num_classes=spec.num_classes, img_size=spec.image_size, **spec.model_args)
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


def candidates(space, *, workspace, device, supernet, weights, data, val_subset) -> Candidates:
    """Copies of the space's model, patched per candidate, with its weights frozen under ``workspace``."""
    from nas.data import load_splits

    frozen = freeze_weights(weights_file(space, weights), workspace)
    base = base_model(space, frozen / WEIGHTS if frozen else None).to(
        device
    )  # each candidate copies it there
    splits = load_splits(data or "digits", space.spec.image_size, val_subset=val_subset)

    def candidate(arch: TimmArch):
        return patch(copy.deepcopy(base).eval(), arch.schedule, arch.model)

    return Candidates(
        build=candidate,
        val_data=splits.val,
        data_spec=splits.spec.spec,
        weights_hash=weights_digest(frozen / WEIGHTS) if frozen else None,
        weights_tag=WEIGHTS_TAG,
        frozen=frozen,
    )


def freeze_weights(path: Path | None, workspace) -> Path | None:
    if path is None:
        return None
    from nas.files import freeze

    if not path.is_file():
        raise UserError(f"{path}: no such weights file")
    digest = weights_digest(path)
    frozen = freeze({WEIGHTS: path}, Path(workspace).resolve() / "frozen" / f"weights-{digest}")
    if weights_digest(frozen / WEIGHTS) != digest:
        shutil.rmtree(frozen, ignore_errors=True)
        raise UserError(f"{path}: the weights file changed while it was being read")
    return frozen


def weights_digest(path: Path) -> str:
    from nas.weights import file_hash

    return file_hash(path)


def worker_inputs(folder: str) -> dict[str, str]:
    """A Ray worker's campaign settings for the frozen files shipped to ``folder``."""
    return {"weights": str(Path(folder) / WEIGHTS), "supernet": None}


def training_step(arch: TimmArch, config, device) -> None:
    """A patched timm model trains on plain cross-entropy (``nas.training.loop.SupervisedStep``)."""
    return None


# -- export ---------------------------------------------------------------------------------------
def export_weights(arch: TimmArch, record: dict, out: Path) -> ExportedWeights:
    """A copy of the weights file the campaign scored with (none when it scored random weights)."""
    digest = copy_scored_weights(record, out)
    call = model_call(arch.model, _model_kwargs(arch))
    if digest is None:
        usage = USAGE.format(call=call, schedule=arch.schedule)
        return ExportedWeights([], "none: the campaign scored the model with random weights", None, usage)
    usage = USAGE.format(
        call=f'{call},\n                          checkpoint_path="{out / WEIGHTS}"', schedule=arch.schedule
    )
    return ExportedWeights([WEIGHTS], f"the model's weights {digest}", digest, usage)


def model_call(model: str, kwargs: dict) -> str:
    """The arguments of ``timm.create_model`` that build ``model`` with ``kwargs``, as Python source."""
    return ", ".join([repr(model), "pretrained=False", *(f"{k}={v!r}" for k, v in kwargs.items())])


def copy_scored_weights(record: dict, out: Path) -> str | None:
    """Copy the weights file the campaign scored with to ``out / WEIGHTS``, refused unless its hash is
    the one recorded; returns that hash (None: the campaign scored random weights, nothing copied)."""
    params, tags = record["params"], record["tags"]
    scored = record["trial_tags"].get(WEIGHTS_TAG) or tags.get(WEIGHTS_TAG)
    source = _recorded_weights(params, tags)
    if source is None:
        if scored:
            raise UserError(f"the campaign scored weights {scored}, but names no weights file to export")
        return None
    digest = weights_digest(source)
    if scored and digest != scored:
        raise UserError(
            f"{source}: weights hash {digest} is not {scored}, the one the campaign scored this trial with "
            "(replaced since?): the exported weights would not be the weights scored"
        )
    shutil.copyfile(source, out / WEIGHTS)
    return digest


def _recorded_weights(params: dict, tags: dict) -> Path | None:
    frozen = tags.get(FROZEN_TAG)
    if frozen and (Path(frozen) / WEIGHTS).is_file():
        return Path(frozen) / WEIGHTS
    recorded = params.get("weights")
    if recorded and recorded != "None":
        path = Path(recorded)
    else:
        from nas.space import load_space

        path = weights_file(load_space(params["space_file"]))
    if path is not None and not path.is_file():
        raise UserError(f"the campaign's weights file cannot be found: {path} does not exist")
    return path
