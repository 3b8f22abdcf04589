"""Named augmentation presets for training, on top of timm's data API.

One table says what each preset does; the transforms, the mixup object, the digits shift and the
record kept in checkpoint sidecars are all read from it, so they cannot disagree. torchvision and timm
are imported inside the functions: importing this module costs nothing.
"""

import copy

from nas.errors import UserError

AUG_PRESETS = ("none", "light", "deit")

_PRESETS = {
    "none": {
        "random_resized_crop": None,
        "hflip": 0.0,
        "rand_augment": None,
        "interpolation": "bilinear",
        "random_erasing": None,
        "mixup": None,
        "digits_shift": 0,
    },
    # timm's default crop scale (0.08, 1) throws away too much of a small dataset's images
    "light": {
        "random_resized_crop": {"scale": (0.35, 1.0)},
        "hflip": 0.5,
        "rand_augment": None,
        "interpolation": "bilinear",
        "random_erasing": None,
        "mixup": None,
        "digits_shift": 2,
    },
    # the DeiT recipe (Touvron et al. 2021)
    "deit": {
        "random_resized_crop": {"scale": (0.08, 1.0)},
        "hflip": 0.5,
        "rand_augment": "rand-m9-mstd0.5-inc1",
        "interpolation": "bicubic",
        "random_erasing": {"prob": 0.25, "mode": "pixel"},
        "mixup": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "prob": 1.0, "switch_prob": 0.5, "mode": "batch"},
        "digits_shift": 2,
    },
}


def check(preset: str) -> str:
    """The preset name itself, or a one-line UserError naming the choices."""
    if preset not in _PRESETS:
        raise UserError(f"--aug {preset!r}: expected one of {', '.join(AUG_PRESETS)}")
    return preset


def eval_transform(image_size: int, mean, std):
    """Resize the short side to `image_size`, centre-crop a square, normalise: PIL image in, tensor out.

    A 32 px CIFAR image at `image_size` 32 passes through at its own pixels.
    """
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(image_size),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


def train_transform(preset: str, image_size: int, mean, std):
    """The random transform of the train split (PIL image in, normalised tensor out)."""
    settings = _PRESETS[check(preset)]
    if settings["random_resized_crop"] is None:
        return eval_transform(image_size, mean, std)
    from timm.data import create_transform

    erasing = settings["random_erasing"] or {"prob": 0.0, "mode": "const"}
    transform = create_transform(
        input_size=image_size,
        is_training=True,
        scale=settings["random_resized_crop"]["scale"],
        hflip=settings["hflip"],
        color_jitter=None,  # DeiT has none once RandAugment is on; light has none at all
        auto_augment=settings["rand_augment"],
        interpolation=settings["interpolation"],
        mean=tuple(mean),
        std=tuple(std),
        re_prob=erasing["prob"],
        re_mode=erasing["mode"],
        re_count=1,
    )
    for step in transform.transforms:
        for op in getattr(step, "ops", ()):  # RandAugment's operations
            if op.name == "PosterizeIncreasing":
                op.aug_fn = _posterize
    return transform


def _posterize(image, bits: int, **_):
    """Posterize that keeps 0 bits as older Pillow did (a black image) instead of raising.

    timm's PosterizeIncreasing asks for 0 bits whenever RandAugment's magnitude noise reaches 10
    (m9, mstd 0.5: about 2% of draws), and Pillow 13 refuses that, which would end a training run.
    """
    from PIL import Image, ImageOps

    if bits < 1:
        return Image.new(image.mode, image.size)
    return image if bits >= 8 else ImageOps.posterize(image, bits)


def mixup(preset: str, num_classes: int, label_smoothing: float = 0.0):
    """A `timm.data.Mixup` for presets that mix batches (it wants even batches and soft-target loss), else None."""
    settings = _PRESETS[check(preset)]["mixup"]
    if settings is None:
        return None
    from timm.data import Mixup

    return Mixup(**settings, label_smoothing=label_smoothing, num_classes=num_classes)


def digits_shift(preset: str) -> int:
    """Pixels of random translation for the in-memory digits batches (`nas.training.batches.shift_images`)."""
    return _PRESETS[check(preset)]["digits_shift"]


def describe(preset: str) -> dict:
    """What the preset does, JSON-safe (lists, not tuples), for checkpoint sidecars."""
    settings = copy.deepcopy(_PRESETS[check(preset)])
    crop = settings["random_resized_crop"]
    if crop is not None:
        crop["scale"] = list(crop["scale"])
    return {"preset": preset, **settings}
