"""The search's progress note says what it knows, never ``nan``."""

from __future__ import annotations

import optuna

from nas.search.campaign import _progress_note


def _study(values: list[tuple[float, float]]) -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"])
    for acc, ms in values:
        study.add_trial(optuna.trial.create_trial(values=[acc, ms]))
    return study


def test_no_trial_under_the_budget_yet_is_said_so():
    assert _progress_note(_study([(0.9, 5.0), (0.8, 3.0)]), 1.0) == "front=2 best_acc<=1ms=none yet"


def test_best_accuracy_under_the_budget():
    study = _study([(0.9, 5.0), (0.8, 0.9), (0.7, 0.5)])
    assert _progress_note(study, 1.0) == "front=3 best_acc<=1ms=0.800"
    assert _progress_note(study, None) == "front=3 best_acc=0.900"
    assert _progress_note(_study([]), 1.0) == ""
