"""A search campaign on a Ray cluster: Ray Tune's ``Tuner`` with ``OptunaSearch``.

The same campaign as the local backend (``nas.search.campaign``): one Optuna study on the same
storage (same sampler, space, objectives and identity checks), one MLflow parent run, one child run
per trial, the Pareto front tagged at the end. What changes is where a trial runs: each is a Ray
Tune trial that asks for the target's threads and the target's Ray custom resource
(``--target-resource hw_xeon=1``), so its latency is measured only on a node of the target's kind,
and ``--gpus-per-trial`` GPUs, on which it then computes accuracy (unless ``--eval-device`` says
otherwise).

- The driver holds the study (through ``OptunaSearch``) and the parent run; workers log their
  child runs to the tracking server themselves and report the metrics back.
- The supernet checkpoint (or a timm space's ``--weights`` file) travels in the Ray object store
  (``tune.with_parameters``) and is written to a temporary folder on each worker node: no shared
  file system is needed for it.
- A lost worker's running trials are retried (``FailureConfig``); finished ones stay finished.
  Running the same command again after the driver died keeps the trials its workers finished
  and logged, fails those it left running (interrupted, not counted) and runs only what is
  missing, in a new Tune experiment ``WORKSPACE/ray/<campaign>.<n>`` over the same study.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from nas.errors import UserError
from nas.families import family_of
from nas.hardware.target import Target
from nas.names import ARCH_HASH, FINGERPRINT, LATENCY, OBJECTIVES
from nas.search.campaign import (
    CampaignConfig,
    CampaignResult,
    _campaign_params,
    _campaign_tags,
    _done,
    _fail_interrupted,
    _finalise,
    _identity_tags,
    _open_study,
    annotate,
    evaluate,
    lock_for,
    log_outcome,
    scorer_for,
)
from nas.search.mirror import RUN_ID
from nas.search.samplers import make_sampler
from nas.search.scoring import Scorer
from nas.search.storage import open_storage
from nas.space import SearchSpace
from nas.tracking import Campaign

NUMBER = "vitnas_trial_number"  # the Optuna trial number, passed to the trainable with the params
FAILED = "vitnas_failure"
#: Restores of a fit that ended with errored trials (each trial also has its own retries).
RESUME_ROUNDS = 2
#: Resources Ray itself defines: not a node's hardware kind.
_RAY_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory", "node:", "accelerator_type:")


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a campaign runs on Ray."""

    address: str | None = None  # None: a local Ray; "auto", "HOST:PORT" or "ray://HOST:PORT"
    max_concurrent: int = 1
    target_resource: dict[str, float] = field(default_factory=dict)
    #: retries of a trial whose worker died; until Ray marks a lost node dead, a retry may be sent
    #: there and fail at once, so leave room
    max_failures: int = 5
    gpus_per_trial: float = 0.0  # Ray's GPU resource for each trial (fractions share a GPU)

    def __post_init__(self) -> None:
        if not math.isfinite(self.gpus_per_trial) or self.gpus_per_trial < 0:
            raise UserError(
                f"--gpus-per-trial {self.gpus_per_trial:g}: expected a number >= 0 "
                "(e.g. 1, or 0.5 for two trials on one GPU)"
            )


def trial_resources(target: Target, options: RayOptions) -> dict[str, float]:
    """What each Ray Tune trial asks for: the target's threads as CPUs, the target's custom
    resource, and ``gpus_per_trial`` GPUs when there are any."""
    gpus = {"GPU": options.gpus_per_trial} if options.gpus_per_trial else {}
    return {"CPU": target.threads or 1, **options.target_resource, **gpus}


def trial_config(config: CampaignConfig, options: RayOptions) -> CampaignConfig:
    """The campaign as its trials run it: a trial given GPUs computes accuracy on its GPU, unless
    ``--eval-device`` names a device (Ray makes a trial's GPUs its ``cuda:0``, ``cuda:1``, ...)."""
    if options.gpus_per_trial and config.eval_device == "auto":
        return replace(config, eval_device="cuda")
    return config


def parse_resource(text: str) -> dict[str, float]:
    """``hw_xeon=1`` (or ``hw_xeon``, amount 1) as Ray's resource dict; ``UserError`` otherwise."""
    name, _, amount = text.partition("=")
    try:
        value = float(amount) if amount else 1.0
    except ValueError:
        value = -1.0
    if not name.strip() or value <= 0 or name.startswith(_RAY_RESOURCES):
        raise UserError(
            f"--target-resource {text!r}: expected NAME=AMOUNT with a custom Ray resource name and a "
            "positive amount, e.g. hw_xeon=1 (as the target nodes were started with --resources)"
        )
    return {name.strip(): value}


def run_ray_campaign(
    config: CampaignConfig, space: SearchSpace, scorer: Scorer, options: RayOptions, progress: bool = True
) -> CampaignResult:
    """Run (or resume) the campaign on Ray until ``config.trials`` trials have finished. The driver
    holds the campaign's lock, as the local backend does (workers only log their own child runs)."""
    config = config.resolved()
    if config.predictor:
        raise UserError("--predictor works with the local backend only: on Ray every candidate is measured")
    with lock_for(config):
        return _run_ray_locked(config, space, scorer, options, progress)


def _run_ray_locked(
    config: CampaignConfig, space: SearchSpace, scorer: Scorer, options: RayOptions, progress: bool
) -> CampaignResult:
    import ray
    from ray import tune

    study = _open_study(config, space, scorer, open_storage(config.storage))
    tracker = Campaign(config.tracking_uri, config.name)
    trials = trial_config(config, options)
    tags = {
        **_campaign_tags(config, space, scorer),
        "backend": "ray",
        "target_resource": _resource_tag(options),
        "gpus_per_trial": f"{options.gpus_per_trial:g}",
    }
    if trials.eval_device != config.eval_device:  # the trials' GPUs, not this driver's device
        tags["eval_device"] = trials.eval_device
    tracker.start_or_resume(params=_campaign_params(config, space, scorer), tags=tags)
    ray.init(address=options.address, ignore_reinit_error=True, log_to_driver=progress)
    job = _Job(trials, space, tracker.parent_run_id, _pack(scorer))
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, job=job), trial_resources(scorer.target, options)
    )
    _tell_unreported(study, _logged_reports(study, tracker), config.latency_budget_ms)
    _fail_interrupted(study, tracker)  # trials a dead driver left: failed as interrupted, not counted
    before = _done(study)
    experiment = _next_experiment(Path(config.workspace) / "ray", config.name)
    todo = config.trials - before
    tuner = None if todo <= 0 else _new_tuner(config, space, options, trainable, todo, experiment, progress)
    try:
        results = _fit(tuner, experiment, trainable, RESUME_ROUNDS)
    except KeyboardInterrupt:  # running the command again runs what is missing
        tracker.end("KILLED")
        raise
    _tell_unreported(study, _tune_reports(results), config.latency_budget_ms)
    _fail_interrupted(study, tracker)  # trials still errored: running the command again replaces them
    result = _finalise(study, space, scorer, tracker, config)
    tracker.end("FINISHED")
    result.ran_now = _done(study) - before
    return result


def _fit(tuner, experiment: Path, trainable, rounds: int) -> list:
    """Fit, then restore and resume errored trials, up to ``rounds`` times; the last fit's results.

    Tune retries a trial whose node was lost (``FailureConfig``), but when the lost actor reports
    its failure twice, the second report can end the trial, already requeued, as ERROR: those are
    resumed here. The searcher leaves an errored trial RUNNING in Optuna, so a resumed one is
    told its values like any other.
    """
    from ray import tune

    results: list = []
    for attempt in range(rounds + 1):
        if tuner is None:
            break
        grid = tuner.fit()
        results = list(grid)
        if not grid.errors or attempt == rounds:
            break
        tuner = tune.Tuner.restore(str(experiment), trainable, resume_errored=True)
    return results


def _tell_unreported(study: optuna.Study, reports: dict[int, dict], budget_ms: float | None) -> None:
    """Tell Optuna the trials it still has RUNNING for which a report exists elsewhere (by number)."""
    running = {t.number: t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    for number, report in reports.items():
        trial = running.get(number)
        if trial is not None:
            tell(study, optuna.Trial(study, trial._trial_id), report, budget_ms)


def _tune_reports(results: list) -> dict[int, dict]:
    """What each trial reported to Tune, by trial number (errored trials left out).

    A restored searcher only knows the trials it had suggested by its last checkpoint; a trial
    suggested after that and finished after the restore reached Tune but not the study.
    """
    return {
        int(r.metrics[NUMBER]): r.metrics for r in results if r.error is None and NUMBER in (r.metrics or {})
    }


def _logged_reports(study: optuna.Study, tracker: Campaign) -> dict[int, dict]:
    """Trials still RUNNING in the study whose child run FINISHED: the worker logged them, but the
    driver died before it told the study. Their results are kept, not failed."""
    reports = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        done = tracker.finished_trial(trial.number)
        if done is not None and done.arch_hash == trial.user_attrs.get(ARCH_HASH):
            reports[trial.number] = {RUN_ID: done.run_id, **done.metrics}
    return reports


def tell(study: optuna.Study, trial: optuna.Trial, result: dict | None, budget_ms: float | None) -> None:
    """Record a finished trial's report on its Optuna trial, as the local backend records it: the
    MLflow run, measured, the latency-budget constraint and the objectives; a candidate that failed
    on its own (or reported nothing) as FAIL."""
    if study._storage.get_trial(trial._trial_id).state.is_finished():
        return  # a resumed or retried trial reporting again: the first report stands
    result = result or {}
    if RUN_ID in result:
        trial.set_user_attr(RUN_ID, result[RUN_ID])
    values = [result.get(name) for name, _ in OBJECTIVES]
    if result.get(FAILED) or None in values:
        study.tell(trial, state=TrialState.FAIL)
        return
    annotate(trial, True, result[LATENCY], budget_ms)
    study.tell(trial, values)


def _next_experiment(root: Path, name: str) -> Path:
    """A new Tune experiment folder for each run of the command: ``<name>.1``, ``<name>.2``, ...

    Resuming after the driver died starts a new Tune run for the trials still missing from the
    study rather than ``Tuner.restore``: the restored searcher's checkpoint can lag the study
    (trials asked after it are unknown to it), and the restored run then asks past the budget.
    """
    runs = [int(p.suffix[1:]) for p in root.glob(f"{name}.*") if p.suffix[1:].isdigit()]
    return root / f"{name}.{max(runs, default=0) + 1}"


def _new_tuner(
    config: CampaignConfig,
    space: SearchSpace,
    options: RayOptions,
    trainable,
    todo: int,
    experiment: Path,
    progress: bool,
):
    from ray import tune

    searcher = _Searcher(
        _Space(space),
        metric=[name for name, _ in OBJECTIVES],
        mode=[mode for _, mode in OBJECTIVES],
        sampler=make_sampler(config.sampler, config.seed, config.trials),
        study_name=config.name,
        storage=open_storage(config.storage),
        budget_ms=config.latency_budget_ms,
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            num_samples=todo,
            max_concurrent_trials=options.max_concurrent,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=experiment.name,
            storage_path=str(experiment.parent),
            failure_config=tune.FailureConfig(max_failures=options.max_failures),
            verbose=None if progress else 0,
        ),
    )


def _resource_tag(options: RayOptions) -> str:
    return ",".join(f"{k}={v:g}" for k, v in options.target_resource.items()) or "none"


# -- the driver's side of a trial ------------------------------------------------------------------
class _Space:
    """The define-by-run space: the local backend's ``space.from_trial``; passes the trial number on."""

    def __init__(self, space: SearchSpace):
        self.space = space

    def __call__(self, trial) -> dict:
        arch = self.space.from_trial(trial)
        trial.set_user_attr(ARCH_HASH, arch.arch_hash())
        return {NUMBER: trial.number}


class _Searcher(OptunaSearch):
    """``OptunaSearch`` that records on the Optuna trial what the local backend records (``tell``:
    OptunaSearch has no constraint hook), tells a candidate that failed on its own as FAIL, not as
    pruned, and tells an errored trial nothing (the driver resumes or fails it)."""

    def __init__(self, *args, budget_ms: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._budget_ms = budget_ms

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        ot_trial = self._ot_trials.get(trial_id)
        if error or ot_trial is None or trial_id in self._completed_trials:
            return  # unknown to a restored searcher: the driver tells it (``_tell_unreported``)
        tell(self._ot_study, ot_trial, result, self._budget_ms)
        self._completed_trials.add(trial_id)


# -- the worker's side -------------------------------------------------------------------------
@dataclass(frozen=True)
class _Job:
    """What every trial of a campaign needs on a worker (shipped once, through the object store)."""

    config: CampaignConfig
    space: SearchSpace
    parent_run_id: str
    files: dict[str, bytes]  # file name -> content: the frozen weights candidates inherit from


def _pack(scorer: Scorer) -> dict[str, bytes]:
    """The files the scorer's candidates inherit from: the campaign's frozen copy of the supernet
    checkpoint (weights and sidecar) or of a timm model's weights file."""
    frozen = scorer.candidates.frozen
    return {} if frozen is None else {p.name: p.read_bytes() for p in sorted(frozen.iterdir()) if p.is_file()}


_STATE: dict[str, tuple[Scorer, Campaign]] = {}  # per worker process: reused actors keep their scorer


def _worker_state(job: _Job) -> tuple[Scorer, Campaign]:
    """The scorer (supernet, data, target, a node-local latency cache) and tracker of this campaign."""
    key = f"{job.config.name}/{job.parent_run_id}"
    if key not in _STATE:
        # one folder per driver workspace, as the local backend has one latency cache per workspace
        root = Path(tempfile.gettempdir()) / "vitnas-ray" / _digest(job.config.workspace)
        inputs = {"supernet": None, "weights": None}
        if job.files:
            folder = _unpack(job.files, root / "inputs" / job.parent_run_id)
            inputs = family_of(job.space).worker_inputs(folder)
        cache_url = job.config.cache_url
        local = replace(
            job.config,
            workspace=str(root),
            **inputs,
            cache_url=None if cache_url.startswith("sqlite:") else cache_url,  # a sqlite file is node-local
        ).resolved()
        tracker = Campaign(job.config.tracking_uri, job.config.name)
        tracker.parent_run_id = job.parent_run_id
        _STATE[key] = (scorer_for(local, job.space), tracker)
    return _STATE[key]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _unpack(files: dict[str, bytes], folder: Path) -> str:
    """Write the files into ``folder`` (each atomically: trials on one node may start together)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = folder / name
        if not path.is_file() or path.read_bytes() != content:
            tmp = folder / f".{name}.{id(content)}.tmp"
            tmp.write_bytes(content)
            tmp.replace(path)
    return str(folder)


def _node() -> dict[str, str]:
    """Which node this trial runs on and the hardware resources that node offers."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
    custom = sorted(k for k in node["Resources"] if not k.startswith(_RAY_RESOURCES))
    return {"node_ip": node["NodeManagerAddress"], "node_id": node_id, "node_resources": ",".join(custom)}


def _trainable(params: dict, job: _Job) -> None:
    """One trial on a worker: score the candidate, log its child run, report to Tune."""
    from ray import tune

    scorer, tracker = _worker_state(job)
    arch = job.space.from_params(params)
    number = int(params[NUMBER])
    done = tracker.finished_trial(number)
    if done is not None and done.arch_hash == arch.arch_hash():
        # a retry of a trial that finished before its node died: report it, run nothing twice
        tune.report({NUMBER: number, RUN_ID: done.run_id, **done.metrics})
        return
    node = _node()
    tags = {**_identity_tags(scorer), **node, "backend": "ray"}
    run_id = tracker.trial_run(number, arch, tags=tags)
    score, failure = evaluate(scorer, arch)
    log_outcome(tracker, run_id, score, failure)
    report = {NUMBER: number, RUN_ID: run_id, FINGERPRINT: tags[FINGERPRINT], **node}
    report.update(score.metrics() if score is not None else {})
    if failure is not None:
        report[FAILED] = failure[:500]
    tune.report(report)
