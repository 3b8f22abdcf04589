"""Where a campaign computes accuracy (``--eval-device``) and on what (``--val-subset``).

The device is checked before anything is written, changes nothing in the scores and may change when
a campaign is resumed; a validation subset changes the scores, so a campaign keeps the one it
started with. On a machine without CUDA the CUDA refusals are checked; with CUDA, a device check.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from mlflow import MlflowClient

from nas.cli import main
from nas.errors import UserError
from nas.hardware.target import Target
from nas.search.campaign import run_campaign
from nas.search.scoring import resolve_eval_device
from nas.training.devices import resolve_device

CUDA = torch.cuda.is_available()
without_cuda = pytest.mark.skipif(CUDA, reason="the refusal of CUDA on a machine that has none")


def test_resolve_device_reads_auto_cpu_cuda_and_refuses_anything_else():
    assert resolve_device("auto") == (torch.device("cuda", 0) if CUDA else torch.device("cpu"))
    assert resolve_device(" cpu ") == torch.device("cpu")
    for bad in ("gpu", "cuda:x", "cuda:-1", "cuda:", "cpu:0", "CUDA", ""):
        with pytest.raises(UserError, match=r"^--device '.*': expected auto, cpu, cuda or cuda:N$"):
            resolve_device(bad)
    with pytest.raises(UserError, match=r"^--eval-device 'gpu': expected"):
        resolve_device("gpu", flag="--eval-device")
    with pytest.raises(UserError, match=r"^--device cuda:99: (CUDA is not available|no GPU 99 here)"):
        resolve_device("cuda:99")


@without_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_cuda_where_there_is_none_is_refused_saying_what_to_use(spec):
    with pytest.raises(UserError) as err:
        resolve_device(spec, flag="--eval-device")
    assert str(err.value).startswith(f"--eval-device {spec}: CUDA is not available on this machine (torch ")
    assert str(err.value).endswith("; use --eval-device cpu")


def test_auto_eval_device_is_the_targets_device():
    assert resolve_eval_device("auto", Target.parse("cpu:threads=1")) == torch.device("cpu")
    assert resolve_eval_device("cpu", Target.parse("cpu:threads=1")) == torch.device("cpu")
    if CUDA:
        assert resolve_eval_device("auto", Target.parse("cuda")) == torch.device("cuda", 0)
    else:  # the target's own refusal: the eval device would not be the problem
        with pytest.raises(UserError, match="needs CUDA, which is not available"):
            resolve_eval_device("auto", Target.parse("cuda"))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        pytest.param(
            ["--eval-device", "cuda"],
            "--eval-device cuda: CUDA is not available on this machine (torch ",
            marks=without_cuda,
        ),
        (["--eval-device", "gpu"], "--eval-device 'gpu': expected auto, cpu, cuda or cuda:N"),
        (["--val-subset", "0"], "--val-subset 0: must be at least 1"),
    ],
)
def test_a_bad_eval_device_or_subset_is_one_line_and_writes_nothing(tiny, tmp_path, capsys, flags, message):
    workspace = tmp_path / "ws"
    argv = ["search", "--space", tiny.space.source, "--supernet", str(tiny.checkpoint), "--target", tiny.target,
            "--trials", "2", "--campaign", "c", "--workspace", str(workspace), "--quiet"]  # fmt: skip
    assert main([*argv, *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"vitnas: error: {message}"), err
    assert not workspace.exists()  # no study, no MLflow run, no latency cache


def _accuracies(records) -> list[tuple[str, float]]:
    return [(r.arch_hash, r.metrics["val_accuracy"]) for r in sorted(records.runs, key=lambda r: r.trial_number)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="GPU"))])
def test_an_eval_device_scores_as_the_default_and_may_change_on_resume(
    tiny, tmp_path, sqlite_tracking_uri, capsys, device
):
    default = tiny.config(tmp_path, "default", 3, tracking_uri=sqlite_tracking_uri)
    run_campaign(default, tiny.space, tiny.scorer(default), progress=False)
    chosen = tiny.config(tmp_path, "chosen", 3, tracking_uri=sqlite_tracking_uri, eval_device=device)
    assert main(tiny.search_argv(chosen)) == 0

    expected, got = _accuracies(tiny.check(default)), _accuracies(tiny.check(chosen))
    assert [h for h, _ in got] == [h for h, _ in expected]  # one seed: the same candidates
    if device == "cpu":
        assert got == expected
    else:  # other kernels (TF32 convolutions): an untrained net's near ties may fall the other way
        assert all(abs(a - b) <= 0.03 for (_, a), (_, b) in zip(got, expected))
    records = tiny.check(chosen)
    resolved = str(resolve_device(device))
    assert records.parent.data.tags["eval_device"] == resolved
    assert {r.tags["eval_device"] for r in records.runs} == {resolved}
    assert tiny.check(default).parent.data.tags["eval_device"] == "cpu"  # auto: the CPU target's device

    capsys.readouterr()  # resumed on the default device: allowed, and recorded as where it ran last
    assert main(tiny.search_argv(replace(chosen, eval_device="auto", trials=4))) == 0
    assert "4 finished, 0 failed, 1 run now" in capsys.readouterr().out
    parent = MlflowClient(sqlite_tracking_uri).get_run(records.parent.info.run_id)
    assert parent.data.tags["eval_device"] == "cpu"


def test_a_val_subset_scores_on_the_subset_and_binds_the_campaign(tiny, tmp_path, sqlite_tracking_uri, capsys):
    config = tiny.config(tmp_path, "subset", 2, tracking_uri=sqlite_tracking_uri, val_subset=40)
    scorer = tiny.scorer(config)
    labels = torch.tensor([int(y) for _, y in scorer.val_data])
    assert len(labels) == 40
    counts = torch.bincount(labels, minlength=10)
    assert counts.max() - counts.min() <= 1  # class-balanced
    assert torch.equal(labels, torch.tensor([int(y) for _, y in tiny.scorer(config).val_data]))  # seeded
    run_campaign(config, tiny.space, scorer, progress=False)
    before = tiny.check(config)
    assert before.parent.data.params["val_subset"] == "40"
    counted = [r.metrics["val_accuracy"] * 40 for r in before.runs]
    assert all(abs(n - round(n)) < 1e-6 for n in counted)  # counted on 40 images

    for other, reason in ((50, "val_subset was 40, now 50"), (None, "val_subset was 40, now None")):
        capsys.readouterr()
        assert main(tiny.search_argv(replace(config, val_subset=other, trials=3))) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("vitnas: error: campaign 'subset' exists"), err
        assert reason in err
    after = tiny.check(config)  # nothing was added or changed
    assert [t.number for t in after.trials] == [t.number for t in before.trials]
    assert after.parent.data.params == before.parent.data.params
