"""One concrete architecture: what a search trial proposes, what gets measured and exported.

Two families share this module:

- ``ArchConfig`` (``family: psvit``): a PSViT-style network built from a patch embedding and
  stages of cells; the supernet, the latency predictor and ``timm.create_model("vitnas_subnet")``
  all build from it.
- ``TimmArch`` (``family: timm``): an existing timm ViT plus a token-reduction schedule
  (the reduction-schedule search of ``searchspaces/deit-reduction.yaml``).

Both are immutable pydantic models with a YAML/JSON round trip and a stable ``arch_hash``.
Token counts always include the class token.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from nas.errors import UserError

CellKind = Literal["basic", "share", "identity"]
AttentionKind = Literal["softmax", "linear"]
PoolKind = Literal["conv1d", "conv2d", "avg", "tome", "cluster"]
ReductionKind = Literal["none", "tome", "evit", "cluster"]
ClusterMethod = Literal["kmeans", "kmedoids", "weighted_kmedoids"]

#: Pooling kinds that read the tokens as a sequence or grid in patch order.
ORDERED_POOLS = ("conv1d", "conv2d", "avg")


def kept_tokens(keep_rate: float, m: int) -> int:
    """Non-class tokens kept out of ``m`` at ``keep_rate``: ceil(keep_rate * m), robust to float noise."""
    return max(1, math.ceil(round(keep_rate * m, 9)))


def tome_max_r(m: int) -> int:
    """The most merges bipartite matching can make over ``m`` non-class tokens (one per A token)."""
    return m // 2


def is_square(m: int) -> bool:
    return m > 0 and math.isqrt(m) ** 2 == m


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Reduction(_Frozen):
    """Token reduction inside a stage.

    ``tome``: ``r[j]`` tokens merged after the attention of cell ``j`` (one entry per cell).
    ``evit``/``cluster``: after the attention of each cell in ``at``, keep ceil(keep_rate * M)
    of the M non-class tokens (EViT adds one fused token).
    """

    kind: ReductionKind = "none"
    r: tuple[int, ...] = ()
    keep_rate: float | None = None
    at: tuple[int, ...] = ()
    method: ClusterMethod = "kmedoids"

    @model_validator(mode="after")
    def _fields_match_kind(self) -> Reduction:
        if self.kind == "tome":
            if self.keep_rate is not None or self.at:
                raise ValueError("tome takes r (one per cell), not keep_rate/at")
            if any(v < 0 for v in self.r):
                raise ValueError(f"tome r must be >= 0, got {list(self.r)}")
        elif self.kind in ("evit", "cluster"):
            if self.r:
                raise ValueError(f"{self.kind} takes keep_rate and at, not r")
            if self.keep_rate is None or not 0 < self.keep_rate <= 1:
                raise ValueError(f"{self.kind} keep_rate must be in (0, 1], got {self.keep_rate}")
            if list(self.at) != sorted(set(self.at)) or any(j < 0 for j in self.at):
                raise ValueError(
                    f"{self.kind} at must be increasing cell indices (>= 0), got {list(self.at)}"
                )
        elif self.r or self.at or self.keep_rate is not None:
            raise ValueError("reduction kind none takes no r, keep_rate or at")
        return self

    def tokens_after(self, j: int, n: int) -> int:
        """Token count (class token included) after cell ``j`` given ``n`` before it."""
        m = n - 1
        if self.kind == "tome" and j < len(self.r):
            return n - min(self.r[j], tome_max_r(m))
        if self.kind in ("evit", "cluster") and j in self.at and self.keep_rate < 1:
            kept = kept_tokens(self.keep_rate, m)
            fused = 1 if self.kind == "evit" and kept < m else 0
            return 1 + min(m, kept + fused)
        return n

    def reduces_at(self, j: int) -> bool:
        if self.kind == "tome":
            return j < len(self.r) and self.r[j] > 0
        return self.kind in ("evit", "cluster") and j in self.at and self.keep_rate < 1


class StageConfig(_Frozen):
    """One stage: ``tokens`` enter it (after ``pool`` from the previous stage), ``cells`` run at ``dim``."""

    tokens: int = Field(gt=1)
    dim: int = Field(gt=0)
    heads: int = Field(gt=0)
    mlp_ratio: float = Field(gt=0)
    attention: AttentionKind = "softmax"
    cells: tuple[CellKind, ...]
    pool: PoolKind | None = None
    reduction: Reduction = Reduction()

    def token_trace(self) -> list[int]:
        """Token counts after each cell (class token included)."""
        n, trace = self.tokens, []
        for j, cell in enumerate(self.cells):
            if cell != "identity":
                n = self.reduction.tokens_after(j, n)
            trace.append(n)
        return trace

    @property
    def exit_tokens(self) -> int:
        trace = self.token_trace()
        return trace[-1] if trace else self.tokens

    @property
    def depth(self) -> int:
        """Cells that compute something."""
        return sum(c != "identity" for c in self.cells)


class _Serialisable(_Frozen):
    """YAML/JSON/flat forms and the stable hash, shared by both architecture families."""

    def to_dict(self) -> dict:
        return _plain(self.model_dump(mode="json"))

    def flatten(self) -> dict[str, str | int | float]:
        """Flat ``stages.0.dim``-style keys (lists joined by commas, None as "null"), for MLflow params and tables."""
        return _flatten(self.to_dict())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def arch_hash(self) -> str:
        """16 hex digits of SHA-256 over canonical JSON: equal across processes and key orders."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


class ArchConfig(_Serialisable):
    """A PSViT-style architecture: patch embedding, stages of cells, class-token head."""

    family: Literal["psvit"] = "psvit"
    image_size: int = Field(gt=0)
    patch_size: int = Field(gt=0)
    in_chans: int = Field(default=3, gt=0)
    num_classes: int = Field(gt=1)
    stages: tuple[StageConfig, ...] = Field(min_length=1)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @model_validator(mode="after")
    def _legal(self) -> ArchConfig:
        problems = arch_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def token_trace(self) -> list[list[int]]:
        return [s.token_trace() for s in self.stages]


def arch_problems(arch: ArchConfig) -> list[str]:
    """Every legality rule an architecture breaks, as messages naming the stage/cell."""
    problems: list[str] = []
    if arch.image_size % arch.patch_size:
        problems.append(f"image_size {arch.image_size} is not divisible by patch_size {arch.patch_size}")
    if all(c == "identity" for s in arch.stages for c in s.cells):
        problems.append("every cell is identity: at least one cell must compute")
    prev_exit, grid = arch.grid**2 + 1, True
    for i, st in enumerate(arch.stages):
        where = f"stages[{i}]"
        if st.dim % st.heads:
            problems.append(f"{where}: dim {st.dim} is not divisible by heads {st.heads}")
        if i == 0:
            if st.pool is not None:
                problems.append(f"{where}: the first stage takes the patch embedding, pool must be null")
            if st.tokens != prev_exit:
                problems.append(
                    f"{where}: tokens {st.tokens} != patches + class token "
                    f"({arch.grid}x{arch.grid} + 1 = {prev_exit})"
                )
        else:
            if st.pool is None:
                problems.append(f"{where}: pool is required between stages")
            if st.tokens > prev_exit:
                problems.append(
                    f"{where}: tokens {st.tokens} > {prev_exit} leaving the stage before (tokens never grow)"
                )
            if st.pool == "conv2d":
                if not grid:
                    problems.append(
                        f"{where}: conv2d pooling needs a token grid, but the stage before reduced or reordered its tokens"
                    )
                elif not (is_square(prev_exit - 1) and is_square(st.tokens - 1)):
                    problems.append(
                        f"{where}: conv2d pooling needs square grids, got {prev_exit - 1} -> {st.tokens - 1} tokens"
                    )
        problems += _cell_problems(where, st)
        grid = (i == 0 or st.pool == "conv2d") and all(
            not st.reduction.reduces_at(j) for j in range(len(st.cells))
        )
        prev_exit = st.exit_tokens
    return problems


def _cell_problems(where: str, st: StageConfig) -> list[str]:
    problems, red = [], st.reduction
    if red.kind == "tome" and len(red.r) != len(st.cells):
        problems.append(f"{where}.reduction.r: {len(red.r)} entries for {len(st.cells)} cells")
    if red.kind == "evit" and st.attention != "softmax":
        problems.append(
            f"{where}.reduction: evit ranks tokens by softmax class attention; attention is {st.attention}"
        )
    if any(j >= len(st.cells) for j in red.at):
        problems.append(
            f"{where}.reduction.at: {list(red.at)} names cells beyond the {len(st.cells)} there are"
        )
    n, source = st.tokens, None  # source: index of the cell whose attention map a share cell would reuse
    changed = None  # why there is none though an earlier cell ran: (cell, tokens before, after)
    for j, cell in enumerate(st.cells):
        if cell == "share":
            if st.attention != "softmax":
                problems.append(
                    f"{where}.cells[{j}]: share reuses an attention map; linear attention has none"
                )
            elif source is None and changed is not None:
                problems.append(f"{where}.cells[{j}]: share {_reduced_map(red, *changed)}")
            elif source is None:
                problems.append(
                    f"{where}.cells[{j}]: share has no earlier cell in the stage whose map it could reuse"
                )
        if red.reduces_at(j) and (cell != "basic" if red.kind != "cluster" else cell == "identity"):
            problems.append(f"{where}.reduction: cell {j} is {cell} and cannot reduce tokens")
        if cell == "identity":
            continue
        if red.kind == "tome" and j < len(red.r) and red.r[j] > tome_max_r(n - 1):
            problems.append(
                f"{where}.reduction.r[{j}]: {red.r[j]} merges > {tome_max_r(n - 1)} possible with {n} tokens"
            )
        n_after = red.tokens_after(j, n)
        # a reducing cell re-ranks, fuses or merges tokens even where the count stays: no map to reuse
        source = None if n_after != n or red.reduces_at(j) else j
        changed = (j, n, n_after) if source is None else None
        n = n_after
    return problems


def _reduced_map(red: Reduction, cell: int, before: int, after: int) -> str:
    """Why a share cell cannot reuse cell ``cell``'s map: the reduction after it changed the tokens
    (saying "no earlier cell" there sent users looking for a missing cell)."""
    if red.kind == "tome":
        what = f"ToMe merges {red.r[cell]} tokens"
    else:
        what = f"{'EViT' if red.kind == 'evit' else 'clustering'} keeps {red.keep_rate:g} of the tokens"
    count = f"{before} -> {after} tokens" if after != before else f"{after} tokens, but not the same ones"
    return (
        f"cannot reuse cell {cell}'s attention map: {what} after cell {cell} ({count}); "
        "a share cell must follow a cell that keeps its tokens"
    )


class TimmArch(_Serialisable):
    """A timm ViT with a token-reduction schedule, as ``nas.ops.timm_patch.apply`` takes it."""

    family: Literal["timm"] = "timm"
    model: str
    image_size: int = Field(default=224, gt=0)
    num_classes: int = Field(default=1000, gt=1)
    schedule: dict = Field(default_factory=lambda: {"kind": "none"})
    # more timm.create_model keywords (the space's model_args, e.g. patch_size for small images)
    model_args: dict[str, int | float | bool | str] = Field(default_factory=dict)

    def to_dict(self) -> dict:
        data = super().to_dict()
        if not data["model_args"]:
            del data["model_args"]  # so architectures without them keep the hashes they always had
        return data


class AdaptiveArch(_Serialisable):
    """A timm ViT with AdaViT decisions at fixed budgets (``nas.families.adaptive``): ``usage``
    holds the budget of each kind decided (patch, head, block); a kind left out is not decided."""

    family: Literal["adaptive"] = "adaptive"
    model: str
    image_size: int = Field(default=224, gt=0)
    num_classes: int = Field(default=1000, gt=1)
    usage: dict[Literal["patch", "head", "block"], float] = Field(default_factory=dict)
    head_mode: Literal["full", "partial"] = "full"
    start: int = Field(default=1, ge=0)
    model_args: dict[str, int | float | bool | str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _budgets(self) -> AdaptiveArch:
        bad = {k: v for k, v in self.usage.items() if not 0 < v <= 1}
        if bad:
            raise ValueError(f"usage budgets must be in (0, 1], got {bad}")
        # a budget of 1 decides nothing: left out, so equal models hash equally
        order = ("patch", "head", "block")
        object.__setattr__(self, "usage", {k: self.usage[k] for k in order if self.usage.get(k, 1) < 1})
        return self

    @property
    def schedule(self) -> dict:
        """What ``nas.ops.adavit_patch.apply`` takes."""
        return {"kind": "adavit", "usage": dict(self.usage), "head_mode": self.head_mode, "start": self.start}


AnyArch = Annotated[ArchConfig | TimmArch | AdaptiveArch, Field(discriminator="family")]
_ANY = TypeAdapter(AnyArch)


def arch_hash(arch: ArchConfig | TimmArch) -> str:
    """The architecture's stable hash (the functional form of ``arch.arch_hash()``)."""
    return arch.arch_hash()


def arch_from_dict(data: dict, source: str = "architecture") -> ArchConfig | TimmArch:
    """Validate a mapping as an architecture; ``UserError`` names the source, field and problem."""
    if isinstance(data, dict) and "family" not in data:
        data = {"family": "psvit", **data}
    try:
        return _ANY.validate_python(data)
    except ValidationError as err:
        raise UserError(f"{source}: {format_validation_error(err)}") from None


def load_arch(path: str | Path) -> ArchConfig | TimmArch:
    """Read ``arch.yaml`` (or ``.json``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such architecture file")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON: {err}".replace("\n", " ")) from None
    except yaml.YAMLError as err:
        raise UserError(yaml_error(err, str(path))) from None
    return arch_from_dict(data, str(path))


def arch_from_text(text: str, source: str = "architecture") -> ArchConfig | TimmArch:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(yaml_error(err, source)) from None
    return arch_from_dict(data, source)


def yaml_error(err: yaml.YAMLError, source: str) -> str:
    """A YAML syntax error as one line naming ``source``, line and column: PyYAML's own text names the
    stream it was handed (``"<unicode string>"`` for text) and draws a caret under a copy of the line."""
    if isinstance(err, yaml.reader.ReaderError):  # a character YAML refuses, before any parsing
        return f"{source}: not valid YAML at character {err.position + 1}: {str(err).splitlines()[0]}"
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if mark is None or problem is None:
        return f"{source}: not valid YAML: {' '.join(str(err).split())}"
    text = f"{source}: not valid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, at = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and at is not None and (at.line, at.column) != (mark.line, mark.column):
        text += f" ({context} at line {at.line + 1}, column {at.column + 1})"
    elif context:
        text += f" ({context})"
    return " ".join(text.split())


def format_validation_error(err: ValidationError) -> str:
    """One line per pydantic error, joined: ``field.path: message (got value)``."""
    parts, errors = [], err.errors(include_url=False)
    for e in errors:
        if e["type"] == "too_short" and any(
            o["loc"][: len(e["loc"])] == e["loc"] and o is not e for o in errors
        ):
            continue  # "at least 1 item after validation, not 0": only because an item below failed
        tagged = e["loc"][1:] if e["loc"] and e["loc"][0] in ("psvit", "timm", "adaptive") else e["loc"]
        loc = ".".join(_loc(p) for p in tagged).replace(".[", "[")  # without the union's family tag
        msg = e["msg"].removeprefix("Value error, ")
        got = "" if e["type"] in ("value_error", "missing") else f" (got {e.get('input')!r})"
        parts.append(f"{loc}: {msg}{got}" if loc else f"{msg}{got}")
    return "; ".join(parts)


def _loc(part) -> str:
    return f"[{part}]" if isinstance(part, int) else str(part)


def _plain(value):
    """Tuples to lists, recursively, so YAML/JSON output is plain."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _flatten(data: dict, prefix: str = "") -> dict[str, str | int | float]:
    flat: dict[str, str | int | float] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for i, item in enumerate(value):
                flat.update(_flatten(item, f"{name}.{i}."))
        elif isinstance(value, list):
            flat[name] = ",".join(str(v) for v in value)
        else:
            flat[name] = "null" if value is None else value
    return flat
