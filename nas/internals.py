"""The one place vitnas reaches into other libraries' private parts; ``tests/test_internals.py``
fails loudly when an upgrade moves them.

- MLflow's per-process cache of artifact repositories: ``nas.tracking.follow_moved_store`` drops
  entries that still point into the folder a workspace was copied from.
- torch's flag for "a profiler is recording": ``nas.ops.timm_patch`` labels token reductions for
  ``torch.profiler`` only then (entering a labelled region costs ~10 µs per block otherwise).
"""

from __future__ import annotations


def mlflow_artifact_repos() -> dict:
    """MLflow's cache of artifact repositories by run id (``{}`` if this MLflow has none)."""
    from mlflow.tracking._tracking_service import utils

    return getattr(utils, "_artifact_repos_cache", None) or {}


def profiler_recording() -> bool:
    """Whether a ``torch.profiler``/autograd profiler is recording on this thread."""
    import torch

    return torch.autograd._profiler_enabled()
