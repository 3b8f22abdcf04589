"""Export a model to ONNX with a dynamic batch, and prove that ONNX Runtime computes what PyTorch does.

``export_onnx(model, path, input_shape)`` (``input_shape``: one sample's, ``(C, H, W)`` for a model
of images, ``(N, C)`` for a block of tokens as the latency table times) writes the model with
torch's current exporter (``torch.onnx.export(..., dynamo=True, dynamic_shapes=...)``:
``torch.export`` then onnxscript), then ``check_onnx`` runs the file with ONNX Runtime's CPU
provider on a seeded random batch and on a batch of another size (which proves the batch dimension
is dynamic) and compares with the model's eval outputs. Works for every ``VitnasSubnet`` (all
reductions, poolings and attention kinds: their token counts are static and nothing in them
depends on the batch size) and for timm ViTs patched with ``nas.ops.timm_patch`` (ToMe in both
orders, EViT).

Why no TorchScript fallback: the dynamo exporter handles every op these models use (TopK, sort,
accumulating ScatterND, one-hot, GatherElements, SDPA), so ``dynamo=False`` is never needed.

Opset: 18 by default. The dynamo exporter writes opset 18 natively; asking for 17 makes it run
onnx's version converter, which (torch 2.14, onnxscript 0.7) cannot move reductions' ``axes``
inputs back to attributes and leaves the model at 18; ``export_onnx`` then refuses rather than
return a file that is not the opset asked for.

Failures are one-line ``UserError``s naming the tool and the op: ``torch.onnx (torch 2.14.1,
opset 18): cannot export op aten.linalg_eig ...``, ``onnxruntime 1.32.0: cannot run op TopK ...``,
``onnxruntime 1.32.0: outputs differ from PyTorch's by ...``. Without the ``onnx`` extra (onnx,
onnxscript, onnxruntime) the error says how to install it.

``open_session`` and ``run_session`` are the runtime half on its own (e.g. for timing a model
under ONNX Runtime with a chosen thread count).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from nas.errors import UserError, one_line

ONNX_EXTRA = "ONNX export needs the onnx extra: pip install 'vitnas[onnx]'"
DEFAULT_OPSET = 18
MIN_OPSET = 17
_EXTERNAL_DATA_BYTES = 1_800_000_000  # ONNX protobufs stop at 2 GB: larger weights go to a .data file
#: loggers that print progress or harmless notes during an export (empty attribute lists, the
#: version converter's traceback before export_onnx reports the opset itself)
_QUIET_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx", "torch.export", "torch._export")


@dataclass(frozen=True)
class OnnxCheck:
    """What ``export_onnx``/``check_onnx`` wrote and proved."""

    path: Path
    opset: int
    max_abs_diff: float  # largest |ONNX Runtime - PyTorch| over every output of every batch checked
    runtime: str  # e.g. "onnxruntime 1.32.0"
    batches: tuple[int, ...]  # batch sizes run (two different ones: the batch is dynamic)
    input_shape: tuple[int, ...]  # one sample's: (C, H, W) for images


def require_onnx():
    """``(onnx, onnxruntime)``; ``UserError`` when the onnx extra (onnx, onnxscript, onnxruntime) is missing."""
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter translates with it)
    except ImportError:
        raise UserError(ONNX_EXTRA) from None
    return onnx, onnxruntime


def runtime_name() -> str:
    _, ort = require_onnx()
    return f"onnxruntime {ort.__version__}"


def open_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime ``InferenceSession`` on the CPU provider (``threads``: intra-op threads, None
    for the runtime's default); a model the runtime cannot load is a one-line ``UserError``."""
    _, ort = require_onnx()
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime's own exception types (Fail, NotImplemented, InvalidGraph, ...)
        raise UserError(f"{runtime_name()}: {_runtime_problem(err)} (loading {path})") from None


def run_session(session, x) -> list:
    """The session's outputs (numpy arrays) for one input batch (a tensor or numpy array)."""
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    try:
        return session.run(None, {session.get_inputs()[0].name: x})
    except Exception as err:
        raise UserError(f"{runtime_name()}: {_runtime_problem(err)} (batch {x.shape[0]})") from None


def model_input_shape(model: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` the model takes: a vitnas subnet's arch, else timm's current input config."""
    arch = getattr(model, "arch", None)
    if arch is not None and hasattr(arch, "image_size") and hasattr(arch, "in_chans"):
        return (arch.in_chans, arch.image_size, arch.image_size)
    try:
        from timm.models._input import get_model_input_config

        return tuple(get_model_input_config(model)["input_size"])
    except Exception:
        size = getattr(model, "pretrained_cfg", {}).get("input_size")
        if size is None:
            raise UserError(
                f"cannot tell the input shape of {type(model).__name__}: pass input_shape=(C, H, W)"
            ) from None
        return tuple(size)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_shape: Sequence[int] | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    batch: int = 2,
    atol: float = 1e-4,
    seed: int = 0,
    threads: int | None = None,
) -> OnnxCheck:
    """Write ``model`` (in eval mode) to ``path`` (a file such as ``x.onnx``, or a folder:
    ``model.onnx`` in it) with a dynamic batch dimension, then ``check_onnx`` it. ``input_shape`` is
    one sample's (default: the model's ``(C, H, W)``, see ``model_input_shape``); ``threads``: ONNX
    Runtime's intra-op threads for the check. Nothing is left at ``path`` when either step fails."""
    require_onnx()
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise UserError(f"ONNX opset {opset!r}: must be an integer >= {MIN_OPSET} (default {DEFAULT_OPSET})")
    shape = _check_shape(model_input_shape(model) if input_shape is None else input_shape)
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        _export(model, path, shape, opset, batch, seed)
        written = _file_opset(path)
        if written != opset:
            raise UserError(
                f"{_exporter(opset)}: wrote opset {written}, not the {opset} asked for (its version "
                f"converter cannot lower this model); use opset >= {written}"
            )
        return check_onnx(path, model, shape, batch=batch, atol=atol, seed=seed, threads=threads)
    except BaseException:
        for leftover in (path, path.with_name(path.name + ".data")):
            leftover.unlink(missing_ok=True)
        raise
    finally:
        model.train(was_training)


def check_onnx(
    path: str | Path,
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    batch: int = 2,
    atol: float = 1e-4,
    seed: int = 0,
    threads: int | None = None,
) -> OnnxCheck:
    """Run ``path`` with ONNX Runtime (CPU) on seeded random batches of ``batch`` and ``batch + 1``
    images and compare every output with ``model``'s eval outputs; ``UserError`` when the runtime
    cannot run it or an output differs by more than ``atol`` (NaN counts as a difference).

    Token selection (top-k, matching, nearest medoid) is discrete: on an input where two candidates
    tie to within rounding, another runtime's rounding can pick the other one, and the outputs then
    differ by far more than ``atol``. The ops avoid ties that rounding alone would decide (see
    ``nas.ops.cluster.kmedoids``); a genuine near-tie is reported like any other difference."""
    shape = _check_shape(input_shape)
    if batch < 1:
        raise UserError(f"ONNX check batch {batch}: must be at least 1")
    session = open_session(path, threads)
    runtime = runtime_name()
    device = _device(model)
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    worst, batches = 0.0, (batch, batch + 1)
    try:
        for b in batches:
            x = torch.randn(b, *shape, generator=generator)
            with torch.inference_mode():
                expected = [t.detach().float().cpu() for t in _leaves(model(x.to(device)))]
            got = run_session(session, x)
            if len(got) != len(expected):
                raise UserError(f"{runtime}: {len(got)} outputs where PyTorch gives {len(expected)} ({path})")
            for i, (ours, theirs) in enumerate(zip(expected, got)):
                theirs = torch.from_numpy(theirs).float()
                if theirs.shape != ours.shape:
                    raise UserError(
                        f"{runtime}: output {i} has shape {tuple(theirs.shape)} where PyTorch gives "
                        f"{tuple(ours.shape)} (batch {b}; is the batch dimension dynamic?)"
                    )
                diff = (theirs - ours).abs().max().item() if ours.numel() else 0.0
                if not diff <= atol:  # NaN fails too
                    raise UserError(
                        f"{runtime}: output {i} differs from PyTorch's by {diff:.3g} > atol {atol:g} "
                        f"(batch {b}, {path})"
                    )
                worst = max(worst, diff)
    finally:
        model.train(was_training)
    return OnnxCheck(path, _file_opset(path), worst, runtime, batches, shape)


# -- helpers ------------------------------------------------------------------------------------
def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(shape)
    if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise UserError(
            f"ONNX input_shape {shape}: expected one sample's shape, positive integers such as (C, H, W)"
        )
    return shape


def _device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _leaves(out) -> Iterator[Tensor]:
    if isinstance(out, Tensor):
        yield out
    elif isinstance(out, dict):
        for value in out.values():
            yield from _leaves(value)
    elif isinstance(out, (list, tuple)):
        for value in out:
            yield from _leaves(value)


def _exporter(opset: int) -> str:
    return f"torch.onnx (torch {torch.__version__}, opset {opset})"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _export(model: nn.Module, path: Path, shape: tuple[int, ...], opset: int, batch: int, seed: int) -> None:
    import warnings

    x = torch.randn(max(batch, 2), *shape, generator=torch.Generator().manual_seed(seed)).to(_device(model))
    dim = torch.export.Dim("batch", min=1, max=1 << 16)
    large = sum(t.numel() * t.element_size() for t in model.state_dict().values()) > _EXTERNAL_DATA_BYTES
    try:
        with _quiet(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=True,
                dynamic_shapes=({0: dim},),
                opset_version=opset,
                input_names=["images" if len(shape) == 3 else "input"],
                external_data=large,
                verbose=False,
            )
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"{_exporter(opset)}: {_export_problem(err)}") from None


def _file_opset(path: Path) -> int:
    onnx, _ = require_onnx()
    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_OP_PATTERNS = (
    r"op='([\w.]+)'",  # No ONNX function found for <OpOverload(op='aten.linalg_eig', ...)>
    r"target=torch\.ops\.([\w.]+)",
    r"\b((?:aten|prims|quantized)(?:\.|::)\w+)",
)


def _export_problem(err: BaseException) -> str:
    """One line from an exporter failure: the op it could not handle and why."""
    text = _ANSI.sub("", str(err))
    if "Constraints violated" in text or "specializ" in text.lower():
        return "the batch dimension cannot stay dynamic: " + _summary(text)
    op = next((m.group(1) for pattern in _OP_PATTERNS for m in [re.search(pattern, text)] if m), None)
    return f"cannot export {'op ' + op if op else 'the model'}: {_summary(text)}"


def _summary(text: str, limit: int = 240) -> str:
    """The most specific line of an error report (the innermost ``<class ...>: message``), shortened."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    causes = [re.sub(r"^<class '[^']+'>:\s*", "", ln) for ln in lines if ln.startswith("<class '")]
    line = causes[0] if causes else (lines[0] if lines else type(text).__name__)
    line = one_line(line)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _runtime_problem(err: BaseException) -> str:
    """One line from an ONNX Runtime failure, naming the op when the message does."""
    text = one_line(_ANSI.sub("", str(err)))
    text = re.sub(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*", "", text)
    text = re.sub(r"^Load model from \S+ failed:\s*", "", text)
    detail = text if len(text) <= 240 else text[:237] + "..."
    found = re.search(r"implementation for (\w+)\((\d+)\) node with name '([^']*)'", text)
    if found:
        op, version, node = found.groups()
        return f"cannot run op {op} (opset {version}, node '{node}'): no implementation for its input types"
    found = re.search(r"([\w.]*:?\w+)\(-?\d+\) is not a registered function/op", text)
    if found:
        return f"cannot run op {found.group(1)}: not a registered op"
    found = re.search(r"operator \((\w+)\) in node \(([^)]*)\)", text)
    if found:
        return f"cannot run op {found.group(1)} (node '{found.group(2)}'): {detail}"
    found = re.search(r"\bop(?:_type)?[ =:]+'?(\w+)'?", text, flags=re.IGNORECASE)
    return (f"cannot run op {found.group(1)}: " if found else "cannot run the model: ") + detail
