"""Campaigns on a real two-node Ray cluster, submitted with ``ray job submit``, tracked on a real
``mlflow server``: trials run only on the node holding the target's resource, the MLflow layout is
the local backend's, and losing the worker node mid-campaign loses nothing finished."""

from __future__ import annotations

import re

import pytest
from conftest import HEAD_RESOURCE, TARGET_RESOURCE, search_fixtures, wait_for
from nas.runners.campaign import search_argv

from nas.errors import UserError
from nas.search.ray_backend import parse_resource
from nas.tracking import Campaign


def test_target_resource_parsing():
    assert parse_resource("hw_xeon=1") == {"hw_xeon": 1.0}
    assert parse_resource("hw_a10g") == {"hw_a10g": 1.0}
    for bad in ("=1", "hw=0", "hw=x", "CPU=2", "node:10.0.0.1=1"):
        with pytest.raises(UserError, match="--target-resource"):
            parse_resource(bad)


def test_runner_adds_backend_and_address():
    assert search_argv(["--campaign", "c"]) == [
        "search",
        "--campaign",
        "c",
        "--backend",
        "ray",
        "--address",
        "auto",
    ]
    assert search_argv(["--address=10.0.0.1:6379", "--backend", "ray"]) == [
        "search", "--address=10.0.0.1:6379", "--backend", "ray"
    ]  # fmt: skip


def _check_on_target(runs) -> set[str]:
    """Every trial ran on a node offering the target resource (never on the head): their node ids."""
    for run in runs:
        offered = run.tags["node_resources"].split(",")
        assert TARGET_RESOURCE in offered and HEAD_RESOURCE not in offered, (run.trial_number, offered)
        assert run.tags["fingerprint"] and run.tags["node_ip"]
    return {run.tags["node_id"] for run in runs}


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_campaign_runs_on_the_target_nodes(ray_cluster, tiny_campaign, mlflow_server):
    config = tiny_campaign.config("ray-basic", trials=4, tracking_uri=mlflow_server)
    job = ray_cluster.submit(tiny_campaign.argv(config))
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    assert "campaign ray-basic: 4 finished, 0 failed, 4 run now" in job.stdout

    records = search_fixtures.check_campaign(config)  # parent, children, Pareto tags, Optuna agrees
    finished = [r for r in records.runs if r.status == "FINISHED"]
    assert len(finished) == 4
    assert len(_check_on_target(finished)) == 1  # the one worker node
    assert records.parent.data.tags["backend"] == "ray"
    assert records.parent.data.tags["target_resource"] == f"{TARGET_RESOURCE}=1"
    assert any(r.tags["pareto"] == "true" for r in finished)
    artifacts = {
        f.path for f in Campaign(mlflow_server, config.name).client.list_artifacts(records.parent.info.run_id)
    }
    assert {"pareto.csv"} <= artifacts


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_losing_the_worker_node_loses_no_finished_trial(ray_cluster, tiny_campaign, mlflow_server):
    config = tiny_campaign.config("ray-node-loss", trials=6, tracking_uri=mlflow_server)
    submitted = ray_cluster.submit(tiny_campaign.argv(config), wait=False)
    assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-4000:]
    job_id = re.search(r"raysubmit_\w+", submitted.stdout + submitted.stderr).group(0)

    def finished_runs():
        assert not ray_cluster.job_ended(job_id), ray_cluster.job_logs(job_id)[-4000:]
        tracker = Campaign(mlflow_server, config.name)
        return tracker.exists() and [r for r in tracker.trial_runs() if r.status == "FINISHED"]

    before = wait_for(finished_runs, 240, "a first finished trial")
    (lost_port,) = ray_cluster.workers
    ray_cluster.kill_worker(lost_port)  # mid-campaign: trials were still to run
    ray_cluster.add_worker(TARGET_RESOURCE)  # a replacement node of the target's kind joins
    status, logs = ray_cluster.wait_job(job_id)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "campaign ray-node-loss: 6 finished, 0 failed" in logs, logs[-4000:]

    records = search_fixtures.check_campaign(config)
    after = {r.run_id: r for r in records.runs}
    for run in before:  # nothing finished before the loss was lost or changed
        assert after[run.run_id].status == "FINISHED"
        assert after[run.run_id].metrics["val_accuracy"] == run.metrics["val_accuracy"]
    finished = [r for r in records.runs if r.status == "FINISHED"]
    assert len(finished) == 6
    assert len(_check_on_target(finished)) == 2  # the lost worker and its replacement
