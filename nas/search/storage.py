"""The Optuna storage of a campaign: opening it, and writing a running trial in one go."""

from __future__ import annotations

import json
import pickle

import optuna
from optuna.distributions import distribution_to_json
from optuna.trial import FrozenTrial, TrialState

from nas.internals import optuna_rdb
from nas.sqlite_tuning import tune_sqlite


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The Optuna storage at ``url`` (any SQLAlchemy URL); a sqlite file gets ``tune_sqlite``'s
    settings: Optuna commits every suggested parameter on its own, and with each commit waiting
    for the disk ~0.7 s of a psvit-digits trial went there, ~0.06 s with them."""
    storage = optuna.storages.RDBStorage(url)
    tune_sqlite(storage.engine)
    return storage


def reopened(storage: optuna.storages.RDBStorage) -> optuna.storages.RDBStorage:
    """The same storage on an engine of its own: what a forked process needs (the inherited pool
    holds its parent's connections). Optuna's storage pickles to its URL and settings; unpickled,
    it skips the schema checks of opening it anew (~0.02 s instead of ~0.4 s)."""
    copy = pickle.loads(pickle.dumps(storage))
    tune_sqlite(copy.engine)
    return copy


def create_running_trial(storage: optuna.storages.RDBStorage, study_id: int, template: FrozenTrial) -> tuple[int, int]:
    """Store ``template`` as a RUNNING trial with its parameters and attributes; ``(trial id, number)``.

    The same rows as ``storage.create_new_trial(study_id, template)``, written with one flush:
    Optuna's own path queries the trial and the study's earlier parameters once per parameter
    (~17 ms for a psvit-digits trial's 25 parameters, ~3 ms here). The earlier parameters'
    distributions need no check: the template comes from a study that holds every stored trial.
    Uses Optuna's table models (``nas.internals``; stable since Optuna 3); ``tests/search/test_mirror.py``
    checks the result against Optuna's own path.
    """
    models, scoped_session = optuna_rdb()
    with scoped_session(storage.scoped_session) as session:
        models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
        trial = models.TrialModel(
            study_id=study_id, number=None, state=TrialState.RUNNING, datetime_start=template.datetime_start
        )
        session.add(trial)
        session.flush()
        rows = [
            models.TrialParamModel(
                trial_id=trial.trial_id,
                param_name=name,
                param_value=template.distributions[name].to_internal_repr(value),
                distribution_json=distribution_to_json(template.distributions[name]),
            )
            for name, value in template.params.items()
        ]
        for model, attrs in (
            (models.TrialUserAttributeModel, template.user_attrs),
            (models.TrialSystemAttributeModel, template.system_attrs),
        ):
            rows += [model(trial_id=trial.trial_id, key=k, value_json=json.dumps(v)) for k, v in attrs.items()]
        session.add_all(rows)
        trial.number = trial.count_past_trials(session)
        return trial.trial_id, trial.number
