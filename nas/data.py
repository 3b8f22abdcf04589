"""Datasets for search and training: the embedded default (scikit-learn digits), CIFAR and ImageFolder.

Every source yields three splits. The validation split scores candidates during search; the test split
is kept for the final training of a chosen architecture, so search never sees it. Splits that are carved
out of one pool are stratified and depend only on the seed and the sample indices (not on any RNG
library's stream), so they are the same in every process and on every machine. Nothing is downloaded:
data comes from scikit-learn's package files or from disk.
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
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from nas.errors import UserError

KINDS = ("digits", "cifar10", "cifar100", "imagefolder")
SPEC_FORMS = "digits, cifar10:PATH, cifar100:PATH, imagefolder:PATH"
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)  # train / val / test for a pool with no split of its own
CIFAR_VAL_FRACTION = 0.10  # CIFAR ships train/test only: val is carved from train

# Fixed per-channel constants for the sources read from disk (their usual published values), so a
# dataset never has to be scanned before the first batch.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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
    """The three splits of one source. `indices` holds, for carved splits, the source rows of each."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    spec: DataSpec
    indices: dict[str, list[int]] | None = None
    in_chans: int = 3


def parse_data_spec(spec: str) -> DataSpec:
    """Turn a user's `--data` string into a DataSpec; paths become absolute so sidecars stay valid."""
    kind, sep, path = spec.strip().partition(":")
    if kind == "digits" and not sep:
        return DataSpec("digits")
    if kind in KINDS[1:] and sep and path.strip():
        return DataSpec(kind, os.path.abspath(os.path.expanduser(path.strip())))
    raise UserError(f"bad data spec {spec!r}: expected one of {SPEC_FORMS}")


def load_splits(spec: DataSpec | str, image_size: int, seed: int | None = None) -> Splits:
    """Load train/val/test at `image_size`; `seed` (default: the spec's own) fixes carved splits."""
    if isinstance(spec, str):
        spec = parse_data_spec(spec)
    if seed is not None:
        spec = DataSpec(spec.kind, spec.path, seed)
    if image_size < 1:
        raise UserError(f"image size must be a positive number of pixels, got {image_size}")
    if spec.kind == "digits":
        return _load_digits(spec, image_size)
    if spec.kind in ("cifar10", "cifar100"):
        return _load_cifar(spec, image_size)
    return _load_imagefolder(spec, image_size)


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


def make_loader(
    dataset: Dataset, batch_size: int, shuffle: bool, seed: int, drop_last: bool = False
) -> DataLoader:
    """A DataLoader whose shuffling is fixed by `seed`; in-process (num_workers=0) so order is exact."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=0,
        drop_last=drop_last,
    )


def augment(x: torch.Tensor, generator: torch.Generator, shift: int = 2) -> torch.Tensor:
    """Translate each image of a batch [B, C, H, W] by up to `shift` pixels each way.

    Edges are replicated (a digit's background stays background). The same generator state gives
    the same shifts; the generator may live on another device than `x`.
    """
    if shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")
    offsets = torch.randint(0, 2 * shift + 1, (b, 2), generator=generator, device=generator.device).to(
        x.device
    )
    rows = (offsets[:, 0:1] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (offsets[:, 1:2] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channels = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, channels, rows, cols]


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
    grey = (grey - train_pixels.mean()) / train_pixels.std()

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
    )


# --- CIFAR -------------------------------------------------------------------------------------------

_CIFAR_LAYOUT = {
    # kind: (folder, train files, test file, label key, mean, std)
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        "test_batch",
        "labels",
        CIFAR10_MEAN,
        CIFAR10_STD,
    ),
    "cifar100": ("cifar-100-python", ["train"], "test", "fine_labels", CIFAR100_MEAN, CIFAR100_STD),
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
    """CIFAR images held as uint8 [N, 3, 32, 32]; resized and normalised per item (memory stays small)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, image_size: int, mean, std):
        self.images, self.labels, self.image_size = images, labels, image_size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i].float().div_(255.0)
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


def _read_cifar(paths: list[Path], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    batches = [_read_cifar_batch(p, label_key) for p in paths]
    data = np.concatenate([d for d, _ in batches]).reshape(-1, 3, 32, 32)
    labels = [label for _, ls in batches for label in ls]
    return torch.from_numpy(data), torch.tensor(labels, dtype=torch.int64)


def _load_cifar(spec: DataSpec, image_size: int) -> Splits:
    """CIFAR's own test batch is the test split; val is carved (stratified) out of its train batches."""
    _, train_files, test_file, label_key, mean, std = _CIFAR_LAYOUT[spec.kind]
    root = _cifar_root(spec)
    images, labels = _read_cifar([root / name for name in train_files], label_key)
    test_images, test_labels = _read_cifar([root / test_file], label_key)
    train, val = stratified_split(labels.tolist(), spec.seed, (1 - CIFAR_VAL_FRACTION, CIFAR_VAL_FRACTION))
    pool = CifarImages(images, labels, image_size, mean, std)
    return Splits(
        Subset(pool, train),
        Subset(pool, val),
        CifarImages(test_images, test_labels, image_size, mean, std),
        num_classes=10 if spec.kind == "cifar10" else 100,
        spec=spec,
        indices={"train": train, "val": val},
    )


# --- ImageFolder -------------------------------------------------------------------------------------


def _image_folder(root: Path, image_size: int):
    from torchvision import datasets, transforms

    transform = transforms.Compose(
        [
            transforms.Resize(image_size),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    try:
        return datasets.ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, OSError) as e:
        raise UserError(f"imagefolder: {root}: expected one sub-folder of images per class ({e})") from None


def _load_imagefolder(spec: DataSpec, image_size: int) -> Splits:
    """`train/` + `val/` (+ `test/`) are used as they are; otherwise val and test are carved out.

    With `train/` and `val/` but no `test/`, val doubles as test (the ImageNet convention).
    """
    root = Path(spec.path)
    if not root.is_dir():
        raise UserError(f"imagefolder: {spec.path} is not a folder (expected one sub-folder per class)")
    if (root / "train").is_dir() and (root / "val").is_dir():
        train, val = _image_folder(root / "train", image_size), _image_folder(root / "val", image_size)
        test = _image_folder(root / "test", image_size) if (root / "test").is_dir() else val
        for name, part in (("val", val), ("test", test)):
            if part.classes != train.classes:
                raise UserError(
                    f"imagefolder: {root / name} has classes {part.classes}, train/ has {train.classes}"
                )
        return Splits(train, val, test, num_classes=len(train.classes), spec=spec)
    pool = _image_folder(root / "train" if (root / "train").is_dir() else root, image_size)
    parts = stratified_split(pool.targets, spec.seed, SPLIT_FRACTIONS)
    if not all(parts):
        raise UserError(
            f"imagefolder: {spec.path} has too few images to carve train/val/test (3 a class at least)"
        )
    return Splits(
        *(Subset(pool, idx) for idx in parts),
        num_classes=len(pool.classes),
        spec=spec,
        indices=dict(zip(("train", "val", "test"), parts, strict=True)),
    )
