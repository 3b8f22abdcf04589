"""Optuna samplers by name, with defaults sized to the campaign.

The latency budget reaches the samplers as an Optuna constraint (``trial.set_constraint``),
which NSGA-II and TPE read from the finished trials; nothing needs wiring here.
"""

from __future__ import annotations

from collections.abc import Callable

import optuna

from nas.errors import UserError


def _population(trials: int) -> int:
    """NSGA-II needs several generations to move: a quarter of the budget, between 8 and 50."""
    return max(8, min(50, trials // 4))


SAMPLERS: dict[str, Callable[[int, int], optuna.samplers.BaseSampler]] = {
    "nsga2": lambda seed, trials: optuna.samplers.NSGAIISampler(
        population_size=_population(trials), seed=seed
    ),
    "nsga3": lambda seed, trials: optuna.samplers.NSGAIIISampler(
        population_size=_population(trials), seed=seed
    ),
    "tpe": lambda seed, trials: optuna.samplers.TPESampler(
        seed=seed, multivariate=True, group=True, n_startup_trials=min(10, max(2, trials // 5))
    ),
    "random": lambda seed, trials: optuna.samplers.RandomSampler(seed=seed),
}


def make_sampler(name: str, seed: int, trials: int) -> optuna.samplers.BaseSampler:
    try:
        factory = SAMPLERS[name]
    except KeyError:
        raise UserError(f"--sampler {name!r}: unknown (allowed: {', '.join(SAMPLERS)})") from None
    return factory(seed, trials)
