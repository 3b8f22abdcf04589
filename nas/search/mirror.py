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
RUNNING is failed on resume with its run (``nas.search.campaign``).

Alone on a study (sqlite), the writer creates each trial's row, and trial numbers agree because
the campaign is the study's only writer; the writer checks that they do. Sharing a study with
other workers (``nas.search.workers``), the campaign has claimed the row before scoring (so its
number is the study's) and the writer fills it in; the mirror then also ``learn``s the trials the
other workers finished, so that its sampler sees them. Everything goes through Optuna's public
storage API.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from functools import partial

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from nas.arch import ArchConfig, TimmArch
from nas.errors import UserError
from nas.names import FAILURE
from nas.search.background_writer import BackgroundWriter, Gated
from nas.search.storage import reopened
from nas.tracking import Campaign

RUN_ID = "mlflow_run_id"
#: On a failed trial: it was stopped (Ctrl-C, a killed or lost worker), not a failure of its candidate.
INTERRUPTED = "vitnas.interrupted"
#: How a trial's MLflow run ends: (metrics, "FINISHED" | "FAILED", tags).
RunOutcome = tuple[dict, str, dict]
#: In the writer process: MLflow's client fails fast and ``nas.retry`` waits for the server instead
#: (MLflow's own back-off grows to minutes; a hung server would hold the writer for 2 minutes).
_WRITER_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def counts_toward_budget(trial: FrozenTrial) -> bool:
    """Completed, or failed on its own: interrupted trials (Ctrl-C, a dead worker) run again."""
    return trial.state == TrialState.COMPLETE or (
        trial.state == TrialState.FAIL and not trial.user_attrs.get(INTERRUPTED)
    )


def fail_interrupted_run(tracker: Campaign, number: int, run_id: str | None) -> None:
    """The MLflow run of an interrupted trial (``run_id``, or found by its number) failed too; none
    to fail when its process died before creating it."""
    if run_id is None:
        try:
            run_id = tracker.trial_run_id(number)
        except UserError:
            return
    tracker.finish_trial(run_id, {}, "FAILED", {FAILURE: "interrupted"})


def fill_claimed_row(storage: optuna.storages.BaseStorage, row: int, template: FrozenTrial) -> None:
    """The parameters and attributes of ``template`` into the RUNNING row claimed for it (the claim
    wrote the architecture hash and a heartbeat; a value written again changes nothing, so a try
    interrupted half-way is simply made again)."""
    for name, value in template.params.items():
        distribution = template.distributions[name]
        storage.set_trial_param(row, name, distribution.to_internal_repr(value), distribution)
    for key, value in template.user_attrs.items():
        storage.set_trial_user_attr(row, key, value)
    for key, value in template.system_attrs.items():
        storage.set_trial_system_attr(row, key, value)


class StudyMirror:
    """The study's trials in memory for asking and telling; ``writer`` brings the stores along."""

    def __init__(
        self,
        study: optuna.Study,
        writer: BackgroundWriter,
        sampler: optuna.samplers.BaseSampler | None = None,
    ):
        self.writer = writer
        self.working = optuna.create_study(directions=study.directions, sampler=sampler or study.sampler)
        self._known: set[int] = set()  # storage trial ids of the trials in ``working``
        self.learn(study.get_trials(deepcopy=False))

    @classmethod
    def start(
        cls,
        study: optuna.Study,
        storage: optuna.storages.RDBStorage,
        tracker: Campaign,
        run_tags: dict,
        sampler: optuna.samplers.BaseSampler | None = None,
        lag: int | None = None,
    ) -> StudyMirror:
        """The mirror of ``study`` (held in ``storage``) with its writer process started; every
        trial's child run of ``tracker``'s campaign gets ``run_tags``. ``sampler``: the one to ask
        (default: the study's); ``lag``: see ``BackgroundWriter``."""
        settings = StoreSettings(
            storage, study.study_name, tracker.tracking_uri, tracker.name, tracker.parent_run_id, run_tags
        )
        return cls(study, BackgroundWriter(partial(TrialStores, settings), lag=lag, gate_calls=True), sampler)

    def learn(self, trials: list[FrozenTrial]) -> None:
        """Add the finished trials of the storage that the working study does not hold yet (other
        workers'); a RUNNING one is added once it has finished."""
        new = [t for t in trials if t.state.is_finished() and t._trial_id not in self._known]
        self.working.add_trials(new)
        self._known.update(t._trial_id for t in new)

    def _snapshot(self, trial: optuna.Trial) -> FrozenTrial:
        return copy.deepcopy(self.working._storage.get_trial(trial._trial_id))

    def open(self, trial: optuna.Trial, arch: ArchConfig | TimmArch, row: int | None = None) -> None:
        """Queue the trial's RUNNING records, as asked so far (parameters and attributes): into the
        storage row ``row`` claimed for it, or a new row."""
        if row is not None:
            self._known.add(row)
        self.writer.submit("open_trial", self._snapshot(trial), arch, row)

    def close(self, trial: optuna.Trial, outcome: RunOutcome) -> None:
        """Queue the end of a told trial: its MLflow run ends with ``outcome``, then the storage
        gets its new attributes, state and values."""
        final = self._snapshot(trial)
        if not final.state.is_finished():
            raise ValueError(f"trial {final.number} is {final.state.name}: tell it before closing it")
        self.writer.submit("close_trial", final, outcome)

    def discard(self, trial: optuna.Trial) -> None:
        """Drop an asked trial that will not run (its architecture is running elsewhere, or the
        budget is spent): failed in memory only, never written."""
        self.working.tell(trial, state=TrialState.FAIL)

    def fail_run(self, number: int, run_id: str | None) -> None:
        """Queue: the MLflow run of trial ``number`` (``run_id``, or found by number) failed as
        interrupted; its Optuna trial was failed already."""
        self.writer.submit("fail_run", number, run_id)


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
    """The writer process's side: trials into the study's storage and the campaign's MLflow runs.

    Each method may be called again after a store went away half-way (``nas.retry``): what it
    already wrote is found again, not written twice.
    """

    def __init__(self, settings: StoreSettings, gate):
        """``gate``: held by each store call (``BackgroundWriter``'s ``gate_calls``)."""
        os.environ.update(_WRITER_HTTP)
        storage = reopened(settings.storage)  # (made while the writer holds the gate already)
        self.study_id = storage.get_study_id_from_name(settings.study_name)
        self.tracker = Campaign(settings.tracking_uri, settings.campaign, after_fork=True)
        self.storage = Gated(storage, gate)
        self.tracker.client = Gated(self.tracker.client, gate)
        self.tracker.parent_run_id = settings.parent_run_id
        self.run_tags = settings.run_tags
        self._rows: dict[int, int] = {}  # working number: storage trial id, once the row exists
        self._lost: set[int] = set()  # working numbers whose claimed row another worker failed first
        # working number: (trial id, run id, the trial as opened)
        self._open: dict[int, tuple[int, str, FrozenTrial]] = {}

    def open_trial(self, template: FrozenTrial, arch: ArchConfig | TimmArch, row: int | None = None) -> None:
        again = template.number in self._rows  # an earlier try got this far: its row (and run) exist
        if row is not None:
            try:
                self._open_claimed(template, arch, row, again)
            except UpdateFinishedTrialError:  # taken for dead by another worker, failed as interrupted
                self._lost.add(template.number)
            return
        if not again:
            row = self.storage.create_new_trial(self.study_id, template)
        else:
            row = self._rows[template.number]
        self._rows[template.number] = row
        number = self.storage.get_trial_number_from_id(row)
        if template.number != number:
            raise UserError(
                f"trial {template.number} was stored as number {number}: another process is running "
                "this campaign; run one at a time"
            )
        run_id = self.tracker.trial_run(number, arch, tags=self.run_tags, new=not again)
        self.storage.set_trial_user_attr(row, RUN_ID, run_id)
        self._open[template.number] = (row, run_id, template)

    def _open_claimed(
        self, template: FrozenTrial, arch: ArchConfig | TimmArch, row: int, again: bool
    ) -> None:
        """A row the campaign claimed: filled in, then its run; a run created for a row that another
        worker failed meanwhile is failed too."""
        fill_claimed_row(self.storage, row, template)
        self._rows[template.number] = row
        number = self.storage.get_trial_number_from_id(row)
        run_id = self.tracker.trial_run(number, arch, tags=self.run_tags, new=not again)
        try:
            self.storage.set_trial_user_attr(row, RUN_ID, run_id)
        except UpdateFinishedTrialError:
            self.fail_run(number, run_id)
            raise
        self._open[template.number] = (row, run_id, template)

    def close_trial(self, final: FrozenTrial, outcome: RunOutcome) -> None:
        if final.number in self._lost:  # its row was failed before it was opened: nothing to write
            self._lost.discard(final.number)
            return
        row, run_id, opened = self._open[final.number]
        self.tracker.finish_trial(run_id, *outcome)
        try:
            for key, value in final.user_attrs.items():
                if key not in opened.user_attrs or opened.user_attrs[key] != value:
                    self.storage.set_trial_user_attr(row, key, value)
            for key, value in final.system_attrs.items():
                if key not in opened.system_attrs or opened.system_attrs[key] != value:
                    self.storage.set_trial_system_attr(row, key, value)
            values = final.values if final.state == TrialState.COMPLETE else None
            self.storage.set_trial_state_values(row, final.state, values)
        except UpdateFinishedTrialError:
            self._finished_meanwhile(row, run_id, final)
        del self._open[final.number]

    def _finished_meanwhile(self, row: int, run_id: str, final: FrozenTrial) -> None:
        """The row was finished before this close wrote it: by this close's earlier try (a store
        went away after the write), or by another worker that took this one for dead (its
        heartbeat late by the whole grace period) and failed it as interrupted: then the run says so too."""
        stored = self.storage.get_trial(row)
        if stored.state == final.state and not stored.user_attrs.get(INTERRUPTED):
            return
        self.fail_run(stored.number, run_id)

    def fail_run(self, number: int, run_id: str | None) -> None:
        fail_interrupted_run(self.tracker, number, run_id)
