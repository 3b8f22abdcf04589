"""The runtime a target's ``backend`` names: how the measured model runs, as it will be deployed.

- ``eager``: the PyTorch module as it is.
- ``compile``: ``torch.compile`` (falls back to eager, with the reason recorded, when it fails).
- ``onnxruntime``: the model exported to ONNX (``nas.onnx_export``: checked once against PyTorch's
  outputs), run by an ONNX Runtime session: the CPU provider with the target's threads, the CUDA
  provider on a GPU target.
- ``openvino``: the same ONNX file compiled by OpenVINO for the CPU (x86), batch fixed to the
  target's, with the target's threads and the latency hint.
- ``tensorrt``: the ONNX file run by ONNX Runtime's TensorRT provider (NVIDIA GPUs, onnxruntime-gpu
  built with TensorRT).

``prepare`` returns the call that the measurement protocol (``nas.hardware.measure``) times, so the
warm-up, repeat and noise rules are the same for every runtime. The exported runtimes take float32
inputs; their outputs are compared with PyTorch's within ``ATOL`` before any timing.

A runtime that is not installed is a ``UserError`` before anything is measured
(``require_runtime``); a model the runtime cannot export or run (an op it lacks, outputs that
differ) is a ``RuntimeUnsupported``: one line naming the runtime and the op, which a campaign records
as that candidate's failure.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nas.errors import UserError, one_line

EXPORTED = ("onnxruntime", "openvino", "tensorrt")  # backends that run an exported ONNX file
BACKENDS = ("eager", "compile", *EXPORTED)
ATOL = 1e-4  # the largest |runtime - PyTorch| accepted on the check batch
_DISTRIBUTIONS = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu"), "openvino": ("openvino",)}
_EXTRAS = {"onnxruntime": "onnx", "tensorrt": "onnx", "openvino": "openvino"}


class RuntimeUnsupported(UserError):
    """The runtime cannot export or run this model (the candidate's failure, not the campaign's)."""


@dataclass
class Prepared:
    """The call to time, the backend it runs on, why another than the one asked for (if so), and
    what must live as long as the call (the exported file's folder)."""

    forward: Callable[[], object]
    backend: str
    fallback: str | None = None
    keep: list = field(default_factory=list)

    def close(self) -> None:
        for item in self.keep:
            item.cleanup()
        self.keep.clear()


def runtime_version(backend: str) -> str | None:
    """``"onnxruntime 1.32.0"`` for an exported backend (what the fingerprint records), None for
    eager and compile (torch's version is in the fingerprint already)."""
    if backend not in EXPORTED:
        return None
    package = "openvino" if backend == "openvino" else "onnxruntime"
    for dist in _DISTRIBUTIONS[package]:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return f"{package} {importlib.metadata.version(dist)}"
    raise UserError(
        f"backend={backend} needs {package}, which is not installed: pip install 'vitnas[{_EXTRAS[backend]}]'"
    )


def require_runtime(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    """``UserError`` before any work when this machine cannot run ``backend`` for that device and dtype."""
    if backend not in EXPORTED:
        return
    runtime_version(backend)
    if backend == "onnxruntime" or backend == "tensorrt":
        from nas.onnx_export import require_onnx

        require_onnx()
    if dtype != torch.float32:
        raise UserError(f"backend={backend} measures float32 models (the exported ONNX graph): drop dtype=")
    if backend == "openvino" and device.type != "cpu":
        raise UserError("backend=openvino runs on the CPU: use a cpu target")
    if backend == "tensorrt":
        if device.type != "cuda":
            raise UserError("backend=tensorrt runs on NVIDIA GPUs: use a cuda target")
        _, ort = require_onnx()
        if "TensorrtExecutionProvider" not in ort.get_available_providers():
            raise UserError(
                f"{runtime_version(backend)}: no TensorrtExecutionProvider here "
                "(install onnxruntime-gpu built with TensorRT)"
            )


def prepare(model: nn.Module, x: torch.Tensor, backend: str, threads: int | None, timer) -> Prepared:
    """Make ``model`` ready to run ``x`` on ``backend`` and run the first (untimed) call through
    ``timer``; ``Prepared.close()`` frees what the runtime holds."""
    if backend == "compile":
        return _compiled(model, x, timer)
    if backend in EXPORTED:
        return _exported(model, x, backend, threads, timer)
    eager = functools.partial(model, x)
    timer(eager)
    return Prepared(eager, "eager")


def _compiled(model: nn.Module, x: torch.Tensor, timer) -> Prepared:
    from nas.hardware.measure import MeasureTimeout

    # Dynamo stops compiling a forward after a few recompilations and silently runs it eager;
    # a campaign measures many models of one class, so each starts from an empty cache.
    torch._dynamo.reset()
    try:
        compiled = functools.partial(torch.compile(model), x)
        timer(compiled)  # compiles
        return Prepared(compiled, "compile")
    except MeasureTimeout:
        raise
    except Exception as err:
        fallback = f"torch.compile failed, measured eager: {type(err).__name__}: {one_line(err)}"
    eager = functools.partial(model, x)
    timer(eager)
    return Prepared(eager, "eager", fallback)


def _exported(model: nn.Module, x: torch.Tensor, backend: str, threads: int | None, timer) -> Prepared:
    from nas.onnx_export import export_onnx

    folder = tempfile.TemporaryDirectory(prefix="vitnas-runtime-")
    prepared = Prepared(lambda: None, backend, keep=[folder])
    try:
        with torch.inference_mode(False), _unsupported(backend, "export"):
            # the ONNX file is checked against PyTorch's outputs with ONNX Runtime's CPU provider
            check = export_onnx(model, Path(folder.name) / "model.onnx", tuple(x.shape[1:]), atol=ATOL)
        expected = model(x).detach().float().cpu().numpy()
        inputs = x.detach().cpu().numpy()
        with _unsupported(backend, "load"):
            run = runtime_call(check.path, inputs, backend, threads, x.device)
        with _unsupported(backend, "run"):
            got = np.asarray(run()[0])
        diff = float(np.abs(got - expected).max())
        if not diff <= ATOL:
            raise RuntimeUnsupported(
                f"{runtime_version(backend)}: outputs differ from PyTorch's by {diff:.3g} (> {ATOL:g})"
            )
        prepared.forward = run
        timer(run)
        return prepared
    except BaseException:
        prepared.close()
        raise


def runtime_call(path: Path, inputs: np.ndarray, backend: str, threads: int | None, device: torch.device):
    """A call running the ONNX file at ``path`` on ``inputs`` with ``backend``'s runtime; returns its outputs."""
    if backend == "openvino":
        return _openvino(path, inputs, threads)
    return _onnxruntime(path, inputs, backend, threads, device)


def _onnxruntime(path: Path, inputs: np.ndarray, backend: str, threads: int | None, device: torch.device):
    from nas.onnx_export import require_onnx

    _, ort = require_onnx()
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if backend == "tensorrt":
        providers = [("TensorrtExecutionProvider", {"device_id": device.index or 0}), "CUDAExecutionProvider"]
    elif device.type == "cuda":
        providers = [("CUDAExecutionProvider", {"device_id": device.index or 0})]
    session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    feed = {session.get_inputs()[0].name: inputs}
    return functools.partial(session.run, None, feed)


def _openvino(path: Path, inputs: np.ndarray, threads: int | None):
    import openvino as ov

    core = ov.Core()
    network = core.read_model(str(path))
    network.reshape({network.inputs[0]: list(inputs.shape)})  # a static batch: what a deployment compiles
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}  # CPUs with bf16 units default to bf16
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    request = core.compile_model(network, "CPU", config).create_infer_request()

    def run():
        return [request.infer({0: inputs})[0]]

    return run


@contextlib.contextmanager
def _unsupported(backend: str, step: str) -> Iterator[None]:
    """Any failure of the runtime's own step as one ``RuntimeUnsupported`` line naming the runtime."""
    try:
        yield
    except RuntimeUnsupported:
        raise
    except UserError as err:  # nas.onnx_export names the exporter or runtime and the op itself
        raise RuntimeUnsupported(str(err)) from None
    except Exception as err:
        raise RuntimeUnsupported(f"{runtime_version(backend)}: cannot {step} the model: {_op_line(err)}") from None


def _op_line(err: BaseException) -> str:
    """The first line of a runtime's message (they name the op and node), at most 300 characters."""
    line = one_line(err)
    return line if len(line) <= 300 else line[:297] + "..."
