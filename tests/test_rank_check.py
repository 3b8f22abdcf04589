"""vitnas rank-check: the statistics against hand-worked and scipy values, the folds, and a whole check
on a tiny space (numbers, intervals, resume, the sidecar and MLflow)."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats as scipy_stats
from tiny_spaces import TWO_STAGES

from nas.cli import main
from nas.ranking import folds, stats

TINY = {**TWO_STAGES, "name": "tiny-rank"}


# -- the statistics ---------------------------------------------------------------------------------
def test_bootstrap_of_three_pairs_matches_the_hand_worked_distribution():
    """Inherited (1, 2, 3), stand-alone (1, 3, 2): tau = (2 concordant - 1 discordant) / 3 = 1/3.

    Of the 27 ordered resamples, 3 repeat one pair (tau undefined, left out); 18 hold two distinct
    pairs, 6 for each of {a,b} (concordant: 1), {a,c} (concordant: 1), {b,c} (discordant: -1); 6 are
    permutations of all three (1/3). So 12 of 24 at 1, 6 at 1/3, 6 at -1: mean 1/3, and the 5th and
    95th percentiles are -1 and 1. Top-1 hit: the stand-alone best b is the inherited best unless c is
    drawn too; resamples holding both b and c: 27 - 8 - 8 + 1 = 12, so hits in 15 of 27 = 5/9.
    """
    x, y = [1, 2, 3], [1, 3, 2]
    assert stats.kendall_tau(x, y) == pytest.approx(1 / 3)
    exact = stats.bootstrap_pairs(x, y, stats.kendall_tau, stats.all_resamples(3))
    defined = exact[~np.isnan(exact)]
    assert np.isnan(exact).sum() == 3
    counts = {
        Fraction(v).limit_denominator(10): int(c) for v, c in zip(*np.unique(defined, return_counts=True))
    }
    assert counts == {Fraction(-1): 6, Fraction(1, 3): 6, Fraction(1): 12}
    lo, hi, undefined = stats.percentile_interval(exact, 0.90)
    assert (lo, hi, undefined) == (-1.0, 1.0, 3)
    hits = stats.bootstrap_pairs(x, y, lambda a, b: stats.top_k_hit(a, b, 1), stats.all_resamples(3))
    assert hits.sum() == 15 and stats.top_k_hit(x, y, 1) == 0.0
    # a Monte Carlo bootstrap approaches the exact distribution
    rng = np.random.default_rng(0)
    mc = stats.bootstrap_pairs(x, y, stats.kendall_tau, rng.integers(0, 3, size=(20000, 3)))
    assert np.nanmean(mc) == pytest.approx(1 / 3, abs=0.02)
    assert np.mean(mc == 1.0) == pytest.approx(12 / 27, abs=0.015)


def test_tau_and_rho_agree_with_scipy_with_ties_and_in_rows():
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 5, size=(30, 12)), rng.integers(0, 5, size=(30, 12))
    tau, rho = stats.kendall_tau(x, y), stats.spearman_rho(x, y)
    for i in range(30):
        assert tau[i] == pytest.approx(scipy_stats.kendalltau(x[i], y[i]).statistic)
        assert rho[i] == pytest.approx(scipy_stats.spearmanr(x[i], y[i]).statistic)
    assert np.isnan(stats.kendall_tau([1, 1, 1], [1, 2, 3]))


def test_top_k_overlap_and_hit_with_ties_to_the_earlier_subnet():
    inherited, standalone = [0.9, 0.8, 0.8, 0.1], [0.5, 0.9, 0.6, 0.7]
    assert stats.top_k_overlap(inherited, standalone, 2) == 0.5  # {0, 1} vs {1, 3}
    assert stats.top_k_hit(inherited, standalone, 2) == 1.0  # best stand-alone (1) is 2nd inherited
    assert stats.top_k_hit(inherited, standalone, 1) == 0.0
    assert stats.top_k_overlap(inherited, standalone, 10) == 1.0  # k above n: all of them


def test_agreement_of_a_perfect_ranking_and_its_intervals():
    acc = np.linspace(0.5, 0.95, 8)
    rng = np.random.default_rng(2)
    inherited = (rng.random((8, 400)) < acc[:, None]).astype(np.uint8)
    runs = [[(rng.random(300) < a).astype(np.uint8) for _ in range(2)] for a in acc]
    result = stats.agreement(stats.Measurements(inherited, runs), k=3, replicates=500)
    for name in ("kendall_tau", "spearman_rho", "top_k_overlap"):
        interval = result[name]
        assert interval.lo <= interval.value <= interval.hi and interval.replicates > 0
    assert result["kendall_tau"].value > 0.7 and result["kendall_tau"].lo > 0.3


# -- folds ------------------------------------------------------------------------------------------
def test_cv_folds_cover_train_and_val_only_stratified_and_fixed():
    from nas.data import load_splits

    splits = load_splits("digits", 8)
    holdout = folds.resolve("auto", 5, splits)
    assert holdout.kind == "cv"
    labels = folds.pool(splits)[1].tolist()
    parts = folds.fold_indices(labels, 5, splits.spec.seed)
    assert sorted(i for p in parts for i in p) == list(range(len(splits.train) + len(splits.val)))
    assert all(abs(len(p) - len(labels) / 5) <= 10 for p in parts)
    assert parts == folds.fold_indices(labels, 5, splits.spec.seed)
    train, test = folds.run_data(splits, holdout, 1)
    assert len(train) + len(test) == len(labels) and len(test) == len(parts[1])
    assert holdout.fold(7) == 2 and folds.Holdout("val").fold(3) is None


# -- a whole check on a tiny space -------------------------------------------------------------------
@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    import torch

    from nas.ranking.check import RankCheckConfig, rank_check
    from nas.space import space_from_dict
    from nas.supernet import TrainConfig, train_supernet

    torch.set_num_threads(1)
    ws = tmp_path_factory.mktemp("rank")
    trained = train_supernet(
        space_from_dict(TINY), "digits", ws, TrainConfig(epochs=1), progress=False, log=lambda *_: None
    )
    config = RankCheckConfig(subnets=4, epochs=1, seeds=2, workers=1, replicates=300, pool=12)
    result = rank_check(trained.path, config, progress=False, log=lambda *_: None)
    return ws, trained.path.parent, config, result


def test_rank_check_computes_the_numbers_with_intervals_around_them(checked):
    _, _, _, result = checked
    ranking = result.ranking
    assert result.trained_now == 8 and result.reused == 0 and ranking["subnets_compared"] == 4
    for interval in (ranking["kendall_tau"], ranking["spearman_rho"], ranking["top_k"]["overlap"]):
        assert np.isfinite(interval["value"])
        assert interval["lo"] <= interval["value"] <= interval["hi"]
    assert ranking["standalone"]["images_per_subnet"] > ranking["inherited"]["images"]  # 2 folds > val
    for subnet in ranking["subnets"]:
        assert len(subnet["standalone_runs"]) == 2
        assert subnet["standalone_acc"] == pytest.approx(np.mean(subnet["standalone_runs"]))
    tau = ranking["kendall_tau"]
    assert (
        ranking["summary"]
        == f"ranking trust tau {tau['value']:.2f} [{tau['lo']:.2f}, {tau['hi']:.2f}], 4 subnets"
    )


def test_inherited_accuracy_is_what_search_scores(checked):
    from nas.arch import arch_from_dict
    from nas.supernet import evaluate

    _, folder, _, result = checked
    first = result.ranking["subnets"][0]
    assert evaluate(folder, arch_from_dict(first["arch"])).accuracy == pytest.approx(first["inherited_acc"])


def test_sidecar_and_mlflow_carry_the_result(checked):
    from mlflow import MlflowClient

    from nas.ranking import record
    from nas.tracking import default_tracking_uri

    ws, folder, _, result = checked
    meta = json.loads((folder / "supernet.json").read_text())
    assert meta["ranking"]["summary"] == result.ranking["summary"]
    assert meta["ranking"]["weights_hash"] == meta["weights_hash"]
    uri = default_tracking_uri(ws)
    run = MlflowClient(uri).get_run(result.run_id)
    assert (
        run.data.tags["vitnas.role"] == "rank-check"
        and run.data.tags["supernet_hash"] == meta["weights_hash"]
    )
    assert run.data.metrics["ranking_kendall_tau"] == pytest.approx(result.ranking["kendall_tau"]["value"])
    found = record.find(uri, meta["weights_hash"])  # no folder: read from MLflow
    assert found["summary"] == result.ranking["summary"] and found["run_id"] == result.run_id
    assert record.find(uri, "0" * 16) is None
    assert "not measured" in record.trust_line(None)


def test_a_second_check_skips_finished_runs_and_trains_only_missing_ones(checked, capsys):
    from nas.ranking.check import rank_check

    ws, folder, config, result = checked
    cached = sorted((ws / "rank-check" / "standalone").glob("*.json"))
    assert len(cached) == 8
    cached[0].unlink()  # as if interrupted before this run finished
    again = rank_check(folder, config, progress=False, log=lambda *_: None)
    assert (again.trained_now, again.reused) == (1, 7)
    assert again.ranking["kendall_tau"] == result.ranking["kendall_tau"]
    code = main(["rank-check", "--supernet", str(folder), "--subnets", "4", "--epochs", "1", "--workers", "1",
                 "--pool", "12", "--quiet"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "0 stand-alone run(s) trained now, 8 reused" in out and "ranking trust tau" in out


def test_rank_check_failures_are_one_line(tmp_path, capsys):
    assert main(["rank-check", "--supernet", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitnas: error: ") and "no supernet checkpoint" in err and "\n" not in err
    assert main(["rank-check", "--supernet", str(tmp_path), "--subnets", "2"]) == 2
    assert "--subnets" in capsys.readouterr().err


def test_pareto_and_the_dashboard_show_the_trust_of_the_campaigns_supernet(checked, capsys):
    from nas.dashboards import payloads
    from nas.dashboards.data import Store

    from nas.tracking import Campaign, default_tracking_uri

    ws, folder, _, result = checked
    uri = default_tracking_uri(ws)
    digest = result.ranking["weights_hash"]
    for name, tags in (("trusted", {"supernet_hash": digest}), ("unmeasured", {"supernet_hash": "f" * 16})):
        campaign = Campaign(uri, name)
        campaign.start_or_resume(params={"supernet": "elsewhere"}, tags=tags)
        campaign.end()
    assert main(["pareto", "--campaign", "trusted", "--workspace", str(ws)]) == 0
    assert result.ranking["summary"] in capsys.readouterr().out
    assert main(["pareto", "--campaign", "unmeasured", "--workspace", str(ws)]) == 0
    assert "ranking trust: not measured" in capsys.readouterr().out
    store = Store(uri)
    shown = {
        i.name: payloads.campaign_points(i, store.trials(i), store.ranking(i)) for i in store.campaigns()
    }
    assert (
        shown["trusted"]["ranking"]["summary"] == result.ranking["summary"] and shown["trusted"]["supernet"]
    )
    assert shown["unmeasured"]["ranking"] is None


@pytest.mark.slow
def test_few_shot_sub_supernets_score_each_subnet_by_its_own_kind(checked, tmp_path):
    """A few-shot split: forks of the checkpoint, one per stage-0 attention kind, trained on; the
    stand-alone runs all come from the cache (they do not depend on the supernet)."""
    from nas.ranking.check import rank_check
    from nas.space import space_from_dict
    from nas.supernet import TrainConfig, train_supernet
    from nas.supernet.checkpoint import checkpoint_dir, fork_checkpoint

    ws, folder, config, _ = checked
    space = space_from_dict(TINY)
    subs = []
    for kind in ("softmax", "linear"):
        sub = checkpoint_dir(tmp_path / kind, space)
        fork_checkpoint(folder, sub, pin=f"s0.attention={kind}")
        pinned = TrainConfig(epochs=2, pin=f"s0.attention={kind}")
        train_supernet(
            space, "digits", tmp_path / kind, pinned, resume=True, progress=False, log=lambda *_: None
        )
        subs.append(sub)
    with pytest.raises(ValueError, match="supernet-only"):
        fork_checkpoint(folder, tmp_path / "bad", lr=0.1)
    result = rank_check(subs, config, workspace=ws, progress=False, log=lambda *_: None)
    assert (result.trained_now, result.reused) == (0, 8)
    assert len(result.sidecars) == 2 and np.isfinite(result.ranking["kendall_tau"]["value"])


def test_search_summary_quotes_the_trust_of_the_supernet_it_searched(checked, tmp_path, capsys):
    import yaml

    ws, folder, _, result = checked
    space_file = tmp_path / "tiny-rank.yaml"
    space_file.write_text(yaml.safe_dump(TINY))
    code = main(["search", "--space", str(space_file), "--supernet", str(folder), "--trials", "2",
                 "--campaign", "trust-summary", "--workspace", str(ws), "--target", "cpu:threads=1,batch=1",
                 "--measure-budget-s", "0.2", "--quiet"])  # fmt: skip
    assert code == 0 and result.ranking["summary"] in capsys.readouterr().out
