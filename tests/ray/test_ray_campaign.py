"""Campaigns on a real two-node Ray cluster, submitted with ``ray job submit``, tracked on a real
``mlflow server``: trials run only on the node holding the target's resource, the MLflow layout is
the local backend's, and losing the worker node mid-campaign loses nothing finished."""

from __future__ import annotations

import re
from dataclasses import replace

import optuna
import pytest
from conftest import HEAD_RESOURCE, TARGET_RESOURCE, search_fixtures, wait_for
from nas.runners.campaign import search_argv
from optuna.trial import TrialState
from ray.tune import Result
from ray.tune.execution.placement_groups import resource_dict_to_pg_factory

from nas.cli import main
from nas.errors import UserError
from nas.hardware.target import Target
from nas.search.campaign import CampaignConfig
from nas.search.ray_backend import (
    FAILED,
    NUMBER,
    RUN_ID,
    RayOptions,
    _logged_reports,
    _tell_unreported,
    _tune_reports,
    parse_resource,
    tell,
    trial_config,
    trial_resources,
)
from nas.space import space_from_dict
from nas.tracking import Campaign


def test_target_resource_parsing():
    assert parse_resource("hw_xeon=1") == {"hw_xeon": 1.0}
    assert parse_resource("hw_a10g") == {"hw_a10g": 1.0}
    for bad in ("=1", "hw=0", "hw=x", "CPU=2", "node:10.0.0.1=1"):
        with pytest.raises(UserError, match="--target-resource"):
            parse_resource(bad)


def test_a_trial_asks_for_its_gpus_and_computes_accuracy_on_them():
    target = Target.parse("cpu:threads=2")
    cpu_only = RayOptions(target_resource={"hw_xeon": 1.0})
    with_gpu = replace(cpu_only, gpus_per_trial=0.5)
    assert trial_resources(target, cpu_only) == {"CPU": 2, "hw_xeon": 1.0}
    assert trial_resources(target, with_gpu) == {"CPU": 2, "hw_xeon": 1.0, "GPU": 0.5}
    # as Tune reads the dict (``tune.with_resources``): one bundle, the GPU in it
    [bundle] = resource_dict_to_pg_factory(trial_resources(target, with_gpu)).bundles
    assert bundle["GPU"] == 0.5 and bundle["CPU"] == 2 and bundle["hw_xeon"] == 1.0

    config = CampaignConfig(name="c", space="s.yaml", target=str(target), trials=1, workspace="ws")
    assert trial_config(config, cpu_only).eval_device == "auto"  # the target's device
    assert trial_config(config, with_gpu).eval_device == "cuda"  # the trial's first GPU
    assert trial_config(replace(config, eval_device="cpu"), with_gpu).eval_device == "cpu"  # as asked


def test_negative_gpus_per_trial_are_refused_before_anything_is_written(tmp_path, capsys):
    for bad in (-1.0, -0.5, float("nan")):
        with pytest.raises(UserError, match=r"^--gpus-per-trial .*: expected a number >= 0"):
            RayOptions(gpus_per_trial=bad)
    workspace = tmp_path / "ws"
    argv = ["search", "--space", "psvit-digits", "--campaign", "c", "--workspace", str(workspace),
            "--backend", "ray", "--gpus-per-trial", "-1"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vitnas: error: --gpus-per-trial -1: expected a number >= 0")
    assert not workspace.exists()


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


def _study():
    return optuna.create_study(directions=["maximize", "minimize"])


def _result(metrics: dict | None, error: Exception | None = None) -> Result:
    return Result(metrics=metrics, checkpoint=None, error=error, path="unused")


def test_trials_reported_to_tune_but_not_to_optuna_are_told_from_the_results():
    """A restored searcher may not know a trial it suggested: the driver tells it from Tune's results."""
    study = _study()
    done, errored, failed, running = (study.ask() for _ in range(4))
    study.tell(done, [0.5, 2.0])
    results = [
        _result({NUMBER: done.number, "val_accuracy": 0.9, "latency_ms": 1.0}),  # told already: unchanged
        _result({NUMBER: errored.number, "val_accuracy": 0.8, "latency_ms": 1.0}, RuntimeError("node lost")),
        _result({NUMBER: failed.number, FAILED: "out of memory", RUN_ID: "r-failed"}),
        _result({NUMBER: running.number, "val_accuracy": 0.7, "latency_ms": 3.0, RUN_ID: "r-running"}),
    ]
    _tell_unreported(study, _tune_reports(results), budget_ms=2.5)

    trials = study.get_trials()
    assert trials[done.number].values == [0.5, 2.0]
    assert trials[errored.number].state == TrialState.RUNNING  # left for a resume, or failed at the end
    assert trials[failed.number].state == TrialState.FAIL
    assert trials[failed.number].user_attrs[RUN_ID] == "r-failed"
    told = trials[running.number]
    assert told.state == TrialState.COMPLETE and told.values == [0.7, 3.0]
    assert told.user_attrs == {RUN_ID: "r-running", "measured": True}
    assert told.constraints == {"latency_budget_ms": 0.5}  # 3.0 ms over a 2.5 ms budget: infeasible


def test_a_result_without_objectives_is_a_failed_candidate():
    study = _study()
    trial = study.ask()
    tell(study, trial, {}, budget_ms=None)
    assert study.trials[0].state == TrialState.FAIL
    # a restored experiment can run a trial the study already has: the first values stand
    tell(study, trial, {"val_accuracy": 0.9, "latency_ms": 1.0}, budget_ms=None)
    assert study.trials[0].state == TrialState.FAIL


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


def _submit_until_a_trial_finished(ray_cluster, tiny_campaign, config):
    """Submit the campaign without waiting; once a first trial has finished (with more still to
    run: 12 trials of a second or two each), its job id and the runs finished so far."""
    submitted = ray_cluster.submit(tiny_campaign.argv(config), wait=False)
    assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-4000:]
    job_id = re.search(r"raysubmit_\w+", submitted.stdout + submitted.stderr).group(0)
    tracker = Campaign(config.tracking_uri, config.name)

    def finished_runs():  # polled often and cheaply: the tracking server only
        return tracker.exists() and [r for r in tracker.trial_runs() if r.status == "FINISHED"]

    before = wait_for(finished_runs, 240, "a first finished trial", every_s=0.2)
    assert len(before) < config.trials, "every trial finished before the fault"
    return job_id, before


def _check_finished_kept(records, before) -> None:
    """Nothing that had finished before the fault was lost or changed."""
    after = {r.run_id: r for r in records.runs}
    for run in before:
        assert after[run.run_id].status == "FINISHED"
        assert after[run.run_id].metrics["val_accuracy"] == run.metrics["val_accuracy"]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_losing_the_worker_node_loses_no_finished_trial(ray_cluster, tiny_campaign, mlflow_server):
    config = tiny_campaign.config("ray-node-loss", trials=12, tracking_uri=mlflow_server)
    job_id, before = _submit_until_a_trial_finished(ray_cluster, tiny_campaign, config)
    (lost_port,) = ray_cluster.workers
    ray_cluster.kill_worker(lost_port)  # mid-campaign: trials were still to run
    ray_cluster.add_worker(TARGET_RESOURCE)  # a replacement node of the target's kind joins
    status, logs = ray_cluster.wait_job(job_id)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "campaign ray-node-loss: 12 finished, 0 failed" in logs, logs[-4000:]

    records = search_fixtures.check_campaign(config)
    _check_finished_kept(records, before)
    finished = [r for r in records.runs if r.status == "FINISHED"]
    assert len(finished) == 12
    assert len(_check_on_target(finished)) == 2  # the lost worker and its replacement


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_campaign_whose_driver_died_resumes_where_it_stopped(ray_cluster, tiny_campaign, mlflow_server):
    """The same command again runs only the missing trials: finished ones are kept, none runs twice."""
    config = tiny_campaign.config("ray-driver-loss", trials=12, tracking_uri=mlflow_server)
    job_id, before = _submit_until_a_trial_finished(ray_cluster, tiny_campaign, config)
    ray_cluster.stop_job(job_id)  # the driver dies mid-campaign
    assert ray_cluster.wait_job(job_id)[0] == "STOPPED"

    again = ray_cluster.submit(tiny_campaign.argv(config))
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert re.search(r"campaign ray-driver-loss: 12 finished, \d+ failed", again.stdout), again.stdout[-4000:]

    records = search_fixtures.check_campaign(config)  # one run per trial number, Optuna agrees
    _check_finished_kept(records, before)
    assert len([r for r in records.runs if r.status == "FINISHED"]) == 12
    failed = [r for r in records.runs if r.status == "FAILED"]
    assert all(r.tags["vitnas.failure"] == "interrupted" for r in failed)  # cut off by the driver's end only



def test_a_trial_the_worker_logged_but_the_dead_driver_never_told_is_kept(sqlite_tracking_uri):
    """Its child run FINISHED, its Optuna trial still RUNNING: resuming tells the study, not fails it."""
    arch = space_from_dict(search_fixtures.TINY_SPACE).sample(0)
    tracker = Campaign(sqlite_tracking_uri, "driver-died")
    tracker.start_or_resume(params={}, tags={})
    study = _study()
    logged, cut_off = study.ask(), study.ask()
    for trial in (logged, cut_off):
        trial.set_user_attr("arch_hash", arch.arch_hash())
    run_id = tracker.trial_run(logged.number, arch)
    tracker.finish_trial(run_id, {"val_accuracy": 0.8, "latency_ms": 1.5})
    tracker.trial_run(cut_off.number, arch)  # still RUNNING: killed with the driver

    reports = _logged_reports(study, tracker)
    assert reports == {logged.number: {RUN_ID: run_id, "val_accuracy": 0.8, "latency_ms": 1.5}}
    _tell_unreported(study, reports, budget_ms=None)
    assert study.trials[logged.number].values == [0.8, 1.5]
    assert study.trials[cut_off.number].state == TrialState.RUNNING  # failed as interrupted next
