"""A copied workspace is a workspace of its own: a campaign extended in the copy writes nothing into
the original (MLflow's artifact locations are absolute, and used to point there)."""

from __future__ import annotations

import shutil

from mlflow import MlflowClient
from optuna.trial import TrialState

from nas.search.campaign import run_campaign

SQLITE_TRANSIENT = ("-wal", "-shm", "-journal")  # come and go with a database's connections


def files(folder) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` but sqlite's transient ones: (size, mtime in ns) by relative path."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file() and not p.name.endswith(SQLITE_TRANSIENT)
    }


def test_a_copied_workspace_writes_only_into_itself(tiny, tmp_path, mlflow_db_template):
    ws, ws2 = tmp_path / "ws", tmp_path / "ws2"
    ws.mkdir()
    shutil.copy(mlflow_db_template, ws / "mlflow.db")  # a new store, without ~3 s of migrations
    config = tiny.config(ws, "copied", 2)  # every store in the workspace, as by default
    run_campaign(config, tiny.space, tiny.scorer(config), progress=False)
    shutil.copytree(ws, ws2, symlinks=True)  # cp -a ws ws2
    artifacts = {k: v for k, v in files(ws).items() if k.startswith("mlartifacts")}
    before = set(files(ws))

    extended = tiny.config(ws2, "copied", 4)
    assert extended.tracking_uri.endswith("ws2/mlflow.db") and extended.storage.endswith("ws2/optuna.db")
    run_campaign(extended, tiny.space, tiny.scorer(extended), progress=False)

    assert set(files(ws)) == before  # no new file in the original
    assert {k: v for k, v in files(ws).items() if k.startswith("mlartifacts")} == artifacts  # none changed
    records = tiny.check(extended)
    assert [t.state for t in records.trials] == [TrialState.COMPLETE] * 4
    client = MlflowClient(extended.tracking_uri)
    root = ws2 / "mlartifacts" / "vitnas"
    assert client.get_experiment(records.parent.info.experiment_id).artifact_location == root.as_uri()
    for run in records.runs:  # the copied trials' runs too: their artifacts are the copy's
        assert client.get_run(run.run_id).info.artifact_uri == f"{root.as_uri()}/{run.run_id}/artifacts"
        assert (root / run.run_id / "artifacts" / "arch.yaml").is_file()
    parent = root / records.parent.info.run_id / "artifacts" / "pareto.csv"
    assert len(parent.read_text().splitlines()) == 1 + 4  # the front over all four trials, in the copy
