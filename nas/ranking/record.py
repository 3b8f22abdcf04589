"""Where a rank-check's result is kept and found again: MLflow and the checkpoint's sidecar.

Each check is one run in the ``vitnas-supernet`` experiment (tag ``vitnas.role`` = ``rank-check``,
``supernet_hash`` = the checked weights' hash, ``ranking_trust`` = the summary line; metrics
``ranking_*``; the whole record as ``ranking.json``). The supernet's own training run, when the store
holds one for that checkpoint, gets the summary tag and metrics too. A campaign records the hash of the
weights it scored (``supernet_hash``), so ``vitnas search``, ``vitnas pareto`` and the dashboard find
the trust of exactly those weights: in the frozen sidecar, else the newest such run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from nas.names import ROLE, SUPERNET_HASH

EXPERIMENT = "vitnas-supernet"
ROLE_VALUE = "rank-check"
TRUST_TAG = "ranking_trust"


def metrics(ranking: dict) -> dict[str, float]:
    """The MLflow metrics of a ranking: each statistic with its interval ends."""
    k = ranking["top_k"]["k"]
    out = {
        "ranking_subnets": ranking["subnets_compared"],
        f"ranking_top{k}_hit_share": ranking["top_k"]["hit_share"],
    }
    for name, interval in (
        ("kendall_tau", ranking["kendall_tau"]), ("spearman_rho", ranking["spearman_rho"]),
        (f"top{k}_overlap", ranking["top_k"]["overlap"]),
    ):  # fmt: skip
        for end in ("value", "lo", "hi"):
            value = interval[end]
            if value is not None and math.isfinite(value):
                out[f"ranking_{name}" + ("" if end == "value" else f"_{end}")] = value
    if ranking.get("seed_agreement_tau") is not None and math.isfinite(ranking["seed_agreement_tau"]):
        out["ranking_seed_agreement_tau"] = ranking["seed_agreement_tau"]
    return out


def log_ranking(tracking_uri: str, ranking: dict, checkpoint: Path) -> str:
    """One rank-check run with the ranking; tags the supernet's training run too when there is one."""
    from nas.tracking import connect, filter_equals, training_run

    sa = ranking["standalone"]
    params = {
        "space": ranking["space"], "supernet_hash": ranking["weights_hash"], "checkpoint": str(checkpoint.resolve()),
        "data": ranking["data"]["spec"], "subnets": ranking["subnets_compared"], "epochs": sa["epochs"],
        "seeds": sa["seeds"], "holdout": sa["holdout"]["kind"], "folds": sa["holdout"]["folds"],
        "top_k": ranking["top_k"]["k"], "selection": ranking["selection"]["by"],
        "confidence": ranking["confidence"], "replicates": ranking["bootstrap"]["replicates"],
    }  # fmt: skip
    tags = {ROLE: ROLE_VALUE, "space": ranking["space"], SUPERNET_HASH: ranking["weights_hash"],
            TRUST_TAG: ranking["summary"]}  # fmt: skip
    values = metrics(ranking)
    with training_run(tracking_uri, EXPERIMENT, f"rank-check-{ranking['space']}", params, tags) as run:
        run.log_metrics(values)
        run.log_text(json.dumps(ranking, indent=2), "ranking.json")
        run_id = run.run_id
    client = connect(tracking_uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    where = f"tags.`{ROLE}` = 'supernet' and {filter_equals('tags.checkpoint', str((checkpoint / 'supernet.safetensors').resolve()))}"
    for supernet_run in client.search_runs([exp.experiment_id], where, max_results=5):
        client.set_tag(supernet_run.info.run_id, TRUST_TAG, ranking["summary"])
        for key, value in values.items():
            client.log_metric(supernet_run.info.run_id, key, value)
    return run_id


def from_sidecar(folder: str | Path | None, supernet_hash: str | None) -> dict | None:
    """The sidecar's ranking (``folder``: a checkpoint folder or a file in it) when it measured the
    weights of ``supernet_hash``. Read as JSON: no torch import for the CLI's read-only commands."""
    if not folder:
        return None
    folder = Path(folder)
    folder = folder if folder.is_dir() else folder.parent
    try:
        meta = json.loads((folder / "supernet.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    ranking = meta.get("ranking")
    if not ranking or (supernet_hash and ranking.get("weights_hash") != supernet_hash):
        return None
    return ranking


def from_store(client, supernet_hash: str) -> dict | None:
    """The newest finished rank-check of ``supernet_hash`` in an MLflow store, as a short summary:
    ``{"summary", "kendall_tau": {value, lo, hi}, "subnets_compared", "run_id"}``; None if there is none."""
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return None
    where = (
        f"tags.`{ROLE}` = '{ROLE_VALUE}' and tags.{SUPERNET_HASH} = '{supernet_hash}' "
        "and attributes.status = 'FINISHED'"
    )
    runs = client.search_runs(
        [exp.experiment_id], where, max_results=1, order_by=["attributes.start_time DESC"]
    )
    if not runs:
        return None
    run = runs[0]
    m = run.data.metrics
    return {
        "summary": run.data.tags.get(TRUST_TAG, ""),
        "kendall_tau": {
            end: m.get("ranking_kendall_tau" + suffix)
            for end, suffix in (("value", ""), ("lo", "_lo"), ("hi", "_hi"))
        },  # fmt: skip
        "subnets_compared": int(m.get("ranking_subnets", 0)),
        "run_id": run.info.run_id,
    }


def find(tracking_uri: str | None, supernet_hash: str | None, folders=()) -> dict | None:
    """The ranking trust of the weights ``supernet_hash``: from a sidecar in ``folders`` (checkpoint
    folders, e.g. a campaign's frozen copy and the original), else from MLflow."""
    for folder in folders:
        found = from_sidecar(folder, supernet_hash)
        if found is not None:
            return found
    if not (tracking_uri and supernet_hash):
        return None
    from nas.tracking import connect

    try:
        return from_store(connect(tracking_uri, read_only=True), supernet_hash)
    except Exception:  # a store that cannot be read only means no trust number to show
        return None


def trust_line(found: dict | None, checkpoint_hint: str = "CHECKPOINT") -> str:
    """The line ``vitnas search`` and ``vitnas pareto`` print under the front."""
    if found is None:
        return (
            "ranking trust: not measured for this supernet (vitnas rank-check --supernet "
            f"{checkpoint_hint} trains a few subnets from scratch and compares)"
        )
    return found["summary"]


def campaign_line(tracking_uri: str, tags: dict, params: dict) -> str | None:
    """The trust line of a campaign's parent run (its ``supernet_hash``, frozen copy and checkpoint);
    None for a campaign that scored no supernet (a timm space)."""
    digest = tags.get(SUPERNET_HASH)
    if not digest:
        return None
    checkpoint = params.get("supernet")
    found = find(tracking_uri, digest, [tags.get("frozen_weights"), checkpoint])
    return trust_line(found, checkpoint if checkpoint and checkpoint != "None" else "CHECKPOINT")
