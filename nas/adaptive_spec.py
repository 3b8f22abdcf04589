"""The ``--adaptive`` option of ``vitnas finetune``: which AdaViT budgets to train, and how.

Light (no torch at import): the CLI parses it before anything heavy loads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from nas.errors import UserError

KINDS = ("patch", "head", "block")
SPEC_HELP = """\
  SPEC := ITEM ("," ITEM)*            (or --adaptive alone: an adaptive space's own budget ranges)
  patch=B | head=B | block=B          train at budget B in (0, 1]: the mean kept fraction of patches,
                                      heads, sub-layers (MSA/FFN); a kind left out is not decided
  patch=LO..HI (head, block alike)    budgets drawn per step from [LO, HI]: one training for a search
  mode=full|partial                   a dropped head is removed (full, default) or passes its values
  start=INT                           first block with decisions (default 1)
  tau=F  usage_weight=F  distill=F    Gumbel temperature (1), usage-loss weight (4), distillation (1)
  anneal=true|false                   Gumbel noise from 1 down to 0 at the last epoch (default true)
  backbone_lr=F                       with --train-backbone: the backbone's share of the learning
                                      rate (default 0.1; the decision networks train at the full rate)
  example: --adaptive patch=0.5..1,head=0.5..1,block=0.5..1"""


@dataclass(frozen=True)
class AdaptiveSpec:
    """What ``--adaptive`` asks: budget ranges per kind decided, and the training's settings."""

    ranges: dict[str, tuple[float, float]]
    head_mode: str | None = None  # None: the space's (adaptive spaces) or full
    start: int | None = None  # None: the space's or 1
    tau: float = 1.0
    usage_weight: float = 4.0
    distill: float = 1.0
    anneal: bool = True  # Gumbel noise from 1 at the first epoch to 0 at the last
    #: with ``train_backbone``: the trained backbone moves at this share of the decision networks'
    #: rate (at the full rate it forgets: on digits, 95.5 % -> 92.6 % with every decision off)
    backbone_lr: float = 0.1
    from_space: bool = field(default=False, compare=False)

    def low(self) -> dict[str, float]:
        return {k: lo for k, (lo, _) in self.ranges.items()}

    def high(self) -> dict[str, float]:
        return {k: hi for k, (_, hi) in self.ranges.items()}

    def draw(self, generator) -> dict[str, float]:
        """One step's budgets, uniform in each range, from a ``torch.Generator`` (the same on every
        process: same generator)."""
        import torch

        u = torch.rand(len(KINDS), generator=generator, dtype=torch.float64).tolist()
        return {
            k: lo + (hi - lo) * u[j]
            for j, k in enumerate(KINDS)
            if k in self.ranges
            for lo, hi in [self.ranges[k]]
        }

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("from_space")
        data["ranges"] = {k: list(v) for k, v in self.ranges.items()}
        return data


def parse_adaptive(text: str | None) -> AdaptiveSpec:
    """``--adaptive SPEC`` (grammar in ``SPEC_HELP``); ``None`` or ``space``: the space's ranges."""
    if text is None or text.strip() == "space":
        return AdaptiveSpec({}, from_space=True)
    ranges: dict[str, tuple[float, float]] = {}
    options: dict = {}
    for item in text.split(","):
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not value:
            raise _bad(text, f"{item.strip()!r} is not key=value")
        if key in ranges or key in options:
            raise _bad(text, f"{key} given twice")
        if key in KINDS:
            lo, dots, hi = value.partition("..")
            pair = (_number(text, key, lo), _number(text, key, hi if dots else lo))
            if not 0 < pair[0] <= pair[1] <= 1:
                raise _bad(text, f"{key}={value}: budgets must satisfy 0 < LO <= HI <= 1")
            ranges[key] = pair
        elif key == "mode":
            if value not in ("full", "partial"):
                raise _bad(text, f"mode={value!r}: expected full or partial")
            options["head_mode"] = value
        elif key == "start":
            if not value.isdigit():
                raise _bad(text, f"start={value!r}: expected a block index (0, 1, ...)")
            options["start"] = int(value)
        elif key == "anneal":
            if value not in ("true", "false"):
                raise _bad(text, f"anneal={value!r}: expected true or false")
            options["anneal"] = value == "true"
        elif key in ("tau", "usage_weight", "distill", "backbone_lr"):
            number = _number(text, key, value)
            if number < 0 or (key == "tau" and number == 0):
                raise _bad(
                    text, f"{key}={value}: expected a {'positive' if key == 'tau' else 'non-negative'} number"
                )
            options[key] = number
        else:
            raise _bad(
                text,
                f"unknown key {key!r} (allowed: patch, head, block, mode, start, tau, usage_weight, distill, anneal, "
                "backbone_lr)",
            )
    if not ranges or all(lo == 1 for lo, _ in ranges.values()):
        raise _bad(text, "give a budget below 1 for at least one of patch, head, block")
    return AdaptiveSpec({k: v for k, v in ranges.items() if v[0] < 1}, **options)


def _number(text: str, key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise _bad(text, f"{key}: {value!r} is not a number") from None


def _bad(text: str, why: str) -> UserError:
    return UserError(f"--adaptive {text!r}: {why}")


def resolve_spec(spec: AdaptiveSpec, space) -> AdaptiveSpec:
    """Fill what the spec leaves to the space: an adaptive space's budget ranges (min..max of its
    choices), start and head mode (a different one is an error); a timm space's defaults."""
    if space.family == "adaptive":
        a = space.spec.adavit
        for key in ("start", "head_mode"):
            given = getattr(spec, key)
            if given is not None and given != getattr(a, key):
                raise UserError(
                    f"--adaptive {key} {given!r}: space {space.name} fixes {key} {getattr(a, key)!r}"
                )
        ranges = spec.ranges
        if spec.from_space:
            ranges = {k: (min(getattr(a, k)), max(getattr(a, k))) for k in KINDS if min(getattr(a, k)) < 1}
            if not ranges:
                raise UserError(
                    f"space {space.name}: every budget is 1 (nothing to decide); give --adaptive budgets"
                )
        return replace(spec, ranges=ranges, start=a.start, head_mode=a.head_mode)
    if spec.from_space:
        raise UserError(
            f"space {space.name} is a {space.family} space: give the budgets, e.g. --adaptive patch=0.5..1,head=0.5..1,block=0.5..1"
        )
    return replace(spec, start=1 if spec.start is None else spec.start, head_mode=spec.head_mode or "full")
