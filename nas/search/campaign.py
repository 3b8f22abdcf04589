"""A search campaign on one machine: an Optuna study, every trial tracked in MLflow.

One campaign = one Optuna study (same name) + one MLflow parent run. Running the same command
again resumes it: finished trials are kept, trials a killed process left RUNNING are marked
failed (in Optuna and in MLflow), and the loop runs only the trials still missing. The Pareto
front over all finished trials is recomputed and tagged at the end of every run.

The loop asks and tells an in-memory copy of the study; the study's storage and MLflow get every
trial from a background writer (``nas.search.mirror``), paused while latency is measured, so
store writes cost a trial almost nothing. Ctrl-C lets the writer finish before the campaign ends.
On a PostgreSQL study, several processes (machines) may run one campaign together: each claims its
trials in the study (``nas.search.workers``), and the budget holds for all of them.

With a latency predictor, a candidate is measured only when it may matter: predicted within
the budget and not clearly dominated by what is already measured. Before the front is
reported, any unmeasured candidate on it is measured, until the whole front is measured.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from nas.errors import UserError
from nas.names import ACCURACY, ARCH_HASH, FAILURE, FINGERPRINT, FROZEN_WEIGHTS, LATENCY, OBJECTIVES
from nas.pareto import pareto_front
from nas.retry import StoreOutage
from nas.search.lock import campaign_lock
from nas.search.mirror import INTERRUPTED, RUN_ID, RunOutcome, StudyMirror, counts_toward_budget
from nas.search.samplers import make_sampler
from nas.search.scoring import Score, Scorer, make_scorer
from nas.search.storage import is_shared, open_storage
from nas.search.workers import LAG, LocalBudget, SharedBudget, worker_seed
from nas.space import SearchSpace
from nas.tracking import Campaign

#: A candidate is skipped (not measured) when predicted this much over the budget ...
BUDGET_MARGIN = 0.10
#: ... or when a measured trial is at least this much more accurate and predicted faster by this margin.
DOMINANCE_MARGIN = (0.005, 0.10)


@dataclass(frozen=True)
class CampaignConfig:
    """Everything that defines a campaign; the same values resume it (but ``eval_device``, which
    changes where accuracy is computed, not what it is)."""

    name: str
    space: str
    target: str
    trials: int
    workspace: str
    supernet: str | None = None
    sampler: str = "nsga2"
    seed: int = 0
    latency_budget_ms: float | None = None
    storage: str | None = None
    tracking_uri: str | None = None
    cache_url: str | None = None
    predictor: str | None = None
    data: str | None = None
    measure_budget_s: float = 2.0
    weights: str | None = None  # timm spaces: the model's weights (default: the space's weights:)
    eval_device: str = "auto"  # where accuracy is computed: auto, cpu, cuda or cuda:N
    val_subset: int | None = None  # accuracy on this many validation images (seeded, class-balanced)
    heartbeat_s: float = 10.0  # a worker on a shared study shows it is alive this often

    def resolved(self) -> CampaignConfig:
        """Defaults filled in: study, MLflow and latency cache on sqlite files in the workspace."""
        ws = Path(self.workspace).resolve()
        ws.mkdir(parents=True, exist_ok=True)
        from nas.hardware.cache import default_url
        from nas.tracking import default_tracking_uri

        return CampaignConfig(
            **{
                **asdict(self),
                "workspace": str(ws),
                # absolute, so the record means the same file wherever it is read from
                "supernet": _absolute(self.supernet),
                "weights": _absolute(self.weights),
                "storage": self.storage or f"sqlite:///{ws / 'optuna.db'}",
                "tracking_uri": self.tracking_uri or default_tracking_uri(ws),
                "cache_url": self.cache_url or default_url(ws),
            }
        )


def _absolute(path: str | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


def scorer_for(config: CampaignConfig, space: SearchSpace) -> Scorer:
    """The scorer a (resolved) campaign config asks for."""
    return make_scorer(
        space,
        target=config.target,
        workspace=config.workspace,
        cache_url=config.cache_url,
        supernet=config.supernet,
        data=config.data,
        predictor=config.predictor,
        measure_budget_s=config.measure_budget_s,
        weights=config.weights,
        eval_device=config.eval_device,
        val_subset=config.val_subset,
    )


@dataclass
class CampaignResult:
    name: str
    parent_run_id: str
    finished: int
    failed: int
    ran_now: int
    front: list[dict]
    best_under_budget: dict | None
    tracking_uri: str


def run_campaign(
    config: CampaignConfig, space: SearchSpace, scorer: Scorer, progress: bool = True
) -> CampaignResult:
    """Run (or resume) the campaign until ``config.trials`` trials have finished.

    The campaign's lock (``nas.search.lock``) is taken before any store is opened, let alone
    created: a second process on the same campaign stops there, and the first goes on untouched.
    """
    config = config.resolved()
    with lock_for(config, shared=True):
        return _run_locked(config, space, scorer, progress)


def lock_for(config: CampaignConfig, shared: bool = False):
    """The lock of a (resolved) campaign: held by the one process that writes it (both backends), or,
    ``shared``, by every local worker of a campaign on PostgreSQL (which keeps a Ray driver out)."""
    return campaign_lock(config.name, config.storage, config.workspace, shared=shared)


def _run_locked(config: CampaignConfig, space: SearchSpace, scorer: Scorer, progress: bool) -> CampaignResult:
    shared = None
    if is_shared(config.storage):
        shared = SharedBudget(config.storage, config.name, config.trials, config.heartbeat_s)
    try:
        return _run_budgeted(config, space, scorer, progress, shared)
    finally:
        if shared is not None:
            shared.close()


def _run_budgeted(config, space, scorer, progress, shared: SharedBudget | None) -> CampaignResult:
    """The campaign alone on its study (``shared`` None), or as one worker of a shared one."""
    sampler = None
    with nullcontext() if shared is None else shared.section():  # workers starting together: one at a time
        storage = open_storage(config.storage)
        study = _open_study(config, space, scorer, storage)
        tracker = Campaign(config.tracking_uri, config.name)
        tracker.start_or_resume(
            params=_campaign_params(config, space, scorer), tags=_campaign_tags(config, space, scorer)
        )
        if shared is None:
            _fail_interrupted(study, tracker)
            slots = LocalBudget(_done(study), config.trials)
        else:
            ordinal = shared.join(study, storage, tracker)  # dead workers' trials: failed by its claims
            sampler = make_sampler(config.sampler, worker_seed(config.seed, ordinal), config.trials)
            slots = shared
    ran = 0
    bar = tqdm(
        total=config.trials,
        initial=min(slots.done, config.trials),
        desc=f"campaign {config.name}",
        unit="trial",
        disable=not progress,
        dynamic_ncols=True,
    )
    lag = None if shared is None else LAG
    mirror = StudyMirror.start(
        study, storage, tracker, run_tags=_identity_tags(scorer), sampler=sampler, lag=lag
    )
    writer = mirror.writer
    try:
        with slots.running():
            while _run_trial(mirror, space, scorer, config, slots):
                ran += 1
                bar.update(min(slots.done, config.trials) - bar.n)
                if progress:  # the note reads every finished trial: only for a bar someone sees
                    bar.set_postfix_str(_progress_note(mirror.working, config.latency_budget_ms))
        writer.drain()
        if shared is not None:
            shared.close_orphans(tracker)
    except StoreOutage:
        writer.abort()  # it waits for a store that stays away: what it holds runs again on resume
        raise
    except KeyboardInterrupt:
        bar.close()
        writer.drain()  # what was told is written
        if shared is None:  # Ctrl-C between a trial's writes can leave it RUNNING
            _fail_interrupted(study, tracker)
        else:
            shared.abandon(tracker)  # this worker's own trials only
        _finalise(study, space, scorer, tracker, config)
        tracker.end("KILLED")
        raise
    finally:
        bar.close()  # an error is then told on a line of its own, not glued to the bar
        writer.close()
    result = _finalise(study, space, scorer, tracker, config)
    tracker.end("FINISHED")
    result.ran_now = ran
    return result


# -- study -------------------------------------------------------------------------------------
def _open_study(
    config: CampaignConfig, space: SearchSpace, scorer: Scorer, storage: optuna.storages.RDBStorage
) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=storage,
        study_name=config.name,
        directions=["maximize", "minimize"],
        sampler=make_sampler(config.sampler, config.seed, config.trials),
        load_if_exists=True,
    )
    # the objectives' names, in the order of ``directions`` and of the values told, for optuna-dashboard
    # and trials_dataframe (not "Objective 0/1"); written once, a no-op on resume
    if study.metric_names != [ACCURACY, LATENCY]:
        with warnings.catch_warnings():  # experimental since Optuna 3.2: it warns on every call
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([ACCURACY, LATENCY])
    # what the trials' values depend on: a study's trials all agree on it (a validation subset
    # changes the accuracies; the eval device does not, so it may change on resume)
    identity = {
        "space": space.name,
        "target": scorer.target.key(),
        "space_hash": space.content_hash(),
        "val_subset": config.val_subset,
    }
    stored = {k: study.user_attrs.get(k) for k in identity}
    if all(v is None for v in stored.values()):
        for key, value in identity.items():
            study.set_user_attr(key, value)
    elif stored != identity:
        changed = ", ".join(
            f"{k} was {stored[k]!r}, now {identity[k]!r}" for k in identity if stored[k] != identity[k]
        )
        raise UserError(
            f"campaign {config.name!r} exists with other settings ({changed}): choose another --campaign name"
        )
    return study


def _fail_interrupted(study: optuna.Study, tracker: Campaign) -> None:
    """Trials a killed run left RUNNING: failed in Optuna (tagged interrupted) and in MLflow.

    A trial's MLflow run is failed too when it had already finished (stopped between the two
    writes), and first: stopped in between here, the trial is still RUNNING next time.
    """
    storage = study._storage
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if RUN_ID in trial.user_attrs:
            tracker.finish_trial(trial.user_attrs[RUN_ID], {}, "FAILED", {FAILURE: "interrupted"})
        storage.set_trial_user_attr(trial._trial_id, INTERRUPTED, True)
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    tracker.close_stale_trials(keep_running=set())


def _done(study: optuna.Study) -> int:
    """Trials that count towards the budget: completed, or failed on their own (not interrupted)."""
    return sum(map(counts_toward_budget, study.get_trials(deepcopy=False)))


# -- one trial -----------------------------------------------------------------------------------
def _run_trial(mirror: StudyMirror, space, scorer: Scorer, config: CampaignConfig, slots) -> bool:
    """The next trial: proposed, claimed (``nas.search.workers``), scored, told; False once the
    budget is done."""
    study = mirror.working
    found = slots.next_trial(mirror, lambda: _propose(study, space))
    if found is None:
        return False
    trial, arch, claim = found
    mirror.open(trial, arch, claim.row)
    try:
        policy = _measurement_policy(study, config)
        quiet = slots.quiet(mirror.writer)
        score, failure = evaluate(scorer, arch, should_measure=policy, while_measuring=quiet)
    except (KeyboardInterrupt, UserError) as err:
        if isinstance(err, KeyboardInterrupt):  # not the candidate's failure: resume runs another
            trial.set_user_attr(INTERRUPTED, True)
        study.tell(trial, state=TrialState.FAIL)
        mirror.close(
            trial, run_outcome(None, "interrupted" if isinstance(err, KeyboardInterrupt) else str(err))
        )
        raise
    if failure is None:
        annotate(trial, score.measured is not None, score.latency_ms, config.latency_budget_ms)
        study.tell(trial, [score.accuracy, score.latency_ms])
    else:
        study.tell(trial, state=TrialState.FAIL)
        tqdm.write(f"trial {trial.number if claim.number is None else claim.number} failed: {failure}")
    mirror.close(trial, run_outcome(score, failure))
    return True


def _propose(study: optuna.Study, space: SearchSpace):
    """A new trial of the in-memory study and its architecture."""
    trial = study.ask()
    arch = space.from_trial(trial)
    trial.set_user_attr(ARCH_HASH, arch.arch_hash())
    return trial, arch


def evaluate(
    scorer: Scorer, arch, should_measure=None, while_measuring=nullcontext
) -> tuple[Score | None, str | None]:
    """``(score, None)``, or ``(score or None, why it failed)``: one candidate's failure is recorded
    and the campaign goes on. Ctrl-C and user errors are not the candidate's: they propagate.
    Shared by the local and the Ray backends."""
    try:
        score = scorer.score(arch, should_measure=should_measure, while_measuring=while_measuring)
    except (KeyboardInterrupt, UserError):
        raise
    except Exception as err:
        return None, f"{type(err).__name__}: {err}"
    return score, None if score.ok else score.measured.error


def run_outcome(score: Score | None, failure: str | None) -> RunOutcome:
    """How a trial's child run ends: FINISHED with its metrics, or FAILED with why."""
    if failure is None:
        return score.metrics(), "FINISHED", _trial_tags(score)
    return ({} if score is None else score.metrics()), "FAILED", {FAILURE: failure[:500]}


def log_outcome(tracker: Campaign, run_id: str, score: Score | None, failure: str | None) -> None:
    """End a trial's child run (see ``run_outcome``)."""
    tracker.finish_trial(run_id, *run_outcome(score, failure))


def annotate(trial, measured: bool, latency_ms: float, budget_ms: float | None) -> None:
    """What a completed Optuna trial records besides its values: measured or not, the budget
    constraint. Shared by the local and the Ray backends."""
    trial.set_user_attr("measured", measured)
    if budget_ms is not None:
        trial.set_constraint("latency_budget_ms", latency_ms - budget_ms)


def _trial_tags(score: Score) -> dict[str, str]:
    return {"measured": str(score.measured is not None).lower(), "latency_cached": str(score.cached).lower()}


def _measurement_policy(study, config: CampaignConfig):
    """When a predictor is used: measure unless the candidate is clearly over the budget or
    clearly dominated by a measured trial (more accurate and faster, by the margins above)."""
    budget = config.latency_budget_ms
    acc_margin, lat_margin = DOMINANCE_MARGIN

    def should_measure(accuracy: float, predicted_ms: float | None) -> bool:
        if predicted_ms is None:
            return True
        if budget is not None and predicted_ms > budget * (1 + BUDGET_MARGIN):
            return False
        return not any(
            t.user_attrs.get("measured")
            and t.values[0] >= accuracy + acc_margin
            and t.values[1] * (1 + lat_margin) <= predicted_ms
            for t in _complete(study)
        )

    return should_measure


def _complete(study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _progress_note(study, budget: float | None) -> str:
    done = [t for t in _complete(study)]
    if not done:
        return ""
    front = pareto_front([t.values for t in done], ("max", "min"))
    ok = [t.values[0] for t in done if budget is None or t.values[1] <= budget]
    best = f"{max(ok):.3f}" if ok else "none yet"
    return f"front={len(front)} best_acc{'<=' + format(budget, 'g') + 'ms' if budget else ''}={best}"


# -- the end of a run ------------------------------------------------------------------------------
def _finalise(study, space, scorer: Scorer, tracker: Campaign, config: CampaignConfig) -> CampaignResult:
    """Measure any unmeasured candidate on the front, then tag the front and log its artifacts."""
    _measure_front(study, space, scorer, tracker)
    front = tracker.tag_pareto(budget_ms=config.latency_budget_ms)
    tracker.log_front_artifacts(budget_ms=config.latency_budget_ms)
    rows = tracker.trial_runs()
    best = next((r for r in rows if r.tags.get("best_under_budget") == "true"), None)
    trials = study.get_trials(deepcopy=False)
    return CampaignResult(
        name=config.name,
        parent_run_id=tracker.parent_run_id,
        finished=sum(t.state == TrialState.COMPLETE for t in trials),
        failed=sum(t.state == TrialState.FAIL for t in trials),
        ran_now=0,
        front=front,
        best_under_budget=None if best is None else best.as_row(),
        tracking_uri=config.tracking_uri,
    )


def _measure_front(study, space, scorer: Scorer, tracker: Campaign) -> None:
    """Until every trial on the (accuracy, latency) front was measured, measure those that were not.

    A measured latency replaces the prediction in MLflow (the Optuna trial keeps its values:
    finished trials are immutable there).
    """
    while True:
        rows = tracker.trial_runs()
        if not rows:
            return
        front = pareto_front(
            [tuple(r.metrics[name] for name, _ in OBJECTIVES) for r in rows], [d for _, d in OBJECTIVES]
        )
        unmeasured = [rows[i] for i in front if rows[i].tags.get("measured") != "true"]
        if not unmeasured:
            return
        for row in unmeasured:
            arch = space.from_params(study.trials[row.trial_number].params)
            score = scorer.score(arch)
            state = "FINISHED" if score.ok else "FAILED"
            tracker.finish_trial(row.run_id, score.metrics(), state, _trial_tags(score))


def _campaign_params(config: CampaignConfig, space: SearchSpace, scorer: Scorer) -> dict:
    return {
        "data": scorer.data_spec,
        "space": space.name,
        "space_file": space.source,
        "target": config.target,
        "trials": config.trials,
        "sampler": config.sampler,
        "seed": config.seed,
        "latency_budget_ms": config.latency_budget_ms,
        "supernet": config.supernet,
        "weights": config.weights,
        "predictor": config.predictor,
        "val_subset": config.val_subset,
    }


def _identity_tags(scorer: Scorer) -> dict[str, str]:
    """What a latency and an accuracy were taken on: target, machine fingerprint, the device accuracy
    was computed on, the weights (supernet checkpoint, or a timm model's weights file). Tags, not
    params: the eval device may change when a campaign is resumed."""
    tags = {
        "target": scorer.target.key(),
        FINGERPRINT: scorer.fingerprint.digest(),
        "eval_device": str(scorer.eval_device),
    }
    if scorer.weights_hash:
        tags[scorer.weights_tag] = scorer.weights_hash
    return tags


def _campaign_tags(config: CampaignConfig, space: SearchSpace, scorer: Scorer) -> dict:
    tags = {
        "space_hash": space.content_hash(),
        **_identity_tags(scorer),
        "sampler": config.sampler,
        "optuna_storage": config.storage,
    }
    if scorer.candidates.frozen is not None:
        tags[FROZEN_WEIGHTS] = str(scorer.candidates.frozen)  # the weights scored, as export reads them
    return tags
