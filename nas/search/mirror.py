"""A study asked and told in memory, its trials written to the real stores in the background.

The sampler reads, and every ``suggest`` writes, only an in-memory copy of the study
(microseconds). The study's own storage and the campaign's MLflow runs get each trial from a
``BackgroundWriter`` process (``TrialStores``), in an order that keeps them consistent whenever
the campaign dies:

1. ``open_trial``: the trial in the study's storage, RUNNING, with its parameters and attributes;
   then its MLflow child run; then the run's id on the trial (``mlflow_run_id``);
2. ``close_trial``: the child run ended (FINISHED or FAILED, with metrics or the reason); then
   the trial's new attributes, its state and values in the study's storage.

So a trial COMPLETE in the storage always has a FINISHED run, and a trial a dead process left
RUNNING is failed on resume with its run (``nas.search.campaign``). Trial numbers agree because
the campaign is the study's only writer while it runs; the writer checks that they do.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial

import optuna
from optuna.trial import FrozenTrial, TrialState

from nas.arch import ArchConfig, TimmArch
from nas.errors import UserError
from nas.search.background_writer import BackgroundWriter
from nas.search.storage import create_running_trial, reopened
from nas.tracking import Campaign

RUN_ID = "mlflow_run_id"
#: How a trial's MLflow run ends: (metrics, "FINISHED" | "FAILED", tags).
RunOutcome = tuple[dict, str, dict]


class StudyMirror:
    """The study's trials in memory for asking and telling; ``writer`` brings the stores along."""

    def __init__(self, study: optuna.Study, writer: BackgroundWriter):
        self.writer = writer
        self.working = optuna.create_study(directions=study.directions, sampler=study.sampler)
        self.working.add_trials(study.get_trials(deepcopy=False))

    @classmethod
    def start(
        cls, study: optuna.Study, storage: optuna.storages.RDBStorage, tracker: Campaign, run_tags: dict
    ) -> StudyMirror:
        """The mirror of ``study`` (held in ``storage``) with its writer process started; every
        trial's child run of ``tracker``'s campaign gets ``run_tags``."""
        settings = StoreSettings(
            storage, study.study_name, tracker.tracking_uri, tracker.name, tracker.parent_run_id, run_tags
        )
        return cls(study, BackgroundWriter(partial(TrialStores, settings)))

    def _snapshot(self, trial: optuna.Trial) -> FrozenTrial:
        return copy.deepcopy(self.working._storage.get_trial(trial._trial_id))

    def open(self, trial: optuna.Trial, arch: ArchConfig | TimmArch) -> None:
        """Queue the trial's RUNNING records, as asked so far (parameters and attributes)."""
        self.writer.submit("open_trial", self._snapshot(trial), arch)

    def close(self, trial: optuna.Trial, outcome: RunOutcome) -> None:
        """Queue the end of a told trial: its MLflow run ends with ``outcome``, then the storage
        gets its new attributes, state and values."""
        final = self._snapshot(trial)
        if not final.state.is_finished():
            raise ValueError(f"trial {final.number} is {final.state.name}: tell it before closing it")
        self.writer.submit("close_trial", final, outcome)


@dataclass(frozen=True)
class StoreSettings:
    """What the writer process opens (all picklable, for platforms that spawn it)."""

    storage: optuna.storages.RDBStorage
    study_name: str
    tracking_uri: str
    campaign: str
    parent_run_id: str
    run_tags: dict


class TrialStores:
    """The writer process's side: trials into the study's storage and the campaign's MLflow runs."""

    def __init__(self, settings: StoreSettings):
        self.storage = reopened(settings.storage)
        self.study_id = self.storage.get_study_id_from_name(settings.study_name)
        self.tracker = Campaign(settings.tracking_uri, settings.campaign, after_fork=True)
        self.tracker.parent_run_id = settings.parent_run_id
        self.run_tags = settings.run_tags
        self._open: dict[int, tuple[int, str, FrozenTrial]] = {}  # number: (trial id, run id, as opened)

    def open_trial(self, template: FrozenTrial, arch: ArchConfig | TimmArch) -> None:
        trial_id, stored = create_running_trial(self.storage, self.study_id, template)
        if stored != template.number:
            raise UserError(
                f"trial {template.number} was stored as number {stored}: another process is running "
                "this campaign; run one at a time"
            )
        run_id = self.tracker.trial_run(template.number, arch, tags=self.run_tags, new=True)
        self.storage.set_trial_user_attr(trial_id, RUN_ID, run_id)
        self._open[template.number] = (trial_id, run_id, template)

    def close_trial(self, final: FrozenTrial, outcome: RunOutcome) -> None:
        trial_id, run_id, opened = self._open.pop(final.number)
        self.tracker.finish_trial(run_id, *outcome)
        for key, value in final.user_attrs.items():
            if key not in opened.user_attrs or opened.user_attrs[key] != value:
                self.storage.set_trial_user_attr(trial_id, key, value)
        for key, value in final.system_attrs.items():
            if key not in opened.system_attrs or opened.system_attrs[key] != value:
                self.storage.set_trial_system_attr(trial_id, key, value)
        values = final.values if final.state == TrialState.COMPLETE else None
        self.storage.set_trial_state_values(trial_id, final.state, values)
