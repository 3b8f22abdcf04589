"""``vitnas demo``: the whole pipeline on the embedded digits data, on this machine.

Supernet training, a search campaign, the Pareto front, export of the most accurate
architecture under the latency budget, a short retrain, then where to look. Every step
reuses what an earlier run finished (the supernet checkpoint, the campaign's trials), so an
interrupted demo picks up where it stopped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from nas.errors import UserError
from nas.export import export_trial
from nas.report import format_front
from nas.search.campaign import CampaignConfig, run_campaign, scorer_for
from nas.space import load_space
from nas.supernet import checkpoint as ckpt
from nas.supernet.train import train_supernet
from nas.train import train_from_recipe
from nas.training.config import SUPERNET_ONLY, TrainConfig

SPACE = "psvit-digits"


@dataclass(frozen=True)
class DemoConfig:
    workspace: str = "vitnas-runs"
    target: str = "cpu:threads=2,batch=1"
    trials: int = 60
    supernet_epochs: int = TrainConfig.epochs
    retrain_epochs: int = 3
    latency_budget_ms: float | None = None  # None: halfway (geometric) between smallest and largest
    sampler: str = "nsga2"
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        """Refused before anything is trained: the CLI checks its flags, this checks library callers."""
        for flag, value in (
            ("--trials", self.trials), ("--supernet-epochs", self.supernet_epochs),
            ("--retrain-epochs", self.retrain_epochs),
        ):  # fmt: skip
            if not isinstance(value, int) or value < 1:
                raise UserError(f"{flag} {value}: must be at least 1 (a whole number)")
        budget = self.latency_budget_ms
        if budget is not None and not (math.isfinite(budget) and budget > 0):
            raise UserError(f"--latency-budget-ms {budget}: must be a finite number > 0")


def run_demo(config: DemoConfig, log=print) -> dict:
    ws = Path(config.workspace).resolve()
    space = load_space(SPACE)
    log(f"== 1/5 supernet: {SPACE} on the embedded digits data, {config.supernet_epochs} epochs")
    checkpoint = _supernet(space, ws, config, log)

    log(f"== 2/5 search: {config.trials} trials, latency measured on {config.target}")
    campaign = CampaignConfig(
        name=f"demo-{SPACE}",
        space=space.source,
        target=config.target,
        trials=config.trials,
        workspace=str(ws),
        supernet=str(checkpoint),
        sampler=config.sampler,
        seed=config.seed,
        measure_budget_s=1.0,
    ).resolved()
    scorer = scorer_for(campaign, space)
    budget = config.latency_budget_ms or _auto_budget(space, scorer, log)
    campaign = CampaignConfig(**{**campaign.__dict__, "latency_budget_ms": round(budget, 3)})
    result = run_campaign(campaign, space, scorer, progress=config.progress)

    log(f"== 3/5 Pareto front ({result.finished} finished trials)")
    log(format_front(result.front, campaign.latency_budget_ms))
    best = result.best_under_budget
    if best is None:
        raise UserError(
            f"no trial met the {campaign.latency_budget_ms} ms budget; rerun with a larger --latency-budget-ms"
        )

    out = ws / "export" / f"trial-{best['trial_number']}"
    log(
        f"== 4/5 export trial {best['trial_number']} (accuracy {best['val_accuracy']:.4f}, "
        f"{best['latency_ms']:.3f} ms) to {out}"
    )
    exported = export_trial(campaign.tracking_uri, out, run_id=best["run_id"], epochs=config.retrain_epochs)

    log(f"== 5/5 retrain {config.retrain_epochs} epochs from the inherited weights")
    trained = train_from_recipe(exported.out / "train.yaml", progress=config.progress)
    log(
        f"test accuracy {trained.test_accuracy:.4f} (validation {trained.val_accuracy:.4f}), weights {trained.weights}"
    )

    db = campaign.tracking_uri
    log("\nwhere to look:")
    log(f'  mlflow ui --backend-store-uri {db}        # filter: tags.pareto = "true"')
    log(f"  vitnas pareto --campaign {campaign.name} --workspace {ws}")
    log(f"  vitnas dashboard --tracking-uri {db}")
    log(f"  {exported.out}/   (arch.yaml, weights.safetensors, train.yaml, README.md)")
    return {
        "checkpoint": str(checkpoint),
        "campaign": campaign.name,
        "budget_ms": campaign.latency_budget_ms,
        "best": best,
        "export": str(exported.out),
        "test_accuracy": trained.test_accuracy,
    }


def _supernet(space, ws: Path, config: DemoConfig, log) -> Path:
    """Train the supernet, or continue/reuse the one an earlier demo left in the workspace."""
    folder = ckpt.checkpoint_dir(ws, space)
    resume = (folder / ckpt.SIDECAR).is_file()
    train = TrainConfig(epochs=config.supernet_epochs, seed=config.seed)
    if resume:
        log(f"found a checkpoint in {folder}: continuing it")
        train = _as_trained(train, ckpt.read_meta(folder)["config"])
    result = train_supernet(
        space,
        "digits",
        ws,
        train,
        resume=resume,
        progress=config.progress,
        log=log,
    )
    return result.path


def _as_trained(config: TrainConfig, saved: dict) -> TrainConfig:
    """``config`` with the sandwich settings a checkpoint was trained with, so that one trained under
    an earlier default continues (the demo sets only epochs and seed; a different seed is refused)."""
    return config.replace(**{k: saved[k] for k in SUPERNET_ONLY if k in saved})


def _auto_budget(space, scorer, log) -> float:
    """Halfway, on a log scale, between the latencies here of the space's smallest-size and largest-size
    members (sizes are not latencies: on some machines the smallest-size member is the slower one)."""
    small, large = (scorer.score(arch).latency_ms for arch in (space.smallest(), space.largest()))
    budget = math.sqrt(small * large)
    faster = "smallest-size" if small <= large else "largest-size"
    log(
        f"latency budget {budget:.3f} ms: geometric mean of the smallest-size member's {small:.3f} ms and the "
        f"largest-size member's {large:.3f} ms here (the {faster} one is faster)"
    )
    return budget
