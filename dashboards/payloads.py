"""The JSON the pages draw from: campaign summaries, points and fronts, shared architectures, one
trial's details with its architecture laid out for drawing.

Pure functions of what ``data.Store`` read. The front (``data.Trials``) and the pick under a budget
use ``nas.pareto``: the same definitions as ``vitnas search`` and its tags. Strings are
passed on as they are; the pages insert them as text, never as markup.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Sequence

from mlflow.entities import Run

from nas.arch import arch_from_text
from nas.errors import UserError
from nas.families import family_of
from nas.names import (
    ARCH_HASH,
    CAMPAIGN,
    FINGERPRINT,
    PARETO,
    PARETO_RANK,
    SUPERNET_HASH,
    TRIAL_NUMBER,
    WEIGHTS_HASH,
)
from nas.pareto import best_under_budget
from nas.tracking import run_url

from .data import ACC, LAT, CampaignInfo, Trial, Trials

#: Metrics shown with every point (hover) and in the trial panel, in this order.
SHOWN = (ACC, LAT, "latency_p90_ms", "latency_noisy", "gflops", "params_m")
#: Tags of a trial worth showing in its panel.
TRIAL_TAGS = ("target", FINGERPRINT, "measured", "latency_cached", SUPERNET_HASH, WEIGHTS_HASH,
              PARETO, PARETO_RANK, "best_under_budget")  # fmt: skip


def best(points: Sequence[Trial], budget_ms: float | None) -> Trial | None:
    """The most accurate point within the budget (ties: faster, then earlier); any latency when None."""
    i = best_under_budget(
        [t.metrics[ACC] for t in points],
        [t.metrics[LAT] for t in points],
        float("inf") if budget_ms is None else budget_ms,
    )
    return None if i is None else points[i]


def _pick(trial: Trial | None) -> dict | None:
    if trial is None:
        return None
    return {"run_id": trial.run_id, "trial_number": trial.trial_number,
            "accuracy": trial.metrics[ACC], "latency_ms": trial.metrics[LAT]}  # fmt: skip


def campaign_meta(info: CampaignInfo) -> dict:
    return {
        "ref": info.ref,
        "experiment_id": info.experiment_id,
        "experiment": info.experiment,
        "name": info.name,
        "run_id": info.run_id,
        "status": info.status,
        "target": info.target,
        "space": info.space,
        "budget_ms": info.budget_ms,
    }


def campaign_summary(info: CampaignInfo, trials: Trials, budgets: Sequence[float]) -> dict:
    """One row of the campaign list: counts, front size, best accuracy overall, under the campaign's
    own budget and under each of ``budgets``."""
    statuses = [t.status for t in trials.all]
    return {
        **campaign_meta(info),
        "trials": statuses.count("FINISHED"),
        "failed": statuses.count("FAILED") + statuses.count("KILLED"),
        "running": statuses.count("RUNNING"),
        "front": len(trials.front),
        "best_any": _pick(best(trials.points, None)),
        "best_own": _pick(best(trials.points, info.budget_ms)) if info.budget_ms is not None else None,
        "best": [_pick(best(trials.points, b)) for b in budgets],
    }


def list_budgets(infos: Sequence[CampaignInfo], extra: Sequence[float] = ()) -> list[float]:
    """The columns of the list: every campaign's budget and any asked for, ascending."""
    return sorted({*(i.budget_ms for i in infos if i.budget_ms is not None), *extra})


def point(trial: Trial) -> dict:
    return {
        "run_id": trial.run_id,
        "run_name": trial.run_name,
        "trial_number": trial.trial_number,
        "arch_hash": trial.arch_hash,
        **{k: trial.metrics.get(k) for k in SHOWN},
    }


def campaign_points(info: CampaignInfo, trials: Trials, ranking: dict | None = None) -> dict:
    """A campaign page's data: every plottable trial, the front (run ids, fastest first), the pick
    under the campaign's budget, how many trials could not be plotted, and the ranking trust of the
    supernet it scored with (``ranking``: ``Store.ranking``; None: not measured or no supernet)."""
    pick = best(trials.points, info.budget_ms)
    return {
        "campaign": campaign_meta(info),
        "supernet": bool(info.tags.get(SUPERNET_HASH)),
        "ranking": ranking,
        "points": [point(t) for t in trials.points],
        "front": [t.run_id for t in trials.front],
        "best_under_budget": None if pick is None else pick.run_id,
        "not_plotted": len(trials.all) - len(trials.points),
    }


def compare(infos: Sequence[CampaignInfo], trials: Sequence[Trials]) -> dict:
    """Several campaigns side by side: each one's points and front, and every architecture (by
    ``arch_hash``) finished in two or more of them, with its numbers in each (first trial of it)."""
    by_hash: list[dict[str, Trial]] = []
    for ts in trials:
        first: dict[str, Trial] = {}
        for t in ts.points:
            first.setdefault(t.arch_hash, t)
        by_hash.append(first)
    hashes = sorted({h for m in by_hash for h in m if h and sum(h in o for o in by_hash) >= 2})
    return {
        "campaigns": [campaign_points(i, ts) for i, ts in zip(infos, trials)],
        "same_space": len({i.space for i in infos}) == 1,
        "shared": [
            {"arch_hash": h, "runs": [point(m[h]) if h in m else None for m in by_hash]} for h in hashes
        ],
    }


# -- one trial ----------------------------------------------------------------------------------
def export_command(tracking_uri: str, run: Run) -> str:
    """The exact ``vitnas export`` command line for the trial, quoted for a POSIX shell."""
    number_tag = run.data.tags.get(TRIAL_NUMBER, "")
    out = f"exported/trial-{number_tag}" if number_tag.isdigit() else f"exported/{run.info.run_id}"
    return shlex.join(
        ["vitnas", "export", "--run-id", run.info.run_id, "--out", out, "--tracking-uri", tracking_uri]
    )


def mlflow_link(tracking_uri: str, experiment_id: str, run_id: str) -> dict:
    """The run's MLflow page: a URL on a server; for a database store, how to start the UI and where to go."""
    url = run_url(tracking_uri, experiment_id, run_id)
    if url is not None:
        return {"url": url}
    return {
        "command": shlex.join(["mlflow", "ui", "--backend-store-uri", tracking_uri]),
        "path": f"#/experiments/{experiment_id}/runs/{run_id}",
    }


def arch_drawing(arch) -> dict:
    """What the page draws of an architecture, as its family describes it (``Family.drawing``)."""
    return family_of(arch).drawing(arch)


def trial_detail(tracking_uri: str, run: Run, arch_text: str | None) -> dict:
    """A clicked point's panel: its numbers, the architecture drawn, the MLflow page, the export command."""
    info, tags = run.info, run.data.tags
    arch, problem = None, None
    if arch_text is None:
        problem = "the run has no arch.yaml artifact"
    else:
        try:
            arch = arch_drawing(arch_from_text(arch_text, f"run {info.run_id} arch.yaml"))
        except UserError as err:
            problem = str(err)
    return {
        "run_id": info.run_id,
        "run_name": info.run_name or "",
        "experiment_id": info.experiment_id,
        "status": info.status,
        "campaign": tags.get(CAMPAIGN, ""),
        "trial_number": tags.get(TRIAL_NUMBER, ""),
        "arch_hash": tags.get(ARCH_HASH, ""),
        "metrics": {
            k: v if math.isfinite(v) else None for k, v in sorted(run.data.metrics.items(), key=_shown_first)
        },
        "tags": {k: tags[k] for k in TRIAL_TAGS if k in tags},
        "arch": arch,
        "arch_error": problem,
        "arch_yaml": arch_text,
        "export_command": export_command(tracking_uri, run),
        "mlflow": mlflow_link(tracking_uri, info.experiment_id, info.run_id),
    }


def _shown_first(item: tuple[str, float]) -> tuple[int, str]:
    key = item[0]
    return (SHOWN.index(key) if key in SHOWN else len(SHOWN), key)
