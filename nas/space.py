"""Search spaces: the YAML schema, validation, loading, and the ``Chooser`` protocol of drawing.

A space lists choices; a *draw* turns a sequence of choices into a legal architecture. Every way
of drawing (an Optuna trial, a seeded random generator, the largest or smallest member) goes
through the same ``Chooser`` protocol and the same derivation, which each family defines
(``nas.families.psvit``, ``nas.families.timm``), so every drawn architecture obeys the rules of
``nas.arch`` by construction.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from nas.arch import (
    ArchConfig,
    AttentionKind,
    ClusterMethod,
    PoolKind,
    ReductionKind,
    TimmArch,
    format_validation_error,
    is_square,
    yaml_error,
)
from nas.errors import UserError

CellChoice = Literal["basic", "share", "identity"]
TomeRule = Literal["constant", "decreasing"]


class Chooser(Protocol):
    """Picks one option for a named decision (an Optuna trial, a seeded RNG, an extreme)."""

    def choose(self, name: str, options: Sequence[Any]) -> Any: ...


class OptunaChooser:
    """Define-by-run: each decision becomes ``trial.suggest_categorical(name, options)``."""

    def __init__(self, trial):
        self.trial = trial

    def choose(self, name, options):
        return self.trial.suggest_categorical(name, list(options))


class RandomChooser:
    def __init__(self, seed: int | random.Random):
        self.rng = seed if isinstance(seed, random.Random) else random.Random(seed)

    def choose(self, name, options):
        return self.rng.choice(list(options))


class ReplayChooser:
    """Replays recorded decisions (e.g. an Optuna trial's params); unknown names fall back."""

    def __init__(self, params: dict[str, Any], fallback: Chooser | None = None):
        self.params, self.fallback = params, fallback

    def choose(self, name, options):
        if name in self.params:
            return self.params[name]
        if self.fallback is None:
            raise KeyError(f"no recorded choice for {name!r}")
        return self.fallback.choose(name, options)


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _unique_nonempty(values: tuple) -> tuple:
    if not values:
        raise ValueError("needs at least one choice")
    if len(set(values)) != len(values):
        raise ValueError(f"choices repeat: {list(values)}")
    return values


class ReductionChoices(_Strict):
    """Reductions a stage may use; ``at`` lists cells where evit/cluster may act."""

    kind: tuple[ReductionKind, ...] = ("none",)
    r: tuple[int, ...] = ()
    keep_rate: tuple[float, ...] = ()
    at: tuple[int, ...] = ()
    method: tuple[ClusterMethod, ...] = ("kmedoids",)

    _unique = field_validator("kind", "method")(_unique_nonempty)

    @field_validator("r", "keep_rate", "at")
    @classmethod
    def _no_repeats(cls, values: tuple) -> tuple:
        if len(set(values)) != len(values):
            raise ValueError(f"choices repeat: {list(values)}")
        return values

    @field_validator("at")
    @classmethod
    def _cell_indices(cls, at: tuple[int, ...]) -> tuple[int, ...]:
        if any(j < 0 for j in at):
            raise ValueError(f"cell indices must be >= 0, got {list(at)}")
        return tuple(sorted(at))

    @model_validator(mode="after")
    def _params_present(self) -> ReductionChoices:
        if "tome" in self.kind and not self.r:
            raise ValueError("kind tome needs r choices (merges per cell)")
        if any(v < 1 for v in self.r):
            raise ValueError(f"r choices must be >= 1, got {list(self.r)}")
        if {"evit", "cluster"} & set(self.kind):
            if not self.keep_rate or not self.at:
                raise ValueError("kinds evit/cluster need keep_rate choices and at (cell indices)")
        if any(not 0 < k < 1 for k in self.keep_rate):
            raise ValueError(f"keep_rate choices must be in (0, 1), got {list(self.keep_rate)}")
        return self


class StageChoices(_Strict):
    tokens: tuple[PositiveInt, ...] | None = None
    dim: tuple[PositiveInt, ...]
    heads: tuple[PositiveInt, ...]
    mlp_ratio: tuple[PositiveFloat, ...] = (4.0,)
    attention: tuple[AttentionKind, ...] = ("softmax",)
    depth: tuple[PositiveInt, ...]
    cells: tuple[CellChoice, ...] = ("basic",)
    pool: tuple[PoolKind, ...] | None = None
    reduction: ReductionChoices = ReductionChoices()

    _unique = field_validator("tokens", "dim", "heads", "mlp_ratio", "attention", "depth", "cells", "pool")(
        lambda v: v if v is None else _unique_nonempty(v)
    )

    @model_validator(mode="after")
    def _consistent(self) -> StageChoices:
        for d, h in itertools.product(self.dim, self.heads):
            if d % h:
                raise ValueError(
                    f"heads {h} does not divide dim {d} (every heads choice must divide every dim choice)"
                )
        if min(self.depth) < 1:
            raise ValueError(f"depth choices must be >= 1, got {list(self.depth)}")
        if any(j >= max(self.depth) for j in self.reduction.at):
            raise ValueError(
                f"reduction.at {list(self.reduction.at)} names cells beyond max depth {max(self.depth)}"
            )
        softmax = "softmax" in self.attention
        if "share" in self.cells and not softmax:
            raise ValueError("cells choice share needs softmax attention among the attention choices")
        if "evit" in self.reduction.kind and not softmax:
            raise ValueError("reduction kind evit needs softmax attention among the attention choices")
        return self

    @property
    def max_depth(self) -> int:
        return max(self.depth)


class PsvitSpace(_Strict):
    """A PSViT-style space (``family: psvit``)."""

    name: str
    family: Literal["psvit"] = "psvit"
    description: str = ""
    image_size: int = Field(gt=0)
    patch_size: int = Field(gt=0)
    in_chans: int = Field(default=3, gt=0)
    num_classes: int = Field(gt=1)
    stages: tuple[StageChoices, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _stages_fit(self) -> PsvitSpace:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        first = (self.image_size // self.patch_size) ** 2 + 1
        stages = list(self.stages)
        if stages[0].tokens not in (None, (first,)):
            raise ValueError(f"stages[0].tokens must be [{first}] (patches + class token) or left out")
        if stages[0].pool is not None:
            raise ValueError("stages[0].pool: the first stage takes the patch embedding; leave pool out")
        stages[0] = stages[0].model_copy(update={"tokens": (first,)})
        for i, st in enumerate(stages[1:], start=1):
            prev = stages[i - 1]
            if st.tokens is None or st.pool is None:
                raise ValueError(f"stages[{i}] needs tokens and pool choices")
            if min(prev.tokens) < max(st.tokens):
                raise ValueError(
                    f"stages[{i}].tokens {list(st.tokens)} may exceed stages[{i - 1}].tokens {list(prev.tokens)} (tokens never grow)"
                )
            if min(st.tokens) < 2:
                raise ValueError(f"stages[{i}].tokens must be >= 2 (class token and one more)")
            if "conv2d" in st.pool:
                _check_conv2d(i, prev, st)
        object.__setattr__(self, "stages", tuple(stages))
        return self


def _check_conv2d(i: int, prev: StageChoices, st: StageChoices) -> None:
    if i > 1 and prev.pool != ("conv2d",):
        raise ValueError(
            f"stages[{i}].pool conv2d needs a token grid: stages[{i - 1}].pool must be [conv2d] only"
        )
    if prev.reduction.kind != ("none",):
        raise ValueError(
            f"stages[{i}].pool conv2d needs a token grid: stages[{i - 1}].reduction.kind must be [none]"
        )
    bad = [t for t in (*prev.tokens, *st.tokens) if not is_square(t - 1)]
    if bad:
        raise ValueError(f"stages[{i}].pool conv2d needs square grids: tokens {bad} are not a square + 1")


class TomeChoices(_Strict):
    r: tuple[int, ...]
    rule: tuple[TomeRule, ...] = ("constant",)

    _unique = field_validator("r", "rule")(_unique_nonempty)

    @field_validator("r")
    @classmethod
    def _positive(cls, r: tuple[int, ...]) -> tuple[int, ...]:
        if any(v < 1 for v in r):
            raise ValueError(f"r choices must be >= 1, got {list(r)}")
        return r


class EvitChoices(_Strict):
    keep_rate: tuple[float, ...]
    layers: tuple[tuple[int, ...], ...]

    _unique = field_validator("keep_rate", "layers")(_unique_nonempty)

    @field_validator("keep_rate")
    @classmethod
    def _rates(cls, keep_rate: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < k < 1 for k in keep_rate):
            raise ValueError(f"keep_rate choices must be in (0, 1), got {list(keep_rate)}")
        return keep_rate

    @field_validator("layers")
    @classmethod
    def _increasing(cls, layers: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
        for ls in layers:
            if not ls or list(ls) != sorted(set(ls)):
                raise ValueError(
                    f"each layers choice must be a non-empty increasing list of blocks, got {list(ls)}"
                )
        return layers


class TimmReductionChoices(_Strict):
    kind: tuple[Literal["none", "tome", "evit"], ...]
    tome: TomeChoices | None = None
    evit: EvitChoices | None = None

    _unique = field_validator("kind")(_unique_nonempty)

    @model_validator(mode="after")
    def _params_present(self) -> TimmReductionChoices:
        for kind in ("tome", "evit"):
            if kind in self.kind and getattr(self, kind) is None:
                raise ValueError(f"kind {kind} is listed but its {kind}: section is missing")
        return self


class TimmSpace(_Strict):
    """A reduction-schedule space over an existing timm ViT (``family: timm``)."""

    name: str
    family: Literal["timm"]
    description: str = ""
    model: str
    depth: int = Field(gt=0, description="blocks in the model, for per-layer schedules")
    image_size: int = Field(default=224, gt=0)
    num_classes: int = Field(default=1000, gt=1)
    weights: str | None = None
    # keyword arguments for timm.create_model besides classes and image size (e.g. patch_size, depth)
    model_args: dict[str, int | float | bool | str] = Field(default_factory=dict)
    reduction: TimmReductionChoices

    @model_validator(mode="after")
    def _layers_exist(self) -> TimmSpace:
        if self.reduction.evit:
            for layers in self.reduction.evit.layers:
                if any(not 0 <= b < self.depth for b in layers):
                    raise ValueError(
                        f"reduction.evit.layers {list(layers)} outside blocks 0..{self.depth - 1}"
                    )
        return self


class AdaptiveChoices(_Strict):
    """AdaViT budgets to search, per kind (1.0: that kind is not decided), and the fixed settings
    the decision networks were trained with."""

    patch: tuple[float, ...] = (1.0,)
    head: tuple[float, ...] = (1.0,)
    block: tuple[float, ...] = (1.0,)
    head_mode: Literal["full", "partial"] = "full"
    start: int = Field(default=1, ge=0)

    _unique = field_validator("patch", "head", "block")(_unique_nonempty)

    @field_validator("patch", "head", "block")
    @classmethod
    def _budgets(cls, values: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < v <= 1 for v in values):
            raise ValueError(f"budgets must be in (0, 1] (1: not decided), got {list(values)}")
        return values


class AdaptiveSpace(_Strict):
    """AdaViT budgets over an existing timm ViT (``family: adaptive``, ``nas.families.adaptive``)."""

    name: str
    family: Literal["adaptive"]
    description: str = ""
    model: str
    depth: int = Field(gt=0, description="blocks in the model")
    image_size: int = Field(default=224, gt=0)
    num_classes: int = Field(default=1000, gt=1)
    weights: str | None = None  # backbone + decision networks, from vitnas finetune --adaptive
    model_args: dict[str, int | float | bool | str] = Field(default_factory=dict)
    adavit: AdaptiveChoices = AdaptiveChoices()

    @model_validator(mode="after")
    def _start_inside(self) -> AdaptiveSpace:
        if self.adavit.start >= self.depth:
            raise ValueError(f"adavit.start {self.adavit.start} is not a block of 0..{self.depth - 1}")
        return self


# ---------------------------------------------------------------------------------------
_SCHEMAS = {"psvit": PsvitSpace, "timm": TimmSpace, "adaptive": AdaptiveSpace}


class SearchSpace:
    """A validated space with everything a campaign asks of it (the family-specific parts through
    ``nas.families``)."""

    def __init__(self, spec: PsvitSpace | TimmSpace, source: str = "<memory>"):
        self.spec, self.source = spec, source

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def family(self) -> str:
        return self.spec.family

    # -- drawing -------------------------------------------------------------------------
    def draw(self, chooser: Chooser) -> ArchConfig | TimmArch:
        return _family(self).draw(self.spec, chooser)

    def from_trial(self, trial) -> ArchConfig | TimmArch:
        return self.draw(OptunaChooser(trial))

    def from_params(self, params: dict[str, Any]) -> ArchConfig | TimmArch:
        return self.draw(ReplayChooser(params))

    def sample(self, seed: int | random.Random) -> ArchConfig | TimmArch:
        return self.draw(RandomChooser(seed))

    def largest(self) -> ArchConfig | TimmArch:
        return self.draw(_ExtremeChooser(largest=True))

    def smallest(self) -> ArchConfig | TimmArch:
        return self.draw(_ExtremeChooser(largest=False))

    # -- membership and size ---------------------------------------------------------------
    def contains(self, arch: ArchConfig | TimmArch) -> bool:
        return arch.family == self.family and _family(self).contains(self.spec, arch)

    def count(self) -> int:
        """Distinct architectures in the space (different draws may give the same one)."""
        return _family(self).count(self.spec)

    def content_hash(self) -> str:
        """16 hex digits over the validated choices: equal for equal spaces, whatever the file
        (name and description left out, so a renamed copy of a space takes the same checkpoints)."""
        content = self.spec.model_dump(mode="json", exclude={"name", "description"})
        text = json.dumps(content, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """The choices as plain data, for ``vitnas space show``."""
        return self.spec.model_dump(mode="json", exclude_none=True)


def _family(space: SearchSpace):
    """The ``nas.families`` member that draws, counts, builds and exports the space's architectures."""
    from nas.families import family_of

    return family_of(space)


# -- loading ---------------------------------------------------------------------------------
def load_space(path: str | Path) -> SearchSpace:
    """Load and validate a space file; any problem is one ``UserError`` line naming file and field."""
    path = Path(path)
    if not path.is_file():
        shipped = shipped_space_path(str(path))
        if shipped is None:
            raise UserError(
                f"{path}: no such search-space file (shipped spaces: {', '.join(shipped_spaces())})"
            )
        path = shipped
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(yaml_error(err, str(path))) from None
    return space_from_dict(data, str(path))


def space_from_dict(data: Any, source: str = "<memory>") -> SearchSpace:
    if not isinstance(data, dict):
        raise UserError(f"{source}: a search space is a mapping of fields, got {type(data).__name__}")
    model = _SCHEMAS.get(
        data.get("family", "psvit"), PsvitSpace
    )  # an unknown family fails PsvitSpace's check
    try:
        return SearchSpace(model.model_validate(data), source)
    except ValidationError as err:
        raise UserError(f"{source}: {format_validation_error(err)}") from None


def shipped_spaces() -> list[str]:
    """Names of the spaces that come with vitnas (``searchspaces/*.yaml``)."""
    return sorted(p.stem for p in _searchspaces_dir().glob("*.yaml"))


def shipped_space_path(name: str) -> Path | None:
    path = _searchspaces_dir() / (Path(name).stem + ".yaml")
    # only a bare name (``psvit-digits`` or ``psvit-digits.yaml``): a path that does not exist is an error
    return path if path.is_file() and name in (path.stem, path.name) else None


def _searchspaces_dir() -> Path:
    from importlib import resources

    return Path(str(resources.files("nas.searchspaces")))


# -- extremes ---------------------------------------------------------------------------------
class _ExtremeChooser:
    """Largest: most tokens/dims/depth, basic cells, no reduction. Smallest: the opposite."""

    _ORDER = {"basic": 2, "share": 1, "identity": 0, "none": 9, "tome": 3, "evit": 2, "cluster": 1}

    def __init__(self, largest: bool):
        self.largest = largest

    def choose(self, name, options):
        options = list(options)
        if name.endswith((".attention", ".pool", ".method")):
            return options[0] if self.largest else options[-1]
        if name.endswith(".keep_rate"):
            return max(options) if self.largest else min(options)
        key = (lambda o: self._ORDER.get(o, 0)) if isinstance(options[0], str) else (lambda o: o)
        if name.endswith(".r"):
            key = lambda o: -o  # noqa: E731 - largest network merges least
        return max(options, key=key) if self.largest else min(options, key=key)
