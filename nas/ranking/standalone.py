"""Stand-alone runs: one subnet trained from scratch with the one training loop, tested per image.

A run is keyed by (arch hash, data, held-out part, training recipe with its epochs and seed). The
recipe leaves out the supernet-only settings (``nas.training.config.SUPERNET_ONLY``) and where the run
computes (accumulation, loader workers, compile), so a supernet trained another way reuses every
stand-alone run: what makes comparing supernet settings affordable. Each finished run is one JSON
file in the cache folder, written atomically, so an interrupted rank-check loses at most the runs in
flight and a second one skips what the first finished.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from nas.files import write_atomically
from nas.ranking.folds import Holdout, run_data
from nas.training.config import SUPERNET_ONLY, TrainConfig

FORMAT = "vitnas-standalone/1"
RUNTIME_FIELDS = ("accum_steps", "loader_workers", "compile")  # how a run computes, not what it learns


def recipe_fields(config: TrainConfig) -> dict:
    """The settings that decide what a plain training run learns (the cache key's recipe part)."""
    return {k: v for k, v in config.to_dict().items() if k not in SUPERNET_ONLY + RUNTIME_FIELDS}


@dataclass(frozen=True)
class Job:
    """One stand-alone run to do: plain data, so it travels to a worker process."""

    arch: dict
    arch_hash: str
    run: int  # the run's index: its seed is recipe seed + run, its held-out part from the holdout
    config: dict  # TrainConfig fields, seed included
    data: dict  # DataSpec.to_dict()
    image_size: int
    holdout: tuple[str, int]  # (kind, folds)

    @property
    def key(self) -> str:
        """A digest of everything that decides the run's result."""
        holdout = Holdout(*self.holdout).key(self.run)
        recipe = recipe_fields(TrainConfig(**self.config))
        data = {k: self.data.get(k) for k in ("kind", "path", "seed")}
        text = json.dumps(
            {"format": FORMAT, "arch": self.arch_hash, "data": data, "image_size": self.image_size,
             "holdout": holdout, "recipe": recipe},
            sort_keys=True,
        )  # fmt: skip
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def seed(self) -> int:
        return int(self.config["seed"])


class Cache:
    """Finished runs as ``<folder>/<arch hash>-<key>.json``."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def path(self, job: Job) -> Path:
        return self.folder / f"{job.arch_hash}-{job.key}.json"

    def get(self, job: Job) -> dict | None:
        path = self.path(job)
        try:
            result = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None  # a torn file cannot exist (atomic writes): treat anything unreadable as not done
        return result if result.get("format") == FORMAT and result.get("key") == job.key else None

    def put(self, job: Job, result: dict) -> Path:
        return write_atomically(self.path(job), lambda tmp: Path(tmp).write_text(json.dumps(result)))


@torch.inference_mode()
def correctness(
    model: nn.Module, data: Dataset, device: torch.device | str = "cpu", batch: int = 512
) -> np.ndarray:
    """0/1 per item of ``data``: whether ``model``'s top-1 class is the label (in eval mode)."""
    was = model.training
    model.eval()
    out = []
    try:
        if isinstance(data, TensorDataset):
            x_all, y_all = data.tensors[:2]
            batches = ((x_all[i : i + batch], y_all[i : i + batch]) for i in range(0, len(y_all), batch))
        else:
            batches = DataLoader(data, batch_size=batch, shuffle=False, num_workers=0)
        for x, y in batches:
            out.append((model(x.to(device)).argmax(-1).cpu() == y).numpy())
    finally:
        model.train(was)
    return np.concatenate(out).astype(np.uint8) if out else np.zeros(0, dtype=np.uint8)


def encode(bits: np.ndarray) -> str:
    return "".join("1" if b else "0" for b in bits)


def decode(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), dtype=np.uint8) - ord("0")


def train_run(job: Job, splits, world) -> dict | None:
    """Train the job's subnet on its training part and test it on its held-out part; the result on
    the main process (None elsewhere). Every process of ``world`` must call it (one data-parallel run)."""
    from nas.arch import arch_from_dict
    from nas.supernet.subnet import VitnasSubnet
    from nas.training.batches import Batches
    from nas.training.loop import Hooks, SupervisedStep, fit
    from nas.training.optim import make_optimizer

    config = TrainConfig(**job.config)
    holdout = Holdout(*job.holdout)
    train, test = run_data(splits, holdout, job.run)
    torch.manual_seed(config.seed)
    model = VitnasSubnet(arch_from_dict(job.arch)).to(world.device)
    world.broadcast_parameters(model)
    t0 = time.perf_counter()
    history = fit(
        model, make_optimizer(model, config), SupervisedStep(config.label_smoothing),
        Batches(train, config, world, splits.num_classes), config, world, Hooks(validate=lambda m: {}),
        progress=False,
    )  # fmt: skip
    if not world.main:
        return None
    bits = correctness(model, test, world.device)
    return {
        "format": FORMAT, "key": job.key, "arch_hash": job.arch_hash, "run": job.run, "seed": job.seed,
        "holdout": holdout.key(job.run), "epochs": config.epochs, "accuracy": float(bits.mean()),
        "count": int(bits.size), "correct": encode(bits), "train_loss": history[-1]["train_loss"],
        "seconds": time.perf_counter() - t0, "device": str(world.device), "world_size": world.size,
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip


@functools.lru_cache(maxsize=2)
def _splits(kind: str, path: str | None, seed: int, image_size: int, aug: str):
    from nas.data import DataSpec, load_splits

    return load_splits(DataSpec(kind, path, seed), image_size, aug=aug)


def run_in_worker(job: Job, threads: int) -> dict:
    """``train_run`` in a worker process of its own (one process, CPU, ``threads`` threads)."""
    from nas.training.distributed import World

    torch.set_num_threads(threads)
    splits = _splits(
        job.data["kind"], job.data.get("path"), int(job.data["seed"]), job.image_size, job.config["aug"]
    )
    return train_run(job, splits, World())
