"""Behaviour of the augmentation presets: shapes, randomness, what each preset leaves alone, mixup."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nas.errors import UserError
from nas.training.augment import (
    AUG_PRESETS,
    describe,
    digits_shift,
    eval_transform,
    mixup,
    train_transform,
)

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _noise(size=(40, 40), seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8))


def _normalised(rgb) -> torch.Tensor:
    return (torch.tensor(rgb) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)


@pytest.mark.parametrize("preset", AUG_PRESETS)
def test_train_transform_gives_normalised_squares(preset):
    for size in (16, 32, 48):
        x = train_transform(preset, size, MEAN, STD)(_noise((40, 60)))
        assert x.shape == (3, size, size) and x.dtype == torch.float32


def test_none_is_the_eval_transform_and_deterministic():
    image = _noise()
    a = train_transform("none", 24, MEAN, STD)(image)
    assert torch.equal(a, eval_transform(24, MEAN, STD)(image))
    assert torch.equal(a, train_transform("none", 24, MEAN, STD)(image))


@pytest.mark.parametrize("preset", ["light", "deit"])
def test_augmenting_presets_are_random(preset):
    transform, image = train_transform(preset, 32, MEAN, STD), _noise()
    outputs = [transform(image) for _ in range(4)]
    assert any(not torch.equal(outputs[0], other) for other in outputs[1:])


def test_light_only_crops_and_flips():
    """A one-colour image stays that colour: no colour ops, no random erasing."""
    transform, red = train_transform("light", 32, MEAN, STD), Image.new("RGB", (40, 40), (200, 30, 10))
    expected = _normalised((200, 30, 10)).view(3, 1, 1).expand(3, 32, 32)
    for _ in range(20):
        assert torch.allclose(transform(red), expected, atol=1e-5)


def test_deit_changes_colours_too():
    transform, red = train_transform("deit", 32, MEAN, STD), Image.new("RGB", (40, 40), (200, 30, 10))
    expected = _normalised((200, 30, 10)).view(3, 1, 1).expand(3, 32, 32)
    assert any(not torch.allclose(transform(red), expected, atol=1e-5) for _ in range(20))


def test_deit_survives_randaugment_at_its_largest_magnitude():
    """Magnitude noise can lift m9 to 10, where posterize keeps 0 bits: a black image, not an error."""
    transform = train_transform("deit", 32, MEAN, STD)
    rand_augment = next(step for step in transform.transforms if hasattr(step, "ops"))
    posterize = next(op for op in rand_augment.ops if op.name == "PosterizeIncreasing")
    posterize.magnitude, posterize.magnitude_std, posterize.prob = 10, 0, 1.0
    assert np.array(posterize(_noise())).max() == 0
    posterize.magnitude = 5
    assert len(np.unique(np.array(posterize(_noise())))) == 4  # 2 bits kept
    for seed in range(300):
        transform(_noise((24, 24), seed))


def test_eval_transform_keeps_a_32px_image_exactly_and_crops_the_centre():
    image = _noise((32, 32))
    x = eval_transform(32, MEAN, STD)(image)
    raw = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    expected = (raw - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    assert torch.allclose(x, expected, atol=1e-6)
    wide = Image.new("RGB", (60, 20), (0, 0, 255))
    wide.paste((255, 0, 0), (20, 0, 40, 20))  # red middle third: all that the centre crop keeps
    y = eval_transform(20, MEAN, STD)(wide)
    assert y.shape == (3, 20, 20)
    assert torch.allclose(y, _normalised((255, 0, 0)).view(3, 1, 1).expand(3, 20, 20), atol=1e-5)


def test_deit_mixup_gives_soft_targets():
    mix = mixup("deit", num_classes=10, label_smoothing=0.1)
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8)
    mixed, target = mix(x.clone(), y)
    assert mixed.shape == x.shape and not torch.equal(mixed, x)
    assert target.shape == (8, 10)
    assert torch.allclose(target.sum(1), torch.ones(8))
    assert (target > 0).all()  # label smoothing puts mass on every class
    assert mixup("light", 10, 0.1) is None and mixup("none", 10) is None


def test_digits_shift_and_description():
    assert [digits_shift(p) for p in AUG_PRESETS] == [0, 2, 2]
    for preset in AUG_PRESETS:
        d = describe(preset)
        assert d["preset"] == preset and json.loads(json.dumps(d)) == d
    deit = describe("deit")
    assert deit["rand_augment"] == "rand-m9-mstd0.5-inc1" and deit["random_erasing"] == {
        "prob": 0.25,
        "mode": "pixel",
    }
    assert deit["mixup"]["mixup_alpha"] == 0.8 and deit["mixup"]["cutmix_alpha"] == 1.0
    assert describe("light")["random_resized_crop"] == {"scale": [0.35, 1.0]}
    assert describe("none")["mixup"] is None


@pytest.mark.parametrize(
    "call",
    [
        lambda: train_transform("strong", 32, MEAN, STD),
        lambda: mixup("DeiT", 10, 0.1),
        lambda: digits_shift(""),
        lambda: describe("heavy"),
    ],
)
def test_bad_preset_is_a_one_line_user_error(call):
    with pytest.raises(UserError, match=r"^--aug '.*': expected one of none, light, deit$"):
        call()


def test_import_adds_nothing_heavy():
    """Only the module itself loads: torchvision and timm wait until a transform is asked for."""
    code = (
        "import json, sys, nas; before = set(sys.modules); import nas.training.augment; "
        "print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    repo = str(Path(__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo)
    new = set(json.loads(out.stdout))
    assert {m for m in new if m.startswith("nas")} <= {"nas.errors", "nas.training", "nas.training.augment"}
    assert not {m for m in new if m.split(".")[0] in ("torch", "torchvision", "timm", "numpy")}
