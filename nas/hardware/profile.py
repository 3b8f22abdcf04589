"""What ``vitnas profile`` computes: parameters, GFLOPs and measured latency of one model.

The model is a vitnas architecture file (``arch.yaml``: a psvit subnet, or a timm model with its
reduction schedule) or a timm model by name, built without downloading anything and optionally
patched with a token-reduction schedule written in the ``--reduce`` mini-grammar::

    REDUCE := "none" | "tome:" OPTIONS | "evit:" OPTIONS
    OPTIONS := KEY "=" VALUE ("," KEY "=" VALUE)*          lists are "/"-separated: 3/6/9

    tome   r=INT            merges in every block (ToMe's constant schedule)
           r=INT/INT/...    merges per block, one entry per block
           decreasing=INT   from INT at the first block linearly down to 0 at the last (rounded)
           inflection=FLOAT with r=INT: the ToMe code's (r, inflection) schedule, -1 to 1;
                            -1 is the paper's decreasing one: 2r down to 0, truncated, so
                            decreasing=16 and r=8,inflection=-1 differ only by rounding
           order=NAME       reference (default): ToMe's matching as published; spatial:
                            vitnas's variant that keeps surviving tokens in sequence order
           prop_attn=BOOL   proportional attention (default true)
    evit   keep=FLOAT       keep rate in (0, 1] at the pruning blocks (required)
           layers=INT/...   0-based pruning blocks (required; EViT-S uses 3/6/9)
           prop_attn=BOOL   (default false)

Examples: ``tome:r=8``, ``tome:r=8,inflection=-1``, ``tome:r=8,order=spatial``,
``evit:keep=0.7,layers=3/6/9``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import nn

from nas.arch import ArchConfig, load_arch
from nas.errors import UserError
from nas.hardware.measure import Latency, measure
from nas.hardware.target import Target

REDUCE_HELP = __doc__[__doc__.index("    REDUCE") : __doc__.index("Examples")].rstrip()
_KEYS = {
    "tome": ("r", "decreasing", "inflection", "order", "prop_attn"),
    "evit": ("keep", "layers", "prop_attn"),
}
_ORDERS = ("reference", "spatial")
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


@dataclass(frozen=True)
class Profile:
    """Cost of one model: FLOPs at batch 1 (per image), latency at the target's batch."""

    model: str
    input_shape: tuple[int, int, int]  # C, H, W of one image
    params: int
    flops: int
    target: str | None = None
    latency: Latency | None = None

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "input_shape": list(self.input_shape),
            "params": self.params,
            "flops": self.flops,
            "gflops": self.gflops,
            "target": self.target,
            "latency": None if self.latency is None else self.latency.to_dict(),
        }

    def row(self) -> dict:
        """The columns ``vitnas profile`` prints."""
        row = {
            "model": self.model,
            "input": "x".join(map(str, self.input_shape)),
            "params_M": self.params / 1e6,
            "GFLOPs": self.gflops,
        }
        if self.latency is not None:
            lat = self.latency
            row.update(latency_ms=lat.median_ms, p10_ms=lat.p10_ms, p90_ms=lat.p90_ms, target=self.target)
        return row


def parse_reduce(text: str) -> dict:
    """The grammar in the module docstring → a ``nas.ops.timm_patch.apply`` schedule; one-line UserError."""
    kind, _, options = text.strip().partition(":")
    if kind == "none" and not options:
        return {"kind": "none"}
    if kind not in _KEYS:
        raise _bad(text, f"starts with {kind!r}; allowed: none, tome:..., evit:...")
    values: dict[str, str] = {}
    for item in options.split(",") if options else ():
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not value:
            raise _bad(text, f"{item.strip()!r} is not key=value")
        if key not in _KEYS[kind]:
            raise _bad(text, f"unknown key {key!r} for {kind} (allowed: {', '.join(_KEYS[kind])})")
        if key in values:
            raise _bad(text, f"key {key!r} given twice")
        values[key] = value
    schedule: dict = {"kind": kind}
    if "prop_attn" in values:
        if values["prop_attn"].lower() not in _BOOLS:
            raise _bad(text, f"prop_attn={values['prop_attn']!r} is not true or false")
        schedule["prop_attn"] = _BOOLS[values["prop_attn"].lower()]
    if kind == "tome":
        if ("r" in values) == ("decreasing" in values):
            raise _bad(text, "tome takes exactly one of r=INT, r=INT/INT/... or decreasing=INT")
        if "order" in values:
            if values["order"] not in _ORDERS:
                raise _bad(text, f"order={values['order']!r} is not one of {', '.join(_ORDERS)}")
            schedule["order"] = values["order"]
        if "inflection" in values:
            if "r" not in values or "/" in values["r"]:
                raise _bad(text, "inflection=FLOAT goes with a single r=INT")
            r = _ints(text, "r", values["r"])
            try:
                inflection = float(values["inflection"])
            except ValueError:
                inflection = 2.0
            if not -1 <= inflection <= 1:
                raise _bad(text, f"inflection={values['inflection']!r} is not a number in [-1, 1]")
            schedule["r"] = {"rule": "inflection", "r": r[0], "inflection": inflection}
        elif "r" in values:
            r = _ints(text, "r", values["r"])
            schedule["r"] = r[0] if len(r) == 1 and "/" not in values["r"] else r
        else:
            schedule["r"] = {
                "rule": "decreasing",
                "start": _ints(text, "decreasing", values["decreasing"])[0],
            }
        return schedule
    if "keep" not in values or "layers" not in values:
        raise _bad(text, "evit needs keep=FLOAT and layers=INT/INT/...")
    try:
        keep = float(values["keep"])
    except ValueError:
        keep = -1.0
    if not 0 < keep <= 1:
        raise _bad(text, f"keep={values['keep']!r} is not a number in (0, 1]")
    return {**schedule, "keep_rate": keep, "layers": _ints(text, "layers", values["layers"])}


def _ints(text: str, key: str, value: str) -> list[int]:
    parts = value.split("/")
    if not all(p.strip().isdigit() for p in parts):
        raise _bad(text, f"{key}={value!r} is not a non-negative integer or a /-separated list of them")
    return [int(p) for p in parts]


def _bad(text: str, reason: str) -> UserError:
    return UserError(f"bad --reduce {text!r}: {reason}")


class Model(NamedTuple):
    """A model to profile: a display name, the module, and one input image's (C, H, W)."""

    name: str
    module: nn.Module
    chw: tuple[int, int, int]


def load_model(arch: str | None = None, timm_name: str | None = None, reduce: str | None = None) -> Model:
    """An architecture file or a timm model name, with the reduction applied.

    ``reduce`` replaces a timm architecture's own schedule; psvit architectures carry theirs.
    """
    if (arch is None) == (timm_name is None):
        raise UserError("give exactly one of --arch FILE or --timm NAME")
    schedule = parse_reduce(reduce) if reduce else None
    if timm_name is not None:
        model = _timm(timm_name)
        name, model = _patched(timm_name, model, schedule, reduce)
        return Model(name, model, tuple(model.pretrained_cfg.get("input_size", (3, 224, 224))))
    spec = load_arch(arch)
    chw = (getattr(spec, "in_chans", 3), spec.image_size, spec.image_size)
    if isinstance(spec, ArchConfig):
        if schedule is not None:
            raise UserError(
                f"{arch}: --reduce applies to timm models; a psvit architecture carries its own reductions"
            )
        from nas.supernet.subnet import VitnasSubnet

        return Model(f"{arch} ({spec.arch_hash()})", VitnasSubnet(spec), chw)
    model = _timm(spec.model, num_classes=spec.num_classes, img_size=spec.image_size)
    return Model(*_patched(f"{arch} ({spec.model})", model, schedule or spec.schedule, reduce), chw)


def _timm(name: str, **kwargs) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as err:  # timm: "Unknown model (...)"
        raise UserError(f"timm model {name!r}: {err} (see timm.list_models())") from None


def _patched(name: str, model: nn.Module, schedule: dict | None, reduce: str | None) -> tuple[str, nn.Module]:
    if schedule is None or schedule == {"kind": "none"}:
        return name, model
    from nas.ops import timm_patch

    try:
        timm_patch.apply(model, schedule)
    except ValueError as err:
        raise UserError(f"{name}: cannot apply {reduce or schedule}: {err}") from None
    return f"{name} [{reduce or _schedule_text(schedule)}]", model


def _schedule_text(schedule: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in schedule.items())


def profile(model: Model, target: Target | None = None, *, time_budget_s: float = 3.0) -> Profile:
    """Parameters and FLOPs (batch 1), and the latency on ``target`` unless it is None (at the
    target's resolution when it sets one)."""
    from nas.hardware.flops import flops, params  # fvcore: imported only when counting (slow, noisy import)

    side = (target.resolution if target else None) or model.chw[-1]
    chw = (model.chw[0], side, side)
    x = torch.zeros(1, *chw)
    module = model.module.eval()
    try:
        with torch.inference_mode():
            module(x)
    except Exception as err:
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        raise UserError(f"{model.name} fails on input {tuple(x.shape)}: {reason}") from None
    result = Profile(model=model.name, input_shape=chw, params=params(module), flops=flops(module, x))
    if target is None:
        return result
    latency = measure(module, target, input_shape=(target.batch, *chw), time_budget_s=time_budget_s)
    return replace(result, target=str(target), latency=latency)
