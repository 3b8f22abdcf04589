"""MLflow tracking on real stores: a sqlite file per test, and one real `mlflow server` process."""

from __future__ import annotations

import csv
from html.parser import HTMLParser
from pathlib import Path

import pytest
from mlflow import MlflowClient

import nas.tracking as tracking
from nas.arch import ArchConfig, TimmArch
from nas.errors import UserError
from nas.tracking import Campaign, RunLogger, connect, default_tracking_uri, run_url, training_run

# A known front: BASE is non-dominated; layer k shifts it by (-0.05 accuracy, +0.5 ms) per step, so
# each layer k point is dominated by its layer k-1 twin and by nothing of its own layer: rank = k.
BASE = [(0.5, 1.0), (0.6, 2.0), (0.7, 4.0), (0.8, 8.0), (0.9, 16.0)]
POINTS = [(a - 0.05 * k, t + 0.5 * k, k) for k in range(3) for a, t in BASE]
POINTS += [(0.7, 4.0, 0), (0.58, 17.0, 3)]  # a duplicate of a front point (also on it); one of rank 3
ORDER = [11, 3, 16, 0, 7, 14, 5, 9, 1, 12, 4, 15, 8, 2, 10, 6, 13]  # trial number of each point


def arch(i: int) -> TimmArch:
    return TimmArch(model="deit_tiny_patch16_224", schedule={"kind": "tome", "r": i})


def fill(campaign: Campaign) -> dict[int, str]:
    """17 finished trials on POINTS, one FAILED (better than all), one without latency, one left RUNNING."""
    runs = {}
    for n, (acc, lat, _) in zip(ORDER, POINTS, strict=True):
        runs[n] = campaign.trial_run(n, arch(n))
        campaign.finish_trial(runs[n], {"val_accuracy": acc, "latency_ms": lat, "gflops": lat / 10})
    runs[17] = campaign.trial_run(17, arch(17))
    campaign.finish_trial(runs[17], {"val_accuracy": 0.99, "latency_ms": 0.1}, "FAILED", {"vitnas.failure": "oom"})
    runs[18] = campaign.trial_run(18, arch(18))
    campaign.finish_trial(runs[18], {"val_accuracy": 0.95, "latency_ms": None})
    runs[19] = campaign.trial_run(19, arch(19))
    return runs


def script_sources(html: str) -> list[str]:
    """The ``src`` of every ``<script>`` tag (script bodies are not parsed as markup)."""
    sources = []

    class Scripts(HTMLParser):
        def handle_starttag(self, tag, attrs):
            sources.extend(v for k, v in attrs if tag == "script" and k == "src")

    Scripts().feed(html)
    return sources


def tagged(client: MlflowClient, campaign: Campaign, filter_string: str) -> set[int]:
    runs = client.search_runs([campaign.experiment_id], f"{filter_string} and tags.`vitnas.campaign` = '{campaign.name}'")
    return {int(r.data.tags["trial_number"]) for r in runs}


@pytest.fixture
def campaign(sqlite_tracking_uri) -> Campaign:
    c = Campaign(sqlite_tracking_uri, "digits-cpu")
    c.start_or_resume(params={"space": "psvit-digits", "trials": 20}, tags={"target": "cpu"})
    return c


def test_tag_pareto_tags_exactly_the_known_front(campaign):
    runs = fill(campaign)
    front = campaign.tag_pareto(budget_ms=5.0)
    client = MlflowClient(campaign.tracking_uri)
    expected = {ORDER[i] for i, p in enumerate(POINTS) if p[2] == 0}
    assert tagged(client, campaign, "tags.pareto = 'true'") == expected
    assert [r["trial_number"] for r in front] == sorted(expected, key=lambda n: (POINTS[ORDER.index(n)][1], n))
    assert all(r["pareto"] and r["pareto_rank"] == 0 for r in front)
    for n, (_, _, rank) in zip(ORDER, POINTS, strict=True):
        assert client.get_run(runs[n]).data.tags["pareto_rank"] == str(rank)
    # missing latency: finished but unranked; failed and running trials are left alone
    assert client.get_run(runs[18]).data.tags["pareto_rank"] == "none"
    assert "pareto" not in client.get_run(runs[17]).data.tags
    assert "pareto" not in client.get_run(runs[19]).data.tags
    # two trials tie at (0.7, 4.0) within 5 ms: the earlier trial number is the pick
    ties = sorted(ORDER[i] for i, p in enumerate(POINTS) if p[:2] == (0.7, 4.0))
    assert tagged(client, campaign, "tags.best_under_budget = 'true'") == {ties[0]}
    # another budget moves the pick, and the old one is set false
    campaign.tag_pareto(budget_ms=None)
    assert tagged(client, campaign, "tags.best_under_budget = 'true'") == {ORDER[POINTS.index((0.9, 16.0, 0))]}
    campaign.tag_pareto(budget_ms=0.5)
    assert tagged(client, campaign, "tags.best_under_budget = 'true'") == set()
    assert len(tagged(client, campaign, "tags.best_under_budget = 'false'")) == 18


def test_trial_runs_reads_every_page(campaign, monkeypatch):
    fill(campaign)
    monkeypatch.setattr(tracking, "_PAGE", 4)
    finished = campaign.trial_runs()
    assert [t.trial_number for t in finished] == sorted([*ORDER, 18])
    assert len(campaign.trial_runs(only_finished=False)) == 20
    record = finished[0]
    assert record.arch_hash == arch(0).arch_hash() and record.metrics["gflops"] == pytest.approx(POINTS[3][1] / 10)


def test_front_artifacts_are_self_contained(campaign, tmp_path):
    fill(campaign)
    campaign.tag_pareto(budget_ms=5.0)
    campaign.log_front_artifacts(budget_ms=5.0)
    out = Path(campaign.client.download_artifacts(campaign.parent_run_id, "", str(tmp_path / "dl")))
    html = (out / "pareto.html").read_text()
    assert "plotly.js v" in html and len(html) > 1_000_000  # the library itself is inline
    assert '<script src="http' not in html and script_sources(html) == []
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "pareto.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 18  # every finished trial
    assert {r["trial_number"] for r in rows if r["pareto"] == "True"} == {str(ORDER[i]) for i, p in enumerate(POINTS) if p[2] == 0}
    # sqlite stores keep artifacts in the workspace, not in ./mlruns of the current folder
    workspace = Path(campaign.tracking_uri.removeprefix("sqlite:///")).parent
    assert (workspace / "mlartifacts" / "vitnas" / campaign.parent_run_id / "artifacts" / "pareto.csv").is_file()


def test_resume_finds_the_same_parent(campaign):
    first = campaign.parent_run_id
    campaign.end("KILLED")
    again = Campaign(campaign.tracking_uri, "digits-cpu")
    assert again.start_or_resume(params={"space": "psvit-digits", "trials": 40, "seed": 1}) == first
    run = again.client.get_run(first)
    assert run.info.status == "RUNNING"
    # params cannot change: the first value stays, the new one is recorded, new keys are logged
    assert run.data.params["trials"] == "20" and run.data.tags["vitnas.resumed.trials"] == "40"
    assert run.data.params["seed"] == "1"
    other = Campaign(campaign.tracking_uri, "digits-gpu")
    assert other.start_or_resume() != first


def test_trial_run_logs_arch_and_refuses_to_change_it(campaign):
    small = ArchConfig(image_size=8, patch_size=4, num_classes=10, stages=[
        {"tokens": 5, "dim": 16, "heads": 2, "mlp_ratio": 2.0, "cells": ["basic", "share"]}])
    run_id = campaign.trial_run(0, small, params_extra={"sampler": "nsga2"}, tags={"measured": "false"})
    run = campaign.client.get_run(run_id)
    assert run.data.params == {**{k: str(v) for k, v in small.flatten().items()}, "sampler": "nsga2"}
    assert run.data.tags["mlflow.parentRunId"] == campaign.parent_run_id
    assert run.data.tags["vitnas.role"] == "trial" and run.data.tags["trial_number"] == "0"
    assert run.data.tags["arch_hash"] == small.arch_hash()
    text = Path(campaign.client.download_artifacts(run_id, "arch.yaml")).read_text()
    assert text == small.to_yaml()
    # the same trial again (a resumed campaign re-running it) reuses the run
    assert campaign.trial_run(0, small, params_extra={"sampler": "nsga2"}) == run_id
    with pytest.raises(ValueError, match="trial 0 .* already logged"):
        campaign.trial_run(0, arch(1))
    with pytest.raises(ValueError, match="sampler"):
        campaign.trial_run(0, small, params_extra={"sampler": "tpe"})
    with pytest.raises(ValueError, match="6000"):
        campaign.trial_run(1, small, params_extra={"note": "x" * 6001})
    assert len(campaign.trial_runs(only_finished=False)) == 1  # the refused trial made no run


def test_close_stale_trials(campaign):
    stale, alive = campaign.trial_run(0, arch(0)), campaign.trial_run(1, arch(1))
    done = campaign.trial_run(2, arch(2))
    campaign.finish_trial(done, {"val_accuracy": 0.5, "latency_ms": 1.0})
    assert campaign.close_stale_trials(keep_running={alive}) == [stale]
    run = campaign.client.get_run(stale)
    assert run.info.status == "FAILED" and run.data.tags["vitnas.failure"] == "interrupted"
    assert campaign.client.get_run(alive).info.status == "RUNNING"
    assert campaign.client.get_run(done).info.status == "FINISHED"


def test_training_run_states(sqlite_tracking_uri, tmp_path):
    with training_run(sqlite_tracking_uri, "supernet", "train-1", {"lr": 0.001}, {"space": "x"}) as run:
        assert isinstance(run, RunLogger)
        run.log_metrics({"loss": 1.5, "acc": 0.2}, step=1)
        run.log_metrics({"loss": 1.0}, step=2)
        run.set_tags({"epoch": 2})
        (tmp_path / "ckpt.json").write_text("{}")
        run.log_artifact(tmp_path / "ckpt.json", "checkpoints")
        run.log_text("hello", "notes/readme.txt")
    client = MlflowClient(sqlite_tracking_uri)
    done = client.get_run(run.run_id)
    assert done.info.status == "FINISHED" and done.data.params == {"lr": "0.001"}
    assert done.data.metrics["loss"] == 1.0 and done.data.tags["epoch"] == "2"
    assert [m.step for m in client.get_metric_history(run.run_id, "loss")] == [1, 2]
    assert {a.path for a in client.list_artifacts(run.run_id)} == {"checkpoints", "notes"}

    with pytest.raises(RuntimeError), training_run(sqlite_tracking_uri, "supernet", "train-2", {}, {}) as run:
        raise RuntimeError("loss is NaN")
    failed = client.get_run(run.run_id)
    assert failed.info.status == "FAILED" and failed.data.tags["vitnas.failure"] == "RuntimeError: loss is NaN"

    with pytest.raises(KeyboardInterrupt), training_run(sqlite_tracking_uri, "supernet", "train-3", {}, {}) as run:
        raise KeyboardInterrupt
    assert client.get_run(run.run_id).info.status == "KILLED"


def test_uris(tmp_path):
    assert default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    with pytest.raises(UserError, match="file store"):
        Campaign(f"file://{tmp_path}/mlruns", "x")
    with pytest.raises(UserError, match="quotes"):
        Campaign(default_tracking_uri(tmp_path), "it's")
    assert run_url("http://host:5000/", "3", "abc") == "http://host:5000/#/experiments/3/runs/abc"
    assert run_url(default_tracking_uri(tmp_path), "3", "abc") is None


def test_campaign_on_a_real_server(mlflow_server, tmp_path):
    campaign = Campaign(mlflow_server, "server-campaign")
    parent = campaign.start_or_resume(params={"trials": 3})
    for n, (acc, lat) in enumerate([(0.5, 1.0), (0.6, 3.0), (0.4, 2.0)]):
        campaign.finish_trial(campaign.trial_run(n, arch(n)), {"val_accuracy": acc, "latency_ms": lat})
    front = campaign.tag_pareto(budget_ms=2.0)
    assert [r["trial_number"] for r in front] == [0, 1]
    campaign.log_front_artifacts(budget_ms=2.0)
    campaign.end()
    # a second client (another process would do the same) sees it all through the server
    client = MlflowClient(mlflow_server)
    assert Campaign(mlflow_server, "server-campaign").start_or_resume() == parent
    assert tagged(client, campaign, "tags.pareto = 'true'") == {0, 1}
    assert tagged(client, campaign, "tags.best_under_budget = 'true'") == {0}
    assert {a.path for a in client.list_artifacts(parent)} == {"pareto.html", "pareto.png", "pareto.csv"}
    assert client.get_experiment(campaign.experiment_id).artifact_location.startswith("mlflow-artifacts:")
    yaml_path = client.download_artifacts(front[0]["run_id"], "arch.yaml", str(tmp_path))
    assert Path(yaml_path).read_text() == arch(0).to_yaml()
    assert run_url(mlflow_server, campaign.experiment_id, parent).endswith(f"/runs/{parent}")


def test_sqlite_stores_commit_without_waiting_for_the_disk(tmp_path):
    """The MLflow store and the Optuna study a campaign writes every trial: WAL, synchronous NORMAL."""
    from sqlalchemy import text

    from nas.search.storage import open_storage

    client = connect(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_experiment("x")
    engines = [client._tracking_client.store.engine, open_storage(f"sqlite:///{tmp_path / 'optuna.db'}").engine]
    for engine in engines:
        with engine.connect() as con:
            assert con.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert con.execute(text("PRAGMA synchronous")).scalar() == 1  # NORMAL


def test_front_rows_default_to_the_campaigns_own_budget(campaign):
    """``vitnas pareto`` without a budget marks the trial the search marked, and says what the star is."""
    from nas.report import format_front

    fill(campaign)
    campaign.tag_pareto(budget_ms=5.0)  # as the search does at its end, with the campaign's budget
    client = MlflowClient(campaign.tracking_uri)
    searched = tagged(client, campaign, "tags.best_under_budget = 'true'")
    assert searched == {min(ORDER[i] for i, p in enumerate(POINTS) if p[:2] == (0.7, 4.0))}

    reader = Campaign(campaign.tracking_uri, "digits-cpu")  # another process: `vitnas pareto`
    rows = reader.front_rows()
    assert {r["trial_number"] for r in rows if r["best_under_budget"]} == searched
    assert reader.recorded_budget() == 5.0
    text = format_front(rows)  # as the CLI calls it without --latency-budget-ms
    star = [line for line in text.splitlines() if line.startswith("*") and "0.7" in line]
    assert len(star) == 1 and f" {next(iter(searched))} " in f" {star[0]} "
    assert text.splitlines()[-1] == "* = best_under_budget: the most accurate trial within the latency budget of 5 ms"

    # an explicit budget still wins; math.inf asks for the most accurate at any latency
    assert {r["trial_number"] for r in reader.front_rows(budget_ms=0.5) if r["best_under_budget"]} == set()
    assert "none is marked" in format_front(reader.front_rows(budget_ms=0.5)).splitlines()[-1]
    anywhere = reader.front_rows(budget_ms=float("inf"))
    assert {r["trial_number"] for r in anywhere if r["best_under_budget"]} == {ORDER[POINTS.index((0.9, 16.0, 0))]}
    assert format_front(anywhere).splitlines()[-1].endswith("(no latency budget)")

    # a campaign tagged before the tag existed: the budget it was started with (a param)
    campaign.client.delete_tag(campaign.parent_run_id, tracking.BUDGET)
    campaign.client.log_param(campaign.parent_run_id, tracking.BUDGET, "5.0")
    assert {r["trial_number"] for r in reader.front_rows() if r["best_under_budget"]} == searched


def test_a_copied_store_writes_its_artifacts_into_itself(tmp_path, mlflow_db_template):
    """``cp -a ws ws2``: runs resumed or started in ws2 keep their artifacts under ws2, never in ws."""
    import shutil

    ws, ws2 = tmp_path / "ws", tmp_path / "ws2"
    ws.mkdir()
    shutil.copy(mlflow_db_template, ws / "mlflow.db")
    first = Campaign(default_tracking_uri(ws), "moved")
    first.start_or_resume()
    old_run = first.trial_run(0, arch(0))
    first.finish_trial(old_run, {"val_accuracy": 0.5, "latency_ms": 1.0})
    first.end()
    own = first.client.create_experiment("own", artifact_location=(tmp_path / "elsewhere").as_uri())
    shutil.copytree(ws, ws2)
    before = sorted(p.relative_to(ws) for p in ws.rglob("*"))

    copy = Campaign(default_tracking_uri(ws2), "moved")
    assert copy.start_or_resume() == first.parent_run_id
    new_run = copy.trial_run(1, arch(1))
    copy.finish_trial(new_run, {"val_accuracy": 0.6, "latency_ms": 2.0})
    copy.tag_pareto()
    copy.log_front_artifacts()
    copy.end()
    with training_run(default_tracking_uri(ws2), "vitnas-train", "t", {}, {}) as run:
        run.log_text("x", "notes.txt")

    assert sorted(p.relative_to(ws) for p in ws.rglob("*")) == before  # nothing new in the original
    art = ws2 / "mlartifacts" / "vitnas"
    assert (art / new_run / "artifacts" / "arch.yaml").is_file()
    assert (art / first.parent_run_id / "artifacts" / "pareto.csv").is_file()
    assert (ws2 / "mlartifacts" / "vitnas-train" / run.run_id / "artifacts" / "notes.txt").is_file()
    client = MlflowClient(default_tracking_uri(ws2))
    assert client.get_experiment(copy.experiment_id).artifact_location == art.as_uri()
    assert client.get_run(old_run).info.artifact_uri == f"{art.as_uri()}/{old_run}/artifacts"
    assert client.get_experiment(own).artifact_location == (tmp_path / "elsewhere").as_uri()  # the user's choice
    assert tracking.follow_moved_store(default_tracking_uri(ws2)) == []  # done once
