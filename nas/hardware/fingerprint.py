"""What a latency depends on besides the architecture: the machine, the software and the threads.

Every cached measurement is keyed by the digest of this fingerprint, so results are shared between
campaigns on the same kind of machine and never mixed across different ones. A CPU target leaves
the GPU fields empty: its latency does not depend on the GPU, so CPU results stay shareable.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass

import torch

from nas.hardware.runtimes import runtime_version
from nas.hardware.target import Target


@dataclass(frozen=True)
class Fingerprint:
    cpu_model: str
    cores: int
    machine: str
    system: str
    torch_version: str
    threads: int | None
    gpu_name: str | None = None
    gpu_driver: str | None = None
    cuda_version: str | None = None
    runtime: str | None = None  # the deployment runtime and its version ("onnxruntime 1.32.0"), if any

    def to_dict(self) -> dict:
        data = asdict(self)
        if data["runtime"] is None:
            del data["runtime"]  # eager and compile keep the digests they always had
        return data

    def digest(self) -> str:
        """Short stable hash of every field (sha256 of the sorted JSON, 16 hex digits)."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint(target: Target) -> Fingerprint:
    """The fingerprint that a measurement on ``target`` from this process is keyed by."""
    target.require_available()
    gpu = {}
    if target.torch_device.type == "cuda":
        gpu = {
            "gpu_name": torch.cuda.get_device_name(target.torch_device),
            "gpu_driver": _gpu_driver(target.torch_device.index or 0),
            "cuda_version": torch.version.cuda,
        }
    return Fingerprint(
        cpu_model=cpu_model(),
        cores=_cores(),
        machine=platform.machine(),
        system=platform.system(),
        torch_version=torch.__version__,
        threads=target.threads,
        runtime=runtime_version(target.backend),
        **gpu,
    )


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cores() -> int:
    """Cores this process may run on (its affinity, as in a container), not the whole host."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@functools.cache
def _gpu_driver(index: int) -> str:
    """The NVIDIA driver version from nvidia-smi (torch does not expose it); 'unknown' without it."""
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--id={index}", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"
