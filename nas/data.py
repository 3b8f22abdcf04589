"""Datasets for search and training: the embedded default (scikit-learn digits), CIFAR and ImageFolder.

Every source yields three splits. The validation split scores candidates during search; the test split
is kept for the final training of a chosen architecture, so search never sees it. Splits that are carved
out of one pool are stratified and depend only on the seed and the sample indices (not on any RNG
library's stream), so they are the same in every process and on every machine. Nothing is downloaded:
data comes from scikit-learn's package files or from disk.

Images read from disk go through torchvision transforms (`nas.training.augment`): the train split gets
the chosen augmentation preset, val and test always the deterministic eval transform. Digits stays an
in-memory tensor dataset; the training loop shifts its batches (`nas.training.batches`).
"""

import hashlib
import math
import os
import pickle
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from nas.errors import UserError
from nas.training import augment as aug_presets

KINDS = ("digits", "cifar10", "cifar100", "imagefolder")
SPEC_FORMS = "digits, cifar10:PATH, cifar100:PATH, imagefolder:PATH"
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)  # train / val / test for a pool with no split of its own
CIFAR_VAL_FRACTION = 0.10  # CIFAR ships train/test only: val is carved from train

# Fixed per-channel constants for the sources read from disk (their usual published values), so a
# dataset never has to be scanned before the first batch.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# (mean, std) the transforms of each disk source normalise with; digits is normalised in memory instead,
# with its train split's own statistics
MEAN_STD = {
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
    "imagefolder": (IMAGENET_MEAN, IMAGENET_STD),
}


@dataclass(frozen=True)
class DataSpec:
    """Which data a run used: enough to load it again and to record it in a JSON sidecar."""

    kind: str
    path: str | None = None
    seed: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"unknown data kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        if (self.kind == "digits") != (self.path is None):
            raise UserError(
                f"data kind {self.kind!r} {'takes no' if self.kind == 'digits' else 'needs a'} path"
            )

    @property
    def spec(self) -> str:
        """The spec string that `parse_data_spec` turns back into this (seed aside)."""
        return self.kind if self.path is None else f"{self.kind}:{self.path}"

    def describe(self) -> str:
        names = {
            "digits": "scikit-learn digits (1797 8x8 images, 10 classes, embedded)",
            "cifar10": f"CIFAR-10 at {self.path}",
            "cifar100": f"CIFAR-100 at {self.path}",
            "imagefolder": f"ImageFolder at {self.path}",
        }
        return f"{names[self.kind]}, split seed {self.seed}"

    def to_dict(self) -> dict:
        return {**asdict(self), "spec": self.spec}

    @classmethod
    def from_dict(cls, d: dict) -> "DataSpec":
        return cls(kind=d["kind"], path=d.get("path"), seed=int(d.get("seed", 0)))


@dataclass
class Splits:
    """The three splits of one source. `indices` holds, for carved splits, the source rows of each.

    `val_subset` is the size asked of a reduced validation split (None: the whole split); it is a
    choice of how to score, not of which data, so it lives here and not in the DataSpec.
    """

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    spec: DataSpec
    indices: dict[str, list[int]] | None = None
    in_chans: int = 3
    val_subset: int | None = None
    # per channel, what images in [0, 1] were normalised with: a model trained on them expects it
    # (timm's pretrained_cfg mean/std, written into exported weights)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def labels(self, split: str) -> list[int]:
        """The class of every item of `split` ("train", "val" or "test"), without loading any image."""
        return _labels(getattr(self, split))


def _labels(dataset: Dataset) -> list[int]:
    if isinstance(dataset, Subset):
        base = _labels(dataset.dataset)
        return [base[i] for i in dataset.indices]
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].tolist()
    return list(dataset.targets)  # ImageFolder, CifarImages, Transformed


def parse_data_spec(spec: str) -> DataSpec:
    """Turn a user's `--data` string into a DataSpec; paths become absolute so sidecars stay valid."""
    kind, sep, path = spec.strip().partition(":")
    if kind == "digits" and not sep:
        return DataSpec("digits")
    if kind in KINDS[1:] and sep and path.strip():
        return DataSpec(kind, os.path.abspath(os.path.expanduser(path.strip())))
    raise UserError(f"bad data spec {spec!r}: expected one of {SPEC_FORMS}")


def load_splits(
    spec: DataSpec | str,
    image_size: int,
    seed: int | None = None,
    *,
    aug: str = "none",
    val_subset: int | None = None,
) -> Splits:
    """Load train/val/test at `image_size`; `seed` (default: the spec's own) fixes carved splits.

    `aug` names the preset of the train split's transform (digits ignores it: its batches are shifted
    by the training loop). `val_subset` N keeps a fixed, class-balanced N items of val (see
    `balanced_subset`), so scoring many candidates costs less.
    """
    if isinstance(spec, str):
        spec = parse_data_spec(spec)
    if seed is not None:
        spec = DataSpec(spec.kind, spec.path, seed)
    if image_size < 1:
        raise UserError(f"image size must be a positive number of pixels, got {image_size}")
    aug_presets.check(aug)
    if spec.kind == "digits":
        splits = _load_digits(spec, image_size)
    elif spec.kind in ("cifar10", "cifar100"):
        splits = _load_cifar(spec, image_size, aug)
    else:
        splits = _load_imagefolder(spec, image_size, aug)
    return splits if val_subset is None else _reduce_val(splits, val_subset)


def _reduce_val(splits: Splits, n: int) -> Splits:
    labels = splits.labels("val")
    classes = len(set(labels))
    if n < max(1, classes):
        raise UserError(
            f"--val-subset {n}: must be at least the number of classes in the validation split ({classes})"
        )
    keep = balanced_subset(labels, n, splits.spec.seed)
    val = splits.val
    if isinstance(val, TensorDataset):  # stays a tensor dataset, so evaluation keeps slicing it
        splits.val = TensorDataset(*(t[keep] for t in val.tensors))
    else:
        splits.val = Subset(val, keep)
    if splits.indices is not None and "val" in splits.indices:
        splits.indices["val"] = [splits.indices["val"][i] for i in keep]
    splits.val_subset = n
    return splits


def balanced_subset(labels: Sequence[int], n: int, seed: int) -> list[int]:
    """Sorted positions of min(n, len(labels)) items, as equal per class as possible.

    Classes are filled smallest first, each to an equal share of what is left, so a class too small
    for its share gives all it has and the rest goes to the larger ones. Within a class, items are
    taken in the seed-keyed hash order of their positions: the same subset on every machine.
    """
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(i)
    order = sorted(by_class, key=lambda c: (len(by_class[c]), c))
    left, keep = min(n, len(labels)), []
    for k, c in enumerate(order):
        take = min(len(by_class[c]), left // (len(order) - k))
        keep.extend(sorted(by_class[c], key=lambda i: _order_key(seed, i))[:take])
        left -= take
    return sorted(keep)


def stratified_split(labels: Sequence[int], seed: int, fractions: Sequence[float]) -> list[list[int]]:
    """Split indices into len(fractions) sorted lists, class by class, in a seed-keyed hash order.

    The first part takes what the others leave; each later part gets round(n_c * fraction) of each
    class c, at least one when the class has an item to spare for it.
    """
    keys = [_order_key(seed, i) for i in range(len(labels))]
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(i)
    parts: list[list[int]] = [[] for _ in fractions]
    for members in by_class.values():
        members.sort(key=keys.__getitem__)
        start = 0
        for part, fraction in zip(parts[1:], fractions[1:], strict=True):
            take = math.floor(len(members) * fraction + 0.5)
            take = max(take, 1) if fraction > 0 and len(members) - start > 1 else take
            part.extend(members[start : start + take])
            start += take
        parts[0].extend(members[start:])
    return [sorted(p) for p in parts]


def _order_key(seed: int, index: int) -> bytes:
    """A pseudo-random sort key that depends only on (seed, index): the same on any machine."""
    return hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()


# --- digits ------------------------------------------------------------------------------------------


def _load_digits(spec: DataSpec, image_size: int) -> Splits:
    """All of digits as tensors, normalised with the train split's mean and std (one value, grey)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # [N, 1, 8, 8] in [0, 1]
    if image_size != grey.shape[-1]:
        grey = F.interpolate(grey, size=(image_size, image_size), mode="bilinear", align_corners=False)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    train, val, test = stratified_split(labels.tolist(), spec.seed, SPLIT_FRACTIONS)
    train_pixels = grey[train]
    mean, std = train_pixels.mean(), train_pixels.std()
    grey = (grey - mean) / std

    def part(idx: list[int]) -> TensorDataset:
        # expand, not repeat: three channels that share one grey plane's memory
        return TensorDataset(grey[idx].expand(-1, 3, -1, -1), labels[idx])

    return Splits(
        part(train),
        part(val),
        part(test),
        num_classes=10,
        spec=spec,
        indices={"train": train, "val": val, "test": test},
        mean=(float(mean),) * 3,
        std=(float(std),) * 3,
    )


# --- CIFAR -------------------------------------------------------------------------------------------

_CIFAR_LAYOUT = {
    # kind: (folder, train files, test file, label key)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels"),
    "cifar100": ("cifar-100-python", ["train"], "test", "fine_labels"),
}

# What the official CIFAR pickles (written by Python 2 with numpy) and re-pickled copies refer to.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, lists and dicts only, so a planted file cannot run code on load."""

    def find_class(self, module, name):
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name}")
        return super().find_class(module, name)


class CifarImages(Dataset):
    """CIFAR images held as uint8 [N, 32, 32, 3]: memory stays at the raw bytes, and splits share one array.

    With a `transform` (an augmenting train split) each item goes to it as a PIL image. Without, it is
    resized and normalised in torch, several times faster than through PIL: the val split is read
    once for every candidate a search scores.
    """

    def __init__(self, images: np.ndarray, labels: torch.Tensor, image_size: int, mean, std, transform=None):
        self.images, self.labels, self.image_size, self.transform = images, labels, image_size, transform
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        if self.transform is not None:
            from PIL import Image

            return self.transform(Image.fromarray(self.images[i])), self.labels[i]
        x = torch.from_numpy(self.images[i]).permute(2, 0, 1).float().div_(255.0)
        if self.image_size != x.shape[-1]:
            size = (self.image_size, self.image_size)
            x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
        return (x - self.mean) / self.std, self.labels[i]


def _cifar_root(spec: DataSpec) -> Path:
    """Accept either the batches folder itself or a folder that contains it."""
    folder, train_files, test_file, *_ = _CIFAR_LAYOUT[spec.kind]
    path = Path(spec.path)
    for root in (path, path / folder):
        if all((root / name).is_file() for name in [*train_files, test_file]):
            return root
    wanted = ", ".join([*train_files, test_file])
    raise UserError(
        f"{spec.kind}: no CIFAR python batches at {spec.path} (expected {wanted} in it or in {folder}/ "
        f"beneath it, as unpacked from the python version of the dataset; nothing is downloaded)"
    )


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, list[int]]:
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="latin1").load()
        data, labels = np.asarray(batch["data"], dtype=np.uint8), list(batch[label_key])
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
        raise UserError(
            f"{path}: not a CIFAR python batch (a dict with 'data' and '{label_key}'): {e}"
        ) from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise UserError(
            f"{path}: expected 'data' of shape N x 3072 and N labels, got {data.shape}, {len(labels)}"
        )
    return data, labels


def _read_cifar(paths: list[Path], label_key: str) -> tuple[np.ndarray, torch.Tensor]:
    """Images as uint8 [N, 32, 32, 3] (the layout PIL takes) and labels as int64."""
    batches = [_read_cifar_batch(p, label_key) for p in paths]
    data = np.concatenate([d for d, _ in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = [label for _, ls in batches for label in ls]
    return np.ascontiguousarray(data), torch.tensor(labels, dtype=torch.int64)


def _load_cifar(spec: DataSpec, image_size: int, aug: str) -> Splits:
    """CIFAR's own test batch is the test split; val is carved (stratified) out of its train batches."""
    _, train_files, test_file, label_key = _CIFAR_LAYOUT[spec.kind]
    mean, std = MEAN_STD[spec.kind]
    root = _cifar_root(spec)
    images, labels = _read_cifar([root / name for name in train_files], label_key)
    test_images, test_labels = _read_cifar([root / test_file], label_key)
    train, val = stratified_split(labels.tolist(), spec.seed, (1 - CIFAR_VAL_FRACTION, CIFAR_VAL_FRACTION))
    augmented = None if aug == "none" else aug_presets.train_transform(aug, image_size, mean, std)
    pool = CifarImages(images, labels, image_size, mean, std)
    return Splits(
        Subset(CifarImages(images, labels, image_size, mean, std, augmented), train),
        Subset(pool, val),
        CifarImages(test_images, test_labels, image_size, mean, std),
        num_classes=10 if spec.kind == "cifar10" else 100,
        spec=spec,
        indices={"train": train, "val": val},
        mean=mean,
        std=std,
    )


# --- ImageFolder -------------------------------------------------------------------------------------


class Transformed(Dataset):
    """`dataset`'s items with `transform` applied to the image: one scanned pool, two transforms."""

    def __init__(self, dataset: Dataset, transform):
        self.dataset, self.transform = dataset, transform

    @property
    def targets(self) -> list[int]:
        return self.dataset.targets

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, label = self.dataset[i]
        return self.transform(image), label


def _image_folder(root: Path, transform=None):
    from torchvision import datasets

    try:
        return datasets.ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, OSError) as e:
        raise UserError(f"imagefolder: {root}: expected one sub-folder of images per class ({e})") from None


def _load_imagefolder(spec: DataSpec, image_size: int, aug: str) -> Splits:
    """`train/` + `val/` (+ `test/`) are used as they are; otherwise val and test are carved out.

    With `train/` and `val/` but no `test/`, val doubles as test (the ImageNet convention).
    """
    root = Path(spec.path)
    if not root.is_dir():
        raise UserError(f"imagefolder: {spec.path} is not a folder (expected one sub-folder per class)")
    mean, std = MEAN_STD["imagefolder"]
    augmented = aug_presets.train_transform(aug, image_size, mean, std)
    evaluate = aug_presets.eval_transform(image_size, mean, std)
    if (root / "train").is_dir() and (root / "val").is_dir():
        train, val = _image_folder(root / "train", augmented), _image_folder(root / "val", evaluate)
        test = _image_folder(root / "test", evaluate) if (root / "test").is_dir() else val
        for name, part in (("val", val), ("test", test)):
            if part.classes != train.classes:
                raise UserError(
                    f"imagefolder: {root / name} has classes {part.classes}, train/ has {train.classes}"
                )
        return Splits(train, val, test, num_classes=len(train.classes), spec=spec)
    pool = _image_folder(root / "train" if (root / "train").is_dir() else root)  # PIL images out
    parts = stratified_split(pool.targets, spec.seed, SPLIT_FRACTIONS)
    if not all(parts):
        raise UserError(
            f"imagefolder: {spec.path} has too few images to carve train/val/test (3 a class at least)"
        )
    train, val, test = parts
    evaluated = Transformed(pool, evaluate)
    return Splits(
        Subset(Transformed(pool, augmented), train),
        Subset(evaluated, val),
        Subset(evaluated, test),
        num_classes=len(pool.classes),
        spec=spec,
        indices={"train": train, "val": val, "test": test},
    )
