"""Mixed precision: ``torch.autocast`` for bf16/fp16 forwards, a gradient scaler for fp16.

bf16 keeps fp32's exponent range, so it needs no loss scaling and runs on CPUs too; fp16 does
need scaling and is only fast on CUDA, so it is refused elsewhere. Weights, gradients and
optimizer state stay fp32 in every mode.
"""

from __future__ import annotations

import contextlib

import torch

from nas.errors import UserError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device) -> None:
    """A one-line refusal of a precision the device cannot train in."""
    if precision == "fp16" and device.type != "cuda":
        raise UserError(
            f"--precision fp16 needs a CUDA device (this run is on {device}): use --precision bf16 on CPUs"
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16 support; use fp16")


def autocast(device: torch.device, precision: str):
    """The forward's autocast context (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Scales fp16 losses so small gradients do not underflow; disabled (a pass-through) otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
