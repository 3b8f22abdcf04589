"""The one place vitnas reaches into other libraries' private parts; ``tests/test_internals.py``
fails loudly when an upgrade moves them.

- Optuna's RDB table models and session scope: ``nas.search.storage`` writes a finished trial's
  rows in one flush, where the public ``BaseStorage`` calls would take one transaction each.
- MLflow's per-process cache of artifact repositories: ``nas.tracking.follow_moved_store`` drops
  entries that still point into the folder a workspace was copied from.
"""

from __future__ import annotations


def optuna_rdb():
    """``(models, scoped_session)``: Optuna's RDB table models and its session context manager."""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    return models, _create_scoped_session


def mlflow_artifact_repos() -> dict:
    """MLflow's cache of artifact repositories by run id (``{}`` if this MLflow has none)."""
    from mlflow.tracking._tracking_service import utils

    return getattr(utils, "_artifact_repos_cache", None) or {}
