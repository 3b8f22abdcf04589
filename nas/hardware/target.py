"""Where and how a latency is measured: device, threads, dtype, batch, resolution, backend.

A target is written as one string so that it fits a CLI flag, a YAML field and a cache key::

    TARGET  := DEVICE [":" OPTIONS]
    DEVICE  := "cpu" | "cuda" | "cuda:" INDEX          ("cuda" means "cuda:0")
    OPTIONS := KEY "=" VALUE ("," KEY "=" VALUE)*

    key         devices    values                                  default
    threads     cpu        positive integer                        torch.get_num_threads() at parse time
    dtype       cpu, cuda  float32 | float16 | bfloat16            float32
    batch       cpu, cuda  positive integer                        1
    resolution  cpu, cuda  positive integer (square images)        the architecture's own image size
    backend     cpu, cuda  eager | compile | onnxruntime |         eager
                           openvino (cpu) | tensorrt (cuda)

Examples: ``cpu:threads=2,batch=1``, ``cuda:0:dtype=float16,batch=8,backend=compile``,
``cpu:threads=4,batch=32,resolution=224``, ``cpu:threads=2,backend=onnxruntime``. The backends
are the runtimes of ``nas.hardware.runtimes``. ``str(target)`` writes every key (``resolution`` only
when set) in the order above, and parses back to an equal target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nas.errors import UserError
from nas.hardware.runtimes import BACKENDS, require_runtime

DTYPES = ("float32", "float16", "bfloat16")
_KEYS = {
    "cpu": ("threads", "dtype", "batch", "resolution", "backend"),
    "cuda": ("dtype", "batch", "resolution", "backend"),
}


@dataclass(frozen=True)
class Target:
    """One measurement setting; ``resolution=None`` means the architecture's own image size."""

    device: str = "cpu"
    threads: int | None = None
    dtype: str = "float32"
    batch: int = 1
    resolution: int | None = None
    backend: str = "eager"

    def __post_init__(self) -> None:
        # CPU latency depends on the thread count, so it is always explicit (and part of the key).
        if self.device == "cpu" and self.threads is None:
            object.__setattr__(self, "threads", torch.get_num_threads())

    @classmethod
    def parse(cls, text: str) -> Target:
        """Parse the grammar in the module docstring; a bad string raises a one-line UserError."""
        device, options = _split_device(text)
        kind = device.split(":")[0]
        values: dict[str, str] = {}
        for item in options.split(",") if options else ():
            key, sep, value = (part.strip() for part in item.partition("="))
            if not sep or not key or not value:
                raise _bad(text, f"option {item.strip()!r} is not key=value")
            if key not in _KEYS[kind]:
                raise _bad(text, f"unknown key {key!r} for {kind} (allowed: {', '.join(_KEYS[kind])})")
            if key in values:
                raise _bad(text, f"key {key!r} given twice")
            values[key] = value
        return cls(
            device=device,
            threads=_positive(text, values, "threads"),
            dtype=_choice(text, values, "dtype", DTYPES),
            batch=_positive(text, values, "batch") or 1,
            resolution=_positive(text, values, "resolution"),
            backend=_choice(text, values, "backend", BACKENDS),
        )

    def __str__(self) -> str:
        options = [f"threads={self.threads}"] if self.device == "cpu" else []
        options += [f"dtype={self.dtype}", f"batch={self.batch}"]
        if self.resolution is not None:
            options.append(f"resolution={self.resolution}")
        options.append(f"backend={self.backend}")
        return f"{self.device}:{','.join(options)}"

    def key(self) -> str:
        """Stable cache key: the canonical string, which names every setting explicitly."""
        return str(self)

    def require_available(self) -> None:
        """Fail with a one-line UserError, before any work, when this machine cannot run the target."""
        require_runtime(self.backend, self.torch_device, self.torch_dtype)
        if self.device == "cpu":
            return
        if not torch.cuda.is_available():
            raise UserError(f"target {self} needs CUDA, which is not available on this machine")
        if self.torch_device.index >= torch.cuda.device_count():
            raise UserError(
                f"target {self}: no GPU {self.torch_device.index} here ({torch.cuda.device_count()} found)"
            )

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def input_shape(self, image_size: int, channels: int = 3) -> tuple[int, int, int, int]:
        """The NCHW input measured: the target's resolution if set, else the model's ``image_size``."""
        side = self.resolution or image_size
        return (self.batch, channels, side, side)


def _split_device(text: str) -> tuple[str, str]:
    """Split ``cuda:1:batch=2`` into (``cuda:1``, ``batch=2``); normalise ``cuda`` to ``cuda:0``."""
    parts = [part.strip() for part in text.strip().split(":")]
    kind = parts[0]
    if kind not in _KEYS:
        raise _bad(text, f"unknown device {kind!r} (allowed: cpu, cuda, cuda:N)")
    rest = parts[1:]
    device = kind
    if kind == "cuda":
        index = rest.pop(0) if rest and "=" not in rest[0] else "0"
        if not index.isdigit():
            raise _bad(text, f"cuda index {index!r} is not a non-negative integer")
        device = f"cuda:{int(index)}"
    if len(rest) > 1:
        raise _bad(text, f"unexpected {':'.join(rest[1:])!r} after the options (separate options by ',')")
    return device, rest[0] if rest else ""


def _positive(text: str, values: dict[str, str], key: str) -> int | None:
    if key not in values:
        return None
    value = values[key]
    if not value.isdigit() or int(value) < 1:
        raise _bad(text, f"{key}={value!r} is not a positive integer")
    return int(value)


def _choice(text: str, values: dict[str, str], key: str, allowed: tuple[str, ...]) -> str:
    value = values.get(key, allowed[0])
    if value not in allowed:
        raise _bad(text, f"{key}={value!r} (allowed: {', '.join(allowed)})")
    return value


def _bad(text: str, reason: str) -> UserError:
    return UserError(f"bad target {text!r}: {reason}")
