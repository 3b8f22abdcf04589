"""A whole search campaign on a tiny space: Optuna on sqlite, MLflow on a real server or sqlite file,
real subnets, FLOPs and latencies measured on this CPU."""

from __future__ import annotations

import csv
import json
import random

import yaml
from mlflow import MlflowClient

from nas.cli import main
from nas.hardware.flops import params
from nas.hardware.measure import measure
from nas.hardware.target import Target
from nas.search.campaign import BUDGET_MARGIN, CampaignConfig, run_campaign
from nas.supernet import VitnasSubnet

METRICS = {"val_accuracy", "latency_ms", "latency_p90_ms", "gflops", "params_m"}


def measured_ms(tiny, arch) -> float:
    target = Target.parse(tiny.target)
    shape = target.input_shape(arch.image_size)
    return measure(
        VitnasSubnet(arch), target, input_shape=shape, time_budget_s=tiny.measure_budget_s
    ).median_ms


def test_campaign_end_to_end_on_an_mlflow_server(mlflow_server, tiny, tmp_path, capsys):
    # aims at a budget most members meet, not all: 3/4 of the way (log scale) from the smallest to the largest
    small, large = (measured_ms(tiny, a) for a in (tiny.space.smallest(), tiny.space.largest()))
    budget = round(small**0.25 * large**0.75, 4)
    name = f"e2e-{tmp_path.name}"
    config = tiny.config(tmp_path, name, 6, tracking_uri=mlflow_server, latency_budget_ms=budget)
    scorer = tiny.scorer(config)
    result = run_campaign(config, tiny.space, scorer, progress=False)

    assert (result.finished, result.failed, result.ran_now) == (6, 0, 6)
    records = tiny.check(config)
    client = MlflowClient(mlflow_server)
    parent = records.parent
    assert parent.info.run_id == result.parent_run_id and parent.info.status == "FINISHED"
    assert parent.data.params["trials"] == "6" and parent.data.params["space"] == "tiny"
    assert parent.data.tags["fingerprint"] == scorer.fingerprint.digest()
    assert parent.data.tags["supernet_hash"] == scorer.weights_hash
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pareto.html", "pareto.png", "pareto.csv"} <= artifacts

    for trial, record in zip(records.trials, records.runs, strict=True):
        run = client.get_run(record.run_id)
        arch = tiny.space.from_params(trial.params)
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.params == {k: str(v) for k, v in arch.flatten().items()}
        assert METRICS <= set(run.data.metrics)
        assert run.data.metrics["latency_ms"] == trial.values[1]  # measured: Optuna holds the same value
        assert run.data.metrics["latency_p90_ms"] >= run.data.metrics["latency_ms"]
        tags = run.data.tags
        assert tags["arch_hash"] == arch.arch_hash() and tags["trial_number"] == str(trial.number)
        assert tags["fingerprint"] == scorer.fingerprint.digest() and tags["measured"] == "true"
        path = client.download_artifacts(record.run_id, "arch.yaml", str(tmp_path))
        assert yaml.safe_load(open(path)) == arch.to_dict()

    # the front (checked against brute force above) as a tag search finds it, as the campaign
    # returns it, in the parent's CSV, and as `vitnas pareto --json` prints it
    tagged = {r.trial_number for r in records.runs if r.tags["pareto"] == "true"}
    found = client.search_runs(
        [parent.info.experiment_id], f"tags.`vitnas.campaign` = '{name}' and tags.pareto = 'true'"
    )
    assert {int(r.data.tags["trial_number"]) for r in found} == tagged
    assert {r["trial_number"] for r in result.front} == tagged
    # one best when a trial fits the budget (check_campaign checked which); on a noisy machine none may
    best = [r.trial_number for r in records.runs if r.tags["best_under_budget"] == "true"]
    assert len(best) == any(t.values[1] <= budget for t in records.trials)
    assert best == ([] if result.best_under_budget is None else [result.best_under_budget["trial_number"]])
    with open(client.download_artifacts(parent.info.run_id, "pareto.csv", str(tmp_path))) as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(r["trial_number"]) for r in rows) == list(range(6))
    assert {int(r["trial_number"]) for r in rows if r["pareto"] == "True"} == tagged
    capsys.readouterr()
    argv = ["pareto", "--campaign", name, "--tracking-uri", mlflow_server, "--latency-budget-ms", str(budget)]
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result.front, default=str))


class ParamsPredictor:
    """Honest about what it is: latency proportional to the parameter count, scaled to err on the slow
    side (1.5x the larger ms per parameter of the smallest and the largest member, as measured here).

    A predictor that errs fast would send the front's candidates one after another to be measured
    (each measured one falls back behind unmeasured ones), until few are left unmeasured.
    """

    def __init__(self, tiny, fingerprint):
        self.fingerprint = fingerprint
        extremes = (tiny.space.smallest(), tiny.space.largest())
        self.ms_per_param = 1.5 * max(measured_ms(tiny, a) / self.params(a) for a in extremes)

    @staticmethod
    def params(arch) -> int:
        return params(VitnasSubnet(arch, device="meta"))

    def predict(self, arch) -> float:
        return self.ms_per_param * self.params(arch)


def test_predicted_far_over_budget_is_not_measured_and_the_front_is(sqlite_tracking_uri, tiny, tmp_path):
    config = tiny.config(tmp_path, "predicted", 10, tracking_uri=sqlite_tracking_uri)
    scorer = tiny.scorer(config)
    scorer.predictor = ParamsPredictor(tiny, scorer.fingerprint)
    # the 10th percentile of the predictions: most candidates are predicted far over this budget
    predictions = sorted(scorer.predict(tiny.space.sample(random.Random(i))) for i in range(40))
    config = CampaignConfig(**{**config.__dict__, "latency_budget_ms": round(predictions[4], 4)})
    run_campaign(config, tiny.space, scorer, progress=False)

    runs = tiny.check(config).runs
    client = MlflowClient(sqlite_tracking_uri)
    far = [
        r for r in runs if r.metrics["predicted_latency_ms"] > config.latency_budget_ms * (1 + BUDGET_MARGIN)
    ]
    for run in far:
        # as a candidate, the prediction stood in; measured only if it reached the front after that
        history = sorted(client.get_metric_history(run.run_id, "latency_ms"), key=lambda m: m.timestamp)
        assert history[0].value == run.metrics["predicted_latency_ms"]
        assert len(history) == (1 if run.tags["measured"] == "false" else 2)
    skipped = [r for r in far if r.tags["measured"] == "false"]
    assert skipped, "no candidate was skipped for its prediction: the test proves nothing"
    for run in skipped:
        assert "latency_p90_ms" not in run.metrics
        assert scorer.cache.get(run.arch_hash, scorer.fingerprint, scorer.target) is None
    front = [r for r in runs if r.tags["pareto"] == "true"]
    assert front and all(r.tags["measured"] == "true" for r in front)
    assert all(scorer.cache.get(r.arch_hash, scorer.fingerprint, scorer.target).ok for r in front)
