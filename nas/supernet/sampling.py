"""Which subnets a sandwich step trains: the supernet levers that decide how often each part of the
space is trained (``TrainConfig.sampling``, ``progressive_epochs``, ``pin``, ``smallest_kinds``).

Each is a ``Chooser`` wrapper around the space's own drawing (``SearchSpace.draw``), so every subnet
drawn is a legal member of the space, and all randomness comes from the epoch's seeded stream.
"""

from __future__ import annotations

import math
import random
import re

from nas.arch import ArchConfig
from nas.errors import UserError
from nas.space import Chooser, RandomChooser, SearchSpace, _ExtremeChooser
from nas.training.config import TrainConfig

KIND_CHOICES = (".attention", ".pool", ".method")  # choices of a kind, not of a size
PIN_NAMES = re.compile(r"s(\d+)\.(attention|pool)")


class SmallestSizesChooser:
    """The smallest sizes of a space with kinds drawn from ``rng``: the sandwich's lower bound
    over sizes, without always training the same pooling and attention paths."""

    def __init__(self, rng: random.Random):
        self.rng, self.smallest = rng, _ExtremeChooser(largest=False)

    def choose(self, name, options):
        if name.endswith(KIND_CHOICES):
            return self.rng.choice(list(options))
        return self.smallest.choose(name, options)


class FairChooser:
    """Deals each choice's options from a shuffled deck, dealt anew when empty: over consecutive draws
    every option of every choice comes up equally often (FairNAS's strict fairness, Chu et al. 2021),
    where independent uniform draws leave some options behind for stretches."""

    def __init__(self, rng: random.Random):
        self.rng, self.decks = rng, {}

    def choose(self, name, options):
        options = list(options)
        key = (name, tuple(map(repr, options)))
        deck = self.decks.get(key)
        if not deck:
            deck = self.decks[key] = self.rng.sample(options, len(options))
        return deck.pop()


def by_size(name: str, options) -> list:
    """A choice's options, largest network first (the order ``SearchSpace.largest`` uses)."""
    left, out = list(options), []
    while left:
        out.append(_ExtremeChooser(largest=True).choose(name, left))
        left.remove(out[-1])
    return out


class Shrinking:
    """Progressive shrinking (OFA, Cai et al. 2020): only the largest ``ceil(open * n)`` options of each
    size choice are offered to ``inner``; kinds stay free."""

    def __init__(self, inner: Chooser, open_fraction: float):
        self.inner, self.open = inner, open_fraction

    def choose(self, name, options):
        options = list(options)
        if self.open < 1 and not name.endswith(KIND_CHOICES):
            allowed = by_size(name, options)[: max(1, math.ceil(self.open * len(options)))]
            options = [o for o in options if o in allowed]
        return self.inner.choose(name, options)


class Pinned:
    """One kind choice fixed to one value: the part of the space a few-shot sub-supernet trains."""

    def __init__(self, inner: Chooser, pin: tuple[str, str]):
        self.inner, (self.name, self.value) = inner, pin

    def choose(self, name, options):
        if name == self.name:
            return next(o for o in options if str(o) == self.value)
        return self.inner.choose(name, options)


def parse_pin(text: str, space: SearchSpace) -> tuple[str, str]:
    """``"s1.pool=tome"`` -> ``("s1.pool", "tome")``, checked against the space's choices."""
    name, _, value = text.partition("=")
    match = PIN_NAMES.fullmatch(name.strip())
    stages = getattr(space.spec, "stages", [])
    if match is None or int(match.group(1)) >= len(stages):
        raise UserError(
            f"--pin {text!r}: expected sI.attention=KIND or sI.pool=KIND with I a stage of space {space.name!r} "
            f"(0..{len(stages) - 1})"
        )
    stage, field = int(match.group(1)), match.group(2)
    options = [str(o) for o in (getattr(stages[stage], field) or [])]
    if value.strip() not in options or (field == "pool" and stage == 0):
        raise UserError(
            f"--pin {text!r}: stage {stage} of space {space.name!r} offers {field} {options or 'none'}"
        )
    return name.strip(), value.strip()


def pin_matches(arch: ArchConfig, pin: tuple[str, str]) -> bool:
    """Whether ``arch`` belongs to the part of the space ``pin`` names."""
    stage, field = PIN_NAMES.fullmatch(pin[0]).groups()
    return str(getattr(arch.stages[int(stage)], field)) == pin[1]


class SubnetSampler:
    """The subnets of each sandwich step: largest, smallest, ``random_subnets`` random ones, drawn the
    way ``config`` asks, from the stream ``start_epoch`` seeds."""

    def __init__(self, space: SearchSpace, config: TrainConfig, rng: random.Random | None = None):
        self.space, self.config = space, config
        self.pin = parse_pin(config.pin, space) if config.pin else None
        self.start_epoch(config.epochs, rng or random.Random(0))

    def start_epoch(self, epoch: int, rng: random.Random) -> None:
        """Epoch ``epoch`` (0-based) draws from ``rng``; decks and the shrinking schedule restart here."""
        self.rng = rng
        self.fair = FairChooser(rng) if self.config.sampling == "fair" else None
        ramp = self.config.progressive_epochs
        self.open = 1.0 if ramp <= 0 else min(1.0, (epoch + 1) / ramp)

    def _wrap(self, chooser: Chooser) -> Chooser:
        chooser = Shrinking(chooser, self.open) if self.open < 1 else chooser
        return Pinned(chooser, self.pin) if self.pin else chooser

    def largest(self) -> ArchConfig:
        return self.space.draw(self._wrap(_ExtremeChooser(largest=True)))

    def smallest(self) -> ArchConfig:
        if self.config.smallest_kinds == "random":
            return self.space.draw(self._wrap(SmallestSizesChooser(self.rng)))
        return self.space.draw(self._wrap(_ExtremeChooser(largest=False)))

    def random(self) -> ArchConfig:
        return self.space.draw(self._wrap(self.fair or RandomChooser(self.rng)))

    def sandwich(self) -> list[ArchConfig]:
        return [self.largest(), self.smallest()] + [self.random() for _ in range(self.config.random_subnets)]
