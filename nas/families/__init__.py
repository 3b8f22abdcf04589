"""Model families: what differs between a space of weight-sharing PSViT subnets and a space of
token-reduction schedules for a timm ViT lives in one module per family, behind ``Family``.

- ``nas.families.psvit``: architectures drawn from a ``family: psvit`` space, scored with weights
  inherited from the space's supernet.
- ``nas.families.timm``: a timm ViT patched with a ToMe/EViT schedule, scored with the space's
  model weights.
- ``nas.families.adaptive``: a timm ViT with AdaViT decision networks at searched budgets, scored
  with the weights of one budget-conditioned ``vitnas finetune --adaptive``.

The rest of vitnas asks ``family_of(space or arch)`` and never branches on the family itself. A
family module imports only light modules at the top (``vitnas space show`` builds no model);
torch, timm and the supernet are imported where a model is built.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from nas.errors import UserError

NAMES = ("psvit", "timm", "adaptive")


@dataclass
class Candidates:
    """What scoring a campaign's candidates needs: how to build the network of one, the data to
    score it on, and the weights it inherits. ``frozen`` is the folder holding the frozen copy of
    those weights under the workspace (what export reads), None when the model has no weights file."""

    build: Callable[[Any], Any]  # arch -> nn.Module, on the eval device, in eval mode
    val_data: Any
    data_spec: str | None
    weights_hash: str | None
    weights_tag: str  # the tag ``weights_hash`` is recorded under
    frozen: Path | None = None


@dataclass
class ExportedWeights:
    """What a family wrote into an export folder besides ``arch.yaml``."""

    files: list[str]
    note: str  # where the weights came from, for the README
    weights_hash: str | None  # file hash of ``weights.safetensors``, for ``train.yaml``
    usage: str  # Python that builds the exported model (README)


class Family(Protocol):
    """What a family module provides (the module itself is the ``Family``). ``spec`` is a validated
    space file (``space.spec``), ``arch`` one of its architectures."""

    NAME: str
    WEIGHTS_TAG: str  # the tag a campaign records its weights' hash under

    # -- the space: drawing, membership, size, description ------------------------------------------
    def draw(self, spec, chooser) -> Any: ...

    def contains(self, spec, arch) -> bool: ...

    def count(self, spec) -> int: ...

    def describe_choices(self, choices: dict) -> list[str]: ...

    def describe_arch(self, arch) -> str: ...

    def drawing(self, arch) -> dict: ...

    # -- models: building, scoring, training ----------------------------------------------------------
    def input_chw(self, arch) -> tuple[int, int, int]: ...

    def build(self, arch, reduce: dict | None = None) -> Any: ...

    def candidates(
        self, space, *, workspace: str, device, supernet: str | None, weights: str | None, data: str | None,
        val_subset: int | None,
    ) -> Candidates: ...  # fmt: skip

    def worker_inputs(self, folder: str) -> dict[str, str]: ...

    def training_step(self, arch, config, device) -> Any: ...  # the loss of ``vitnas train``; None: plain

    # -- export ----------------------------------------------------------------------------------------
    def export_weights(self, arch, record: dict, out: Path) -> ExportedWeights: ...


def family_named(name: str) -> Family:
    if name not in NAMES:
        raise UserError(f"unknown family {name!r} (known: {', '.join(NAMES)})")
    return importlib.import_module(f"nas.families.{name}")


def family_of(thing) -> Family:
    """The family of a ``SearchSpace``, a space file's spec or an architecture (all carry ``family``)."""
    return family_named(thing.family)


def require(thing, family: str, what: str) -> None:
    """``UserError`` unless ``thing`` (a ``SearchSpace`` or an architecture) is of ``family``."""
    if thing.family == family:
        return
    kind = "space" if hasattr(thing, "spec") else "architecture"
    label = getattr(thing, "name", None) or getattr(thing, "model", "")
    raise UserError(f"{kind} {label!r} is a {thing.family} {kind}: {what} needs a {family} {kind}")
