"""Behaviour of nas.data: split sizes and determinism, shapes and statistics, disk loaders, errors."""

import hashlib
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nas.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataSpec,
    balanced_subset,
    load_splits,
    parse_data_spec,
    stratified_split,
)
from nas.errors import UserError
from nas.training.augment import eval_transform


def _digest(indices: dict[str, list[int]]) -> str:
    return hashlib.sha256(json.dumps(indices, sort_keys=True).encode()).hexdigest()


@pytest.fixture(scope="module")
def digits32():
    return load_splits("digits", 32, seed=0)


# --- digits --------------------------------------------------------------------------------------------


def test_digits_splits_partition_the_1797_images(digits32):
    idx = digits32.indices
    assert len(idx["train"]) + len(idx["val"]) + len(idx["test"]) == 1797
    assert set(idx["train"]) | set(idx["val"]) | set(idx["test"]) == set(range(1797))
    assert not set(idx["train"]) & set(idx["val"])
    assert not set(idx["train"]) & set(idx["test"])
    assert not set(idx["val"]) & set(idx["test"])
    assert [len(digits32.train), len(digits32.val), len(digits32.test)] == [
        len(idx[k]) for k in ("train", "val", "test")
    ]
    # 70/15/15 within rounding per class (10 classes)
    assert abs(len(idx["val"]) - 0.15 * 1797) <= 10
    assert abs(len(idx["test"]) - 0.15 * 1797) <= 10


def test_digits_every_class_in_every_split_in_proportion(digits32):
    for part in (digits32.train, digits32.val, digits32.test):
        counts = torch.bincount(part.tensors[1], minlength=10)
        assert (counts > 0).all()
        share = counts.float() / counts.sum()
        assert (share - 0.1).abs().max() < 0.02  # digits is balanced, so every split is too


def test_digits_split_same_for_same_seed_and_differs_for_another():
    a = load_splits("digits", 16, seed=0).indices
    b = load_splits(parse_data_spec("digits"), 16).indices
    c = load_splits("digits", 16, seed=1).indices
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    # pinned: the split hangs on the seed and the index only, so every machine and version agrees
    assert _digest(a) == "48ba27dfca5d41aaaa9e8950faec8d7663d4be98b2d27e366fdc9784c2fe7fd5"
    assert sorted(a["val"] + a["test"] + a["train"]) == sorted(c["val"] + c["test"] + c["train"])


def test_digits_split_identical_in_another_process(digits32):
    code = (
        "import hashlib, json; from nas.data import load_splits; "
        "i = load_splits('digits', 8, seed=0).indices; "
        "print(hashlib.sha256(json.dumps(i, sort_keys=True).encode()).hexdigest())"
    )
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": repo}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=repo
    )
    assert out.stdout.strip() == _digest(digits32.indices)


@pytest.mark.parametrize("size", [32, 64])
def test_digits_shapes_and_train_statistics(size):
    splits = load_splits("digits", size)
    assert (splits.num_classes, splits.in_chans) == (10, 3)
    x, y = splits.train[0]
    assert x.shape == (3, size, size) and x.dtype == torch.float32 and y.dtype == torch.int64
    images = splits.train.tensors[0]
    assert torch.isfinite(images).all()
    assert abs(images.mean().item()) < 1e-4
    assert abs(images.std().item() - 1) < 1e-3
    assert torch.equal(images[:, 0], images[:, 2])  # grey digits: three equal channels
    # val/test use the train statistics, so they are close to but not exactly standardised
    assert abs(splits.val.tensors[0].mean().item()) < 0.1


def test_digits_keeps_the_real_images():
    from sklearn.datasets import load_digits

    splits = load_splits("digits", 8)
    raw = torch.from_numpy(load_digits().images).float()
    first = splits.indices["train"][0]
    x, y = splits.train[0]
    # at the native size only the affine normalisation separates the tensor from the raw image
    assert np.corrcoef(x[0].flatten().numpy(), raw[first].flatten().numpy())[0, 1] > 0.9999
    assert y.item() == load_digits().target[first]


def test_stratified_split_gives_small_classes_one_item_each_where_possible():
    parts = stratified_split([0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], seed=3, fractions=(0.7, 0.15, 0.15))
    assert [sorted({(0 if i < 3 else 1) for i in p}) for p in parts] == [[0, 1]] * 3
    assert sum(len(p) for p in parts) == 13


# --- CIFAR ----------------------------------------------------------------------------------------------


def _write_fake_cifar10(root, per_batch=20):
    """The real on-disk format: pickled dicts with uint8 N x 3072 'data' (RGB planes) and 'labels'."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        labels = [(b + k) % 10 for k in range(per_batch)]
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        data[:, 0] = labels  # red plane, pixel (0, 0) carries the label, to check alignment
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels, "data": data}, f, protocol=2)
    return folder


def test_cifar10_from_local_pickles(tmp_path):
    _write_fake_cifar10(tmp_path)
    for path in (tmp_path, tmp_path / "cifar-10-batches-py"):  # the folder or its parent
        splits = load_splits(f"cifar10:{path}", 32, seed=0)
        assert splits.num_classes == 10 and splits.in_chans == 3
        assert (len(splits.train), len(splits.val), len(splits.test)) == (90, 10, 20)
        assert set(splits.indices["val"]).isdisjoint(splits.indices["train"])
        for part in (splits.train, splits.val, splits.test):
            x, y = part[3]
            assert x.shape == (3, 32, 32)
            red00 = x[0, 0, 0] * 0.2470 + 0.4914  # undo the fixed CIFAR-10 normalisation
            assert round(red00.item() * 255) == y.item()
    big = load_splits(f"cifar10:{tmp_path}", 64)
    assert big.test[0][0].shape == (3, 64, 64)
    assert torch.isfinite(big.test[0][0]).all()


def test_cifar100_from_local_pickles(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 200), ("test", 50)):
        labels = [k % 100 for k in range(n)]
        data = np.zeros((n, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"fine_labels": labels, "coarse_labels": [0] * n, "data": data}, f)
    splits = load_splits(f"cifar100:{tmp_path}", 32)
    assert splits.num_classes == 100
    assert (len(splits.train), len(splits.val), len(splits.test)) == (100, 100, 50)  # 2 a class: 1 to val
    assert [int(splits.test[k][1]) for k in range(3)] == [0, 1, 2]


def _python2_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch pickled as the official files are: Python 2, numpy.core names, pixels as a byte string."""

    def short(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b

    n, raw = len(data), data.tobytes()
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + short(b"b") + b"\x87R"
        + b"(K\x01M" + struct.pack("<H", n) + b"M" + struct.pack("<H", 3072) + b"\x86"
        + b"cnumpy\ndtype\n" + short(b"u1") + b"K\x00K\x01\x87R"
        + b"(K\x03" + short(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        + b"\x89T" + struct.pack("<i", len(raw)) + raw + b"tb"
    )  # fmt: skip
    label_list = b"](" + b"".join(b"K" + bytes([label]) for label in labels) + b"e"
    return b"\x80\x02}(" + short(b"data") + array + short(b"labels") + label_list + b"u."


def test_cifar10_reads_python2_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    data = (np.arange(10 * 3072) % 251).astype(np.uint8).reshape(10, 3072)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(_python2_batch(data, list(range(10))))
    splits = load_splits(f"cifar10:{folder}", 32)
    x, y = splits.test[7]
    mean, std = torch.tensor(CIFAR10_MEAN).view(3, 1, 1), torch.tensor(CIFAR10_STD).view(3, 1, 1)
    pixels = ((x * std + mean) * 255).round().to(torch.uint8)
    assert y.item() == 7 and torch.equal(pixels.flatten(), torch.from_numpy(data[7]))


def test_missing_cifar_folder_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match="nowhere") as err:
        load_splits(f"cifar10:{missing}", 32)
    assert "data_batch_1" in str(err.value) and "\n" not in str(err.value)


def test_cifar_pickle_that_would_run_code_is_refused(tmp_path):
    folder = _write_fake_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": Evil(), "labels": []}, f)
    with pytest.raises(UserError, match="not a CIFAR python batch"):
        load_splits(f"cifar10:{tmp_path}", 32)


def test_cifar_eval_outputs_are_the_raw_pixels_normalised(tmp_path):
    """What the val and test splits give at 32 px: the old tensor path's values, with or without aug."""
    folder = _write_fake_cifar10(tmp_path)
    with open(folder / "test_batch", "rb") as f:
        raw = pickle.load(f)["data"]
    mean, std = torch.tensor(CIFAR10_MEAN).view(3, 1, 1), torch.tensor(CIFAR10_STD).view(3, 1, 1)
    for aug in ("none", "light"):
        splits = load_splits(f"cifar10:{tmp_path}", 32, aug=aug)
        for k in (0, 7):
            expected = (torch.from_numpy(raw[k]).view(3, 32, 32).float() / 255 - mean) / std
            assert torch.allclose(splits.test[k][0], expected, atol=1e-6)
            # the eval transform of the PIL path (ImageFolder's) agrees at CIFAR's own size
            image = Image.fromarray(raw[k].reshape(3, 32, 32).transpose(1, 2, 0))
            assert torch.allclose(eval_transform(32, CIFAR10_MEAN, CIFAR10_STD)(image), expected, atol=1e-6)
        assert torch.equal(splits.val[3][0], splits.val[3][0])


def test_cifar_train_split_is_augmented(tmp_path):
    _write_fake_cifar10(tmp_path)
    plain = load_splits(f"cifar10:{tmp_path}", 32)
    light = load_splits(f"cifar10:{tmp_path}", 32, aug="light")
    assert light.indices == plain.indices
    reads = [light.train[5] for _ in range(4)]
    assert all(x.shape == (3, 32, 32) and y == plain.train[5][1] for x, y in reads)
    assert any(not torch.equal(reads[0][0], x) for x, _ in reads[1:])
    assert torch.equal(plain.train[5][0], plain.train[5][0])
    assert load_splits(f"cifar10:{tmp_path}", 24, aug="deit").train[0][0].shape == (3, 24, 24)


# --- ImageFolder ----------------------------------------------------------------------------------------


def _write_pngs(root, per_class=10):
    for c, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        (root / f"class{c}").mkdir(parents=True)
        for k in range(per_class):
            Image.new("RGB", (20 + k, 16), colour).save(root / f"class{c}" / f"{k}.png")


def test_imagefolder_carves_stratified_splits(tmp_path):
    _write_pngs(tmp_path)
    splits = load_splits(f"imagefolder:{tmp_path}", 24, seed=0)
    assert splits.num_classes == 2
    assert sum(len(p) for p in (splits.train, splits.val, splits.test)) == 20
    for part in (splits.train, splits.val, splits.test):
        assert {int(part[i][1]) for i in range(len(part))} == {0, 1}
    x, y = splits.val[0]
    assert x.shape == (3, 24, 24)
    red_minus_blue = (x[0] * 0.229 + 0.485 - (x[2] * 0.225 + 0.406)).mean().item()
    assert red_minus_blue == pytest.approx(1.0 if y == 0 else -1.0, abs=1e-3)
    assert splits.indices == load_splits(f"imagefolder:{tmp_path}", 24, seed=0).indices


def test_imagefolder_uses_train_and_val_folders_as_they_are(tmp_path):
    _write_pngs(tmp_path / "train", per_class=4)
    _write_pngs(tmp_path / "val", per_class=2)
    splits = load_splits(f"imagefolder:{tmp_path}", 16)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 4, 4)
    assert splits.indices is None and splits.num_classes == 2


def test_imagefolder_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="not a folder"):
        load_splits(f"imagefolder:{tmp_path / 'missing'}", 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="one sub-folder of images per class"):
        load_splits(f"imagefolder:{tmp_path / 'empty'}", 16)


def _write_noise_pngs(root, classes=4, per_class=6, size=40):
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for k in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{k}.png")


@pytest.mark.parametrize("aug", ["none", "light", "deit"])
def test_imagefolder_augments_train_only(tmp_path, aug):
    _write_noise_pngs(tmp_path)
    splits = load_splits(f"imagefolder:{tmp_path}", 32, seed=0, aug=aug)
    assert splits.indices == load_splits(f"imagefolder:{tmp_path}", 32, seed=0).indices
    files = sorted(tmp_path.glob("class*/*.png"))  # ImageFolder's order
    evaluate = eval_transform(32, IMAGENET_MEAN, IMAGENET_STD)
    for name in ("train", "val", "test"):
        part, rows = getattr(splits, name), splits.indices[name]
        reads = [part[1] for _ in range(4)]
        assert all(x.shape == (3, 32, 32) and y == int(files[rows[1]].parent.name[-1]) for x, y in reads)
        unchanged = evaluate(Image.open(files[rows[1]]).convert("RGB"))
        if name == "train" and aug != "none":
            assert any(not torch.equal(reads[0][0], x) for x, _ in reads[1:])
        else:
            assert all(torch.equal(x, unchanged) for x, _ in reads)


def test_imagefolder_train_folder_is_augmented_and_val_folder_is_not(tmp_path):
    _write_noise_pngs(tmp_path / "train", classes=2, per_class=3)
    _write_noise_pngs(tmp_path / "val", classes=2, per_class=2)
    splits = load_splits(f"imagefolder:{tmp_path}", 16, aug="light")
    train = [splits.train[0][0] for _ in range(4)]
    assert any(not torch.equal(train[0], x) for x in train[1:])
    assert torch.equal(splits.val[0][0], splits.val[0][0]) and splits.test is splits.val


def test_bad_aug_is_a_user_error():
    with pytest.raises(UserError, match="--aug 'strong': expected one of none, light, deit"):
        load_splits("digits", 8, aug="strong")


# --- validation subsets ----------------------------------------------------------------------------------


def test_digits_val_subset_is_balanced_fixed_and_stays_a_tensor_dataset():
    full = load_splits("digits", 8, seed=0)
    a = load_splits("digits", 8, seed=0, val_subset=50)
    b = load_splits("digits", 8, seed=0, val_subset=50)
    assert (a.val_subset, full.val_subset) == (50, None)
    assert torch.bincount(a.val.tensors[1], minlength=10).tolist() == [5] * 10
    assert torch.equal(a.val.tensors[0], b.val.tensors[0]) and a.indices == b.indices
    assert set(a.indices["val"]) < set(full.indices["val"])
    # the kept rows are the ones the indices name
    position = {row: k for k, row in enumerate(full.indices["val"])}
    assert torch.equal(a.val.tensors[0], full.val.tensors[0][[position[r] for r in a.indices["val"]]])
    assert a.labels("val") == a.val.tensors[1].tolist()
    assert load_splits("digits", 8, seed=1, val_subset=50).indices["val"] != a.indices["val"]
    assert len(load_splits("digits", 8, val_subset=10_000).val) == len(full.val)


@pytest.mark.parametrize("n", [0, -3, 9])
def test_val_subset_smaller_than_the_classes_is_refused(n):
    with pytest.raises(UserError, match="--val-subset") as err:
        load_splits("digits", 8, val_subset=n)
    assert "\n" not in str(err.value)


def test_cifar_and_imagefolder_val_subsets(tmp_path):
    (tmp_path / "cifar").mkdir()
    _write_fake_cifar10(tmp_path / "cifar", per_batch=40)  # 20 a class in the train pool, 2 of them to val
    cifar = load_splits(f"cifar10:{tmp_path / 'cifar'}", 32, val_subset=10)
    assert len(cifar.val) == 10 and sorted(cifar.labels("val")) == list(range(10))
    assert [int(cifar.val[k][1]) for k in range(10)] == cifar.labels("val")
    _write_noise_pngs(tmp_path / "images", classes=3, per_class=20)
    images = load_splits(f"imagefolder:{tmp_path / 'images'}", 16, val_subset=4)
    assert sorted(images.labels("val")) in ([0, 0, 1, 2], [0, 1, 1, 2], [0, 1, 2, 2])
    assert [int(images.val[k][1]) for k in range(4)] == images.labels("val")
    assert images.labels("train") == [int(images.train[k][1]) for k in range(len(images.train))]


def test_balanced_subset_spreads_what_small_classes_cannot_give():
    labels = [0] * 2 + [1] * 10 + [2] * 10
    keep = balanced_subset(labels, 13, seed=0)
    assert sorted(np.bincount([labels[i] for i in keep]).tolist()) == [2, 5, 6]
    assert keep == sorted(keep) == balanced_subset(labels, 13, seed=0)
    assert balanced_subset(labels, 13, seed=1) != keep
    assert balanced_subset(labels, 100, seed=0) == list(range(22))


# --- specs ----------------------------------------------------------------------------------------------


def test_parse_good_specs(tmp_path):
    assert parse_data_spec("digits") == DataSpec("digits")
    spec = parse_data_spec(f"cifar100:{tmp_path}")
    assert (spec.kind, spec.path, spec.seed) == ("cifar100", str(tmp_path), 0)
    assert parse_data_spec("imagefolder:rel/dir").path == os.path.abspath("rel/dir")
    assert "CIFAR-100" in spec.describe() and str(tmp_path) in spec.describe()


@pytest.mark.parametrize(
    "bad", ["", "mnist", "cifar10", "cifar10:", "digits:/x", "CIFAR10:/x", "imagenet:/x"]
)
def test_bad_specs_name_the_spec_and_the_allowed_forms(bad):
    with pytest.raises(UserError) as err:
        parse_data_spec(bad)
    message = str(err.value)
    assert repr(bad) in message and "cifar10:PATH" in message and "imagefolder:PATH" in message


def test_spec_dict_round_trips_through_json(tmp_path):
    spec = DataSpec("cifar10", str(tmp_path), seed=7)
    d = json.loads(json.dumps(spec.to_dict()))
    assert DataSpec.from_dict(d) == spec
    assert parse_data_spec(d["spec"]) == DataSpec("cifar10", str(tmp_path))
    assert load_splits(DataSpec("digits", seed=4), 8).spec.seed == 4
    assert load_splits(DataSpec("digits", seed=4), 8, seed=2).spec == DataSpec("digits", seed=2)
    with pytest.raises(UserError, match="unknown data kind"):
        DataSpec.from_dict({"kind": "svhn", "path": "/x"})
