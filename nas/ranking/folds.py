"""Where a stand-alone run trains and where it is tested: a fixed cross-validation, or the val split.

``cv`` (in-memory data: digits): the train and validation splits form one pool, cut into ``folds``
stratified parts by a seed-keyed hash order (``nas.data.stratified_split``: the same on every machine).
Run r (seed r) trains on the pool without fold ``r mod folds`` and is tested on that fold. With two
seeds and five folds on digits that is 611 held-out images per subnet instead of the 269 of the
validation split, each seed tested on other images, and each run trains on 1222 images, about what the
supernet trained on (1257). The test split is never touched.

``val``: every run trains on the train split and is tested on the validation split, the images the
inherited weights are scored on. The only choice for data read from disk, whose train and validation
items go through different transforms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, TensorDataset

from nas.data import Splits, stratified_split
from nas.errors import UserError

HOLDOUTS = ("auto", "cv", "val")
DEFAULT_FOLDS = 5


@dataclass(frozen=True)
class Holdout:
    """The scheme: ``cv`` with ``folds`` parts, or ``val``."""

    kind: str = "cv"
    folds: int = DEFAULT_FOLDS

    def __post_init__(self):
        if self.kind not in ("cv", "val"):
            raise UserError(f"--holdout {self.kind!r}: expected one of {', '.join(HOLDOUTS)}")
        if self.kind == "cv" and self.folds < 2:
            raise UserError(f"--folds {self.folds}: cross-validation needs at least 2 folds")

    def fold(self, run: int) -> int | None:
        """The fold run ``run`` is tested on (None: the validation split)."""
        return run % self.folds if self.kind == "cv" else None

    def key(self, run: int) -> dict:
        """What identifies run ``run``'s data (part of the stand-alone cache key)."""
        return (
            {"kind": self.kind, "folds": self.folds, "fold": self.fold(run)}
            if self.kind == "cv"
            else {"kind": "val"}
        )

    def describe(self) -> str:
        if self.kind == "val":
            return "trained on the train split, tested on the validation split"
        return (
            f"{self.folds}-fold cross-validation over the train+validation pool: run r tests on fold r mod "
            f"{self.folds} and trains on the others (never the test split)"
        )


def in_memory(splits: Splits) -> bool:
    return isinstance(splits.train, TensorDataset) and isinstance(splits.val, TensorDataset)


def resolve(kind: str, folds: int, splits: Splits) -> Holdout:
    """``auto``: ``cv`` for in-memory data, ``val`` otherwise; ``cv`` on other data is refused."""
    if kind not in HOLDOUTS:
        raise UserError(f"--holdout {kind!r}: expected one of {', '.join(HOLDOUTS)}")
    if kind == "auto":
        kind = "cv" if in_memory(splits) else "val"
    if kind == "cv" and not in_memory(splits):
        raise UserError(
            f"--holdout cv: data {splits.spec.spec} is read from disk, where train and validation images "
            "are transformed differently; use --holdout val"
        )
    return Holdout(kind, folds)


def pool(splits: Splits) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of train then validation, as one tensor pair."""
    (xt, yt), (xv, yv) = splits.train.tensors[:2], splits.val.tensors[:2]
    return torch.cat([xt, xv]), torch.cat([yt, yv])


def fold_indices(labels: list[int], folds: int, seed: int) -> list[list[int]]:
    """``folds`` stratified, disjoint parts of the pool's positions that together cover it."""
    parts = stratified_split(labels, seed, [1.0 / folds] * folds)
    if not all(parts):
        raise UserError(f"--folds {folds}: the pool of {len(labels)} images is too small for that many folds")
    return parts


def run_data(splits: Splits, holdout: Holdout, run: int) -> tuple[Dataset, Dataset]:
    """(train set, test set) of stand-alone run ``run``."""
    if holdout.kind == "val":
        return splits.train, splits.val
    images, labels = pool(splits)
    parts = fold_indices(labels.tolist(), holdout.folds, splits.spec.seed)
    held = parts[holdout.fold(run)]
    keep = sorted(set(range(len(labels))) - set(held))
    held_t, keep_t = torch.as_tensor(held), torch.as_tensor(keep)
    return TensorDataset(images[keep_t], labels[keep_t]), TensorDataset(images[held_t], labels[held_t])
