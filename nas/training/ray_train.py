"""Supernet training as Ray Train workers: ``vitnas train-supernet --backend ray``.

Built on Ray Train's V2 API (the default in Ray 2.60; ``RAY_TRAIN_V2_ENABLED=0`` is not supported):
``TorchTrainer`` starts ``num_workers`` actors and their torch process group, and each runs the one
training loop (``train_supernet``), which finds that group itself (``nas.training.distributed``).

- The checkpoint is the workspace's: rank 0 writes ``WORKSPACE/supernet/<space>/`` atomically after
  every epoch and every rank reads it on a resume. What each epoch reports to Ray is a marker (the
  epoch, in ``epoch.json``) and rank 0's metrics. So on a cluster of several nodes the workspace
  (and the data) must be on storage every node shares, e.g. NFS; a restarted rank 0 that cannot see
  the epoch Ray last recorded says so.
- A lost worker ends the whole group; Ray Train starts it again (``FailureConfig(max_failures)``)
  and the new group resumes from the workspace checkpoint, so no finished epoch is lost or repeated.
- Ray Train's ``report`` is a barrier: every rank reports every epoch, rank 0 with the marker.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from nas.data import DataSpec, parse_data_spec
from nas.errors import UserError
from nas.space import SearchSpace, load_space
from nas.supernet import checkpoint as ckpt
from nas.supernet.train import TrainResult, check_run, train_supernet
from nas.training.config import TrainConfig
from nas.training.precision import check_precision
from nas.weights import file_hash

MARKER = "epoch.json"  # what a Ray checkpoint holds: the epoch whose workspace checkpoint is written


@dataclass(frozen=True)
class RayTrainOptions:
    """Where and how wide the supernet trains on Ray."""

    address: str | None = None  # None: a local Ray; "auto", "HOST:PORT" or "ray://HOST:PORT"
    num_workers: int = 2
    gpus_per_worker: float = 0.0  # 0: CPU workers (gloo); otherwise NCCL on each worker's GPU
    max_failures: int = 3  # group restarts after a lost or failed worker, each resuming

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise UserError(f"--num-workers {self.num_workers}: must be at least 1")
        if not math.isfinite(self.gpus_per_worker) or self.gpus_per_worker < 0:
            raise UserError(f"--gpus-per-worker {self.gpus_per_worker:g}: expected a number >= 0")
        if self.max_failures < 0:
            raise UserError(f"--max-failures {self.max_failures}: expected 0 or more")


@dataclass(frozen=True)
class _Job:
    """What every worker needs, paths absolute (workers do not share the driver's directory)."""

    space: SearchSpace
    data: DataSpec
    workspace: str
    config: TrainConfig
    gpus: bool
    resume: bool
    force: bool
    seen: str | None  # hash of the sidecar the driver saw (None: none), to tell this run's from it
    tracking_uri: str | None
    progress: bool


def train_supernet_on_ray(
    space: SearchSpace | str,
    data: str | DataSpec,
    workspace: str | Path,
    config: TrainConfig | None = None,
    options: RayTrainOptions | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    tracking_uri: str | None = None,
    progress: bool = True,
) -> TrainResult:
    """``train_supernet`` on ``options.num_workers`` Ray Train workers; the result read from the
    checkpoint's sidecar (``run_id``: rank 0's MLflow run of the last attempt).

    Everything the workers would refuse at once is refused here, before Ray starts or anything is
    written. A ``UserError`` a worker raises (e.g. ``--resume`` with other settings) recurs on every
    restart; it ends the run as that one line once the restarts are spent.
    """
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig, WorkerGroupError
    from ray.train.torch import TorchTrainer

    config = config or TrainConfig()
    options = options or RayTrainOptions()
    if isinstance(space, str):
        space = load_space(Path(space).resolve() if Path(space).is_file() else space)
    data = parse_data_spec(data) if isinstance(data, str) else data
    workspace = Path(workspace).expanduser().resolve()
    folder = ckpt.checkpoint_dir(workspace, space)
    config.micro_batch(options.num_workers)
    check_run(space, config, folder, resume, force)
    if not options.gpus_per_worker:
        check_precision(config.precision, torch.device("cpu"))
    job = _Job(
        space, data, str(workspace), config, options.gpus_per_worker > 0, resume, force, _sidecar_hash(folder),
        tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"), progress,
    )  # fmt: skip
    runs = workspace / "ray-train"
    name = f"supernet-{space.name}"
    if not resume:  # Ray Train would restore an earlier run of this name and hand its marker out
        shutil.rmtree(runs / name, ignore_errors=True)
    gpus = {"GPU": options.gpus_per_worker} if options.gpus_per_worker else {}
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(
            num_workers=options.num_workers, use_gpu=bool(gpus), resources_per_worker={"CPU": 1, **gpus}
        ),
        run_config=RunConfig(
            name=name, storage_path=str(runs), failure_config=FailureConfig(max_failures=options.max_failures)
        ),
    )
    started = not ray.is_initialized()
    if started:
        ray.init(address=options.address, log_to_driver=progress)
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    except WorkerGroupError as err:
        user = [e for e in err.worker_failures.values() if isinstance(e, UserError)]
        if user:
            raise UserError(str(user[0])) from None
        raise
    finally:
        if started:
            ray.shutdown()
    wall, meta = time.perf_counter() - t0, ckpt.read_meta(folder)
    return TrainResult(folder / ckpt.WEIGHTS, int(meta["epoch"]), meta["history"], wall, result.return_value)


def _sidecar_hash(folder: Path) -> str | None:
    path = folder / ckpt.SIDECAR
    return file_hash(path) if path.is_file() else None


# -- on the workers ------------------------------------------------------------------------------
def _worker(loop_config: dict) -> str | None:
    """One Ray Train worker: the one training loop in the group Ray Train set up; rank 0 returns
    its MLflow run id (``Result.return_value``)."""
    import ray.train
    from ray.train.collective import broadcast_from_rank_zero
    from ray.train.torch import get_device

    job: _Job = loop_config["job"]
    rank = ray.train.get_context().get_world_rank()
    folder = ckpt.checkpoint_dir(job.workspace, job.space)
    decided = _resume_or_force(job, folder, ray.train.get_checkpoint()) if rank == 0 else None
    resume, force = broadcast_from_rank_zero(decided)  # one decision: the ranks must start at one epoch
    result = train_supernet(
        job.space, job.data, job.workspace, job.config, device=str(get_device()) if job.gpus else "cpu",
        resume=resume, force=force, tracking_uri=job.tracking_uri, progress=job.progress and rank == 0,
        on_epoch=partial(_report, folder, rank),
    )  # fmt: skip
    return result.run_id


def _resume_or_force(job: _Job, folder: Path, restored) -> tuple[bool, bool]:
    """Resume when the user asked, or when this run already checkpointed: a restart after a failure.

    That is when Ray Train hands back a marker, or when the sidecar changed since the driver looked
    (the epoch was written, but the group was lost before it reported). ``force`` only holds until
    then: a restart must not start over.
    """
    reported = 0
    if restored is not None:
        with restored.as_directory() as marker:
            reported = json.loads((Path(marker) / MARKER).read_text())["epoch"]
    written = ckpt.read_meta(folder)["epoch"] if (folder / ckpt.SIDECAR).is_file() else 0
    if reported > written:
        raise UserError(
            f"{folder}: Ray Train recorded epoch {reported}, the checkpoint rank 0 sees here is at epoch "
            f"{written}: on a Ray cluster the workspace must be on storage every node shares"
        )
    ours = restored is not None or _sidecar_hash(folder) != job.seen
    return job.resume or ours, job.force and not ours


def _report(folder: Path, rank: int, epoch: int) -> None:
    """Epoch ``epoch`` to Ray Train, from every rank (``report`` is a barrier): rank 0 with its
    validated metrics and a marker checkpoint, the others with the epoch alone."""
    import ray.train

    if rank != 0:
        ray.train.report({"epoch": epoch})
        return
    record = ckpt.read_meta(folder)["history"][-1]
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, MARKER).write_text(json.dumps({"epoch": epoch, "checkpoint": str(folder / ckpt.WEIGHTS)}))
        ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(tmp))
