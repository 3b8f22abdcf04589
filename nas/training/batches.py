"""The batches of each optimizer step, for this process.

One order for every world size: ``DistributedSampler`` permutes the training split by
(seed, epoch) alone and hands rank r every W-th index, so global batch s holds the same images
whether one process or W take it. Each process's share is cut into ``accum_steps`` micro-batches.

Randomness is keyed by the image, not by the process that happens to load it: the digits shift of
an image is drawn from (seed, epoch, image), and a worker seeds torch, numpy and ``random`` from the
same key before it transforms an image. So a resumed run sees exactly the batches an unbroken run
would, with any number of loader workers, persistent or not.

Two sources: tensors held in memory (the embedded digits; sliced directly, no loader) and any
other dataset, read by ``DataLoader`` workers into pinned memory.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset, TensorDataset

from nas.errors import UserError
from nas.training import augment
from nas.training.config import TrainConfig
from nas.training.distributed import World
from nas.training.seeds import stream_seed

MicroBatch = tuple[torch.Tensor, torch.Tensor]  # images, labels (int) or soft targets (float)


class Batches:
    """``epoch(e)`` yields each step's micro-batches, already on the device (and mixed, with Mixup)."""

    def __init__(self, dataset: Dataset, config: TrainConfig, world: World, num_classes: int):
        self.config, self.world, self.device = config, world, world.device
        self.micro = config.micro_batch(world.size)
        self.sampler = DistributedSampler(
            dataset, num_replicas=world.size, rank=world.rank, shuffle=True,
            seed=stream_seed(config.seed, 0, "order") % 2**31, drop_last=True,
        )  # fmt: skip
        self.steps_per_epoch = len(self.sampler) // (self.micro * config.accum_steps)
        if self.steps_per_epoch == 0:
            raise UserError(
                f"the training split has {len(dataset)} images, fewer than one batch of {config.batch_size}: "
                "lower --batch-size"
            )
        self.mixup = augment.mixup(config.aug, num_classes, config.label_smoothing)
        if self.mixup is not None and self.micro % 2:
            raise UserError(f"--aug {config.aug} mixes image pairs: the micro-batch {self.micro} must be even")
        self.tensors = _tensors(dataset)
        self.loader = None if self.tensors is not None else self._loader(dataset)

    def epoch(self, epoch: int) -> Iterator[list[MicroBatch]]:
        self.sampler.set_epoch(epoch)
        micro = self._in_memory(epoch) if self.tensors is not None else self._from_loader(epoch)
        step: list[MicroBatch] = []
        for k, (x, y) in enumerate(micro):
            step.append(self._mix(epoch, k, x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)))
            if len(step) == self.config.accum_steps:
                yield step
                step = []
            if k + 1 == self.steps_per_epoch * self.config.accum_steps:
                return

    def _in_memory(self, epoch: int) -> Iterator[MicroBatch]:
        images, labels = self.tensors
        shift = augment.digits_shift(self.config.aug)
        offsets = torch.randint(
            0, 2 * shift + 1, (len(labels), 2),
            generator=torch.Generator().manual_seed(stream_seed(self.config.seed, epoch, "augment")),
        )  # fmt: skip
        order = torch.tensor(list(self.sampler))
        for start in range(0, len(order) - self.micro + 1, self.micro):
            rows = order[start : start + self.micro]
            yield shift_images(images[rows], offsets[rows], shift), labels[rows]

    def _loader(self, dataset: Dataset) -> DataLoader:
        workers = self.config.loader_workers
        return DataLoader(
            _SeededItems(dataset, self.config.seed), batch_size=self.micro, sampler=_EpochTagged(self.sampler),
            drop_last=True, num_workers=workers, pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
        )  # fmt: skip

    def _from_loader(self, epoch: int) -> Iterator[MicroBatch]:
        self.loader.sampler.epoch = epoch
        yield from self.loader

    def _mix(self, epoch: int, k: int, x: torch.Tensor, y: torch.Tensor) -> MicroBatch:
        if self.mixup is None:
            return x, y
        # timm's Mixup draws from numpy's global stream: key it so a resumed epoch mixes the same pairs
        np.random.seed(stream_seed(self.config.seed, epoch, f"mixup:{self.world.rank}:{k}") % 2**32)
        return self.mixup(x, y)


def shift_images(x: torch.Tensor, offsets: torch.Tensor, shift: int) -> torch.Tensor:
    """Translate image i of ``x`` [B, C, H, W] by ``offsets[i] - shift`` pixels (rows, columns).

    Edges are replicated, so a digit's background stays background.
    """
    if shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")
    offsets = offsets.to(x.device)
    rows = (offsets[:, 0:1] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (offsets[:, 1:2] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channels = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, channels, rows, cols]


def _tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Images and labels of an in-memory dataset (a ``TensorDataset`` or a subset of one), else None."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[0], dataset.tensors[1]
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, TensorDataset):
        rows = torch.as_tensor(list(dataset.indices))
        return dataset.dataset.tensors[0][rows], dataset.dataset.tensors[1][rows]
    return None


class _EpochTagged(Sampler):
    """The wrapped sampler's indices as (epoch, index), so a worker can key its randomness by both."""

    def __init__(self, inner: Sampler):
        self.inner, self.epoch = inner, 0

    def __iter__(self):
        return ((self.epoch, i) for i in self.inner)

    def __len__(self) -> int:
        return len(self.inner)


class _SeededItems(Dataset):
    """Seeds every random stream a transform may use from (seed, epoch, index), then reads the item."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        s = stream_seed(self.seed, epoch, f"item:{index}")
        torch.manual_seed(s)
        np.random.seed(s % 2**32)
        random.seed(s)
        return self.dataset[index]
