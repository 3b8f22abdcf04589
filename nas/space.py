"""Search spaces: the YAML schema, validation, and drawing architectures from it.

A space lists choices; a *draw* turns a sequence of choices into a legal ``ArchConfig``.
Every way of drawing (an Optuna trial, a seeded random generator, the largest or smallest
member) goes through the same ``Chooser`` protocol and the same derivation, so every drawn
architecture obeys the rules of ``nas.arch`` by construction:

- the first cell of a stage is always ``basic``; cells past the drawn depth are ``identity``;
- a stage with linear attention draws its cells and reductions from lists without ``share``
  and ``evit`` (conditional parameters under other names, so Optuna sees consistent choices);
- a reduction is applied only where it is legal: never right before a ``share`` cell, never
  below the tokens the next stage takes, never more merges than bipartite matching allows.
"""

from __future__ import annotations

import functools
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
    Reduction,
    ReductionKind,
    StageConfig,
    TimmArch,
    format_validation_error,
    is_square,
    tome_max_r,
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


# ---------------------------------------------------------------------------------------
class SearchSpace:
    """A validated space with everything a campaign asks of it."""

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
        if isinstance(self.spec, TimmSpace):
            return _draw_timm(self.spec, chooser)
        return _draw_psvit(self.spec, chooser)

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
        if isinstance(self.spec, TimmSpace):
            return isinstance(arch, TimmArch) and arch.to_json() in _timm_members(self.spec)
        return isinstance(arch, ArchConfig) and _psvit_contains(self.spec, arch)

    def count(self) -> int:
        """Distinct architectures in the space (different draws may give the same one)."""
        if isinstance(self.spec, TimmSpace):
            return len(_timm_members(self.spec))
        return _psvit_count(self.spec)

    def content_hash(self) -> str:
        """16 hex digits over the validated choices: equal for equal spaces, whatever the file
        (name and description left out, so a renamed copy of a space takes the same checkpoints)."""
        content = self.spec.model_dump(mode="json", exclude={"name", "description"})
        text = json.dumps(content, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """The choices as plain data, for ``vitnas space show``."""
        return self.spec.model_dump(mode="json", exclude_none=True)


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
    model = TimmSpace if data.get("family") == "timm" else PsvitSpace
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


# -- PSViT drawing ----------------------------------------------------------------------------
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


def _draw_psvit(spec: PsvitSpace, chooser: Chooser) -> ArchConfig:
    tokens = [chooser.choose(f"s{i}.tokens", st.tokens) for i, st in enumerate(spec.stages)]
    stages = []
    for i, st in enumerate(spec.stages):
        p = f"s{i}"
        floor = tokens[i + 1] if i + 1 < len(tokens) else 2
        attention = chooser.choose(f"{p}.attention", st.attention)
        stage = dict(
            tokens=tokens[i],
            dim=chooser.choose(f"{p}.dim", st.dim),
            heads=chooser.choose(f"{p}.heads", st.heads),
            mlp_ratio=chooser.choose(f"{p}.mlp_ratio", st.mlp_ratio),
            attention=attention,
            pool=chooser.choose(f"{p}.pool", st.pool) if i else None,
        )
        cells, reduction = _draw_structure(st, attention, tokens[i], floor, chooser, p)
        stages.append(StageConfig(**stage, cells=cells, reduction=reduction))
    return ArchConfig(
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        in_chans=spec.in_chans,
        num_classes=spec.num_classes,
        stages=tuple(stages),
    )


def _draw_structure(st: StageChoices, attention: str, tokens: int, floor: int, chooser: Chooser, p: str):
    """Cells and reduction of one stage; linear attention uses its own parameter names."""
    linear = attention == "linear"
    tag = "_linear" if linear else ""
    depth = chooser.choose(f"{p}.depth", st.depth)
    cell_options = [c for c in st.cells if not (linear and c == "share")] or ["basic"]
    cells = ["basic"] + [
        chooser.choose(f"{p}.cell{j}{tag}", cell_options) if len(cell_options) > 1 else cell_options[0]
        for j in range(1, depth)
    ]
    cells += ["identity"] * (st.max_depth - depth)
    red = st.reduction
    kinds = _kind_options(red, linear)
    kind = chooser.choose(f"{p}.reduction{tag}", kinds) if len(kinds) > 1 else kinds[0]
    if kind == "tome":
        r = chooser.choose(f"{p}.r", red.r)
        return tuple(cells), _place_tome(cells, r, tokens, floor)
    if kind in ("evit", "cluster"):
        keep = chooser.choose(f"{p}.keep_rate", red.keep_rate)
        method = chooser.choose(f"{p}.method", red.method) if kind == "cluster" else "kmedoids"
        return tuple(cells), _place_keep(cells, kind, keep, method, red.at, tokens, floor)
    return tuple(cells), Reduction()


def _kind_options(red: ReductionChoices, linear: bool) -> list[str]:
    """Reduction kinds a stage may draw; linear attention has no class attention to rank by (no evit)."""
    return [k for k in red.kind if not (linear and k == "evit")] or ["none"]


def _reducible(cells: Sequence[str], j: int, kind: str) -> bool:
    """Cell j may reduce: it computes its own attention (any non-identity cell for cluster), and
    the next computing cell does not reuse its map."""
    ok_cell = cells[j] != "identity" if kind == "cluster" else cells[j] == "basic"
    following = next((c for c in cells[j + 1 :] if c != "identity"), None)
    return ok_cell and following != "share"


def _place_tome(cells, r: int, tokens: int, floor: int) -> Reduction:
    n, rs = tokens, []
    for j in range(len(cells)):
        rj = min(r, tome_max_r(n - 1), n - floor) if _reducible(cells, j, "tome") else 0
        rs.append(max(rj, 0))
        n -= rs[-1]
    return Reduction(kind="tome", r=tuple(rs)) if any(rs) else Reduction()


def _place_keep(cells, kind, keep, method, at, tokens, floor) -> Reduction:
    n, placed = tokens, []
    for j in at:
        if j >= len(cells) or not _reducible(cells, j, kind):
            continue
        trial = Reduction(kind=kind, keep_rate=keep, at=(j,), method=method)
        n_after = trial.tokens_after(j, n)
        if n_after >= floor and n_after < n:
            placed.append(j)
            n = n_after
    if not placed:
        return Reduction()
    return Reduction(kind=kind, keep_rate=keep, at=tuple(placed), method=method)


# -- PSViT membership and counting -----------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _structures(st: StageChoices, tokens: int, floor: int) -> frozenset:
    """Every distinct (attention, cells, reduction) one stage can take."""
    found = set()
    for attention in st.attention:
        for params in _enumerate_structure_params(st, attention):
            cells, red = _draw_structure(st, attention, tokens, floor, ReplayChooser(params), "s")
            found.add((attention, cells, red))
    return frozenset(found)


def _enumerate_structure_params(st: StageChoices, attention: str):
    """All decision sets ``_draw_structure`` can ask for, as ReplayChooser params."""
    linear = attention == "linear"
    tag = "_linear" if linear else ""
    cell_options = [c for c in st.cells if not (linear and c == "share")] or ["basic"]
    kinds = _kind_options(st.reduction, linear)
    red = st.reduction
    for depth in st.depth:
        for cells in itertools.product(cell_options, repeat=depth - 1):
            base = {"s.depth": depth, **{f"s.cell{j}{tag}": c for j, c in enumerate(cells, start=1)}}
            for kind in kinds:
                base_k = {**base, f"s.reduction{tag}": kind}
                if kind == "tome":
                    yield from ({**base_k, "s.r": r} for r in red.r)
                elif kind in ("evit", "cluster"):
                    methods = red.method if kind == "cluster" else ("kmedoids",)
                    for keep, method in itertools.product(red.keep_rate, methods):
                        yield {**base_k, "s.keep_rate": keep, "s.method": method}
                else:
                    yield base_k


def _token_paths(spec: PsvitSpace):
    return itertools.product(*(st.tokens for st in spec.stages))


def _psvit_count(spec: PsvitSpace) -> int:
    total = 0
    for path in _token_paths(spec):
        n = 1
        for i, st in enumerate(spec.stages):
            floor = path[i + 1] if i + 1 < len(path) else 2
            plain = len(st.dim) * len(st.heads) * len(st.mlp_ratio) * (len(st.pool) if i else 1)
            n *= plain * len(_structures(st, path[i], floor))
        total += n
    return total


def _psvit_contains(spec: PsvitSpace, arch: ArchConfig) -> bool:
    head = (arch.image_size, arch.patch_size, arch.in_chans, arch.num_classes)
    if head != (spec.image_size, spec.patch_size, spec.in_chans, spec.num_classes):
        return False
    if len(arch.stages) != len(spec.stages):
        return False
    for i, (st, a) in enumerate(zip(spec.stages, arch.stages)):
        floor = arch.stages[i + 1].tokens if i + 1 < len(arch.stages) else 2
        plain_ok = (
            a.tokens in st.tokens
            and a.dim in st.dim
            and a.heads in st.heads
            and a.mlp_ratio in st.mlp_ratio
            and (a.pool in st.pool if i else a.pool is None)
        )
        if not plain_ok or (a.attention, a.cells, a.reduction) not in _structures(st, a.tokens, floor):
            return False
    return True


# -- timm reduction spaces ---------------------------------------------------------------------
def _draw_timm(spec: TimmSpace, chooser: Chooser) -> TimmArch:
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
        model=spec.model, image_size=spec.image_size, num_classes=spec.num_classes, schedule=schedule
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
    return {_draw_timm(spec, ReplayChooser(p)).to_json() for p in params}
