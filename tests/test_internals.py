"""The private parts of MLflow and torch that ``nas.internals`` uses are where it expects them.

When one of these fails after an upgrade, fix ``nas/internals.py`` (or move its caller to a public
API) before anything else: the callers' own tests may then fail in less obvious ways.
"""

from __future__ import annotations

import mlflow

from nas.internals import mlflow_artifact_repos, profiler_recording


def test_mlflow_artifact_repository_cache_is_there(tmp_path, monkeypatch):
    from mlflow.tracking._tracking_service import utils

    monkeypatch.chdir(tmp_path)  # a sqlite store's default artifact root is ./mlruns
    assert hasattr(utils, "_artifact_repos_cache"), f"mlflow {mlflow.__version__} moved its artifact repo cache"
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        with mlflow.start_run() as run:
            mlflow.log_text("x", "x.txt")
        assert run.info.run_id in mlflow_artifact_repos()  # keyed by run id, as follow_moved_store assumes
    finally:
        mlflow.set_tracking_uri(None)


def test_torch_profiler_flag_follows_the_profiler():
    import torch

    assert profiler_recording() is False
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        assert profiler_recording() is True
    assert profiler_recording() is False
