"""The one hyperparameter object of every training run: the supernet, ``vitnas train``, ``vitnas finetune``.

What a run trains is fixed by ``TrainConfig``; where it runs (device, number of processes) is not, so
a checkpoint can continue on other hardware. ``batch_size`` is the *global* batch: each optimizer
step sees that many images, split over ``world size x accum_steps`` micro-batches, so the same
config gives the same optimisation on one process or eight.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from nas.errors import UserError
from nas.training.augment import AUG_PRESETS

PRECISIONS = ("fp32", "bf16", "fp16")
SMALLEST_KINDS = ("fixed", "random")
SAMPLINGS = ("uniform", "fair")
DISTILLS = ("largest", "none")
#: settings only the supernet's sandwich step reads: a plain model trained with any values of them
#: learns the same (``nas.ranking`` caches stand-alone runs without them)
SUPERNET_ONLY = (
    "random_subnets", "smallest_kinds", "subnet_label_weight", "sampling", "distill", "progressive_epochs", "pin",
)  # fmt: skip
#: settings a resumed run may change: they do not change what is being optimised
RESUMABLE_CHANGES = ("epochs", "precision", "compile", "accum_steps", "loader_workers")


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters. The supernet defaults train psvit-digits in about 10 minutes on a 2-core CPU
    (6-8 s an epoch) to about 99% (largest) and 87-90% (the space's smallest) validation accuracy."""

    epochs: int = 80
    batch_size: int = 64  # global: per-process micro-batch x processes x accum_steps
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    grad_clip: float = 5.0
    seed: int = 0
    aug: str = "light"  # augmentation preset: none, light or deit (nas.training.augment)
    precision: str = "fp32"  # fp32, bf16 (autocast) or fp16 (autocast and a gradient scaler; CUDA only)
    accum_steps: int = 1  # micro-batches accumulated per process before one optimizer step
    compile: bool = False  # torch.compile the model (plain models; a supernet changes shape every step)
    loader_workers: int = 2  # DataLoader processes for datasets read from disk (digits stays in memory)
    # -- the sandwich rule (supernet only) --
    # 4 rather than 2: on psvit-digits it raised the Kendall tau of inherited against stand-alone accuracy
    # on each of three supernet seeds (mean 0.62 against 0.48) for 1.5x the training cost
    # (benchmarks/results/supernet_ranking_more_subnets.json)
    random_subnets: int = 4
    # "random": the smallest subnet of each step keeps the smallest sizes but draws its kinds
    # (attention, pooling, clustering method) at random; "fixed": the space's smallest every step.
    # Fixed kinds train the smallest's pooling and attention paths every step and the others only
    # in random draws, which biases inherited accuracy towards subnets that share those kinds.
    smallest_kinds: str = "random"
    # weight of the hard-label cross-entropy added to the other subnets' distillation loss (OFA
    # uses both); it lifts the small subnets while the largest is still a poor teacher
    subnet_label_weight: float = 1.0
    # how the random subnets' choices are drawn: "uniform" draws each choice afresh; "fair" deals each
    # choice's options from a shuffled deck, so every option is trained equally often (FairNAS's strict
    # fairness, Chu et al. 2021)
    sampling: str = "uniform"
    # what the smaller subnets learn from: "largest" (in-place distillation, BigNAS) or "none" (labels)
    distill: str = "largest"
    # progressive shrinking (OFA, Cai et al. 2020): over the first N epochs the size choices open from
    # the largest option down, so small subnets join once the large ones have learnt; 0: off
    progressive_epochs: float = 0.0
    # "CHOICE=VALUE" (e.g. "s1.pool=tome"): train only the part of the space with that kind, one
    # sub-supernet of a few-shot split (Zhao et al. 2021); "": the whole space
    pin: str = ""

    def __post_init__(self):
        checks = [
            ("epochs", self.epochs >= 1, "at least 1"), ("batch_size", self.batch_size >= 1, "at least 1"),
            ("lr", self.lr > 0, "positive"), ("min_lr", 0 <= self.min_lr <= self.lr, "between 0 and lr"),
            ("weight_decay", self.weight_decay >= 0, "0 or more"), ("warmup_epochs", self.warmup_epochs >= 0, "0 or more"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)"), ("grad_clip", self.grad_clip > 0, "positive"),
            ("aug", self.aug in AUG_PRESETS, f"one of {', '.join(AUG_PRESETS)}"),
            ("precision", self.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
            ("accum_steps", self.accum_steps >= 1, "at least 1"), ("loader_workers", self.loader_workers >= 0, "0 or more"),
            ("random_subnets", self.random_subnets >= 0, "0 or more"),
            ("smallest_kinds", self.smallest_kinds in SMALLEST_KINDS, f"one of {', '.join(SMALLEST_KINDS)}"),
            ("sampling", self.sampling in SAMPLINGS, f"one of {', '.join(SAMPLINGS)}"),
            ("distill", self.distill in DISTILLS, f"one of {', '.join(DISTILLS)}"),
            ("progressive_epochs", 0 <= self.progressive_epochs <= self.epochs, "between 0 and --epochs"),
            ("pin", not self.pin or self.pin.count("=") == 1, "CHOICE=VALUE, e.g. s1.pool=tome"),
        ]  # fmt: skip
        for name, ok, allowed in checks:
            if not ok:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: expected {allowed}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def micro_batch(self, world_size: int) -> int:
        """Images per process per micro-batch; the global batch must split evenly."""
        parts = world_size * self.accum_steps
        if self.batch_size % parts:
            raise UserError(
                f"--batch-size {self.batch_size} does not split over {world_size} process(es) x "
                f"{self.accum_steps} accumulation step(s): use a multiple of {parts}"
            )
        return self.batch_size // parts

    def changes_on_resume(self, saved: dict) -> list[str]:
        """Settings that differ from a checkpoint's and would change what is optimised."""
        return [
            f"{k} {saved[k]} -> {v}"
            for k, v in self.to_dict().items()
            if k in saved and k not in RESUMABLE_CHANGES and saved[k] != v
        ]
