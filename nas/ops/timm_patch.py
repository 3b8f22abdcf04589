"""ToMe or EViT (or AdaViT, see `apply`) for an existing timm `VisionTransformer`, in place and reversible.

`apply(model, {"kind": "tome", "r": 8})` or `apply(model, {"kind": "evit", "keep_rate": 0.7,
"layers": [3, 6, 9]})` swaps the classes of the model and its blocks for subclasses that reduce
tokens between attention and MLP (as both papers do); `remove(model)` swaps them back. Everything
timm 1.0 puts in a block keeps working: LayerScale, q/k norm, the attention gate and scale norm,
fused or explicit attention, dropout and drop-path. Every prefix token (class and registers) is
protected. Proportional attention adds log(size) through a float mask, so the fused
`scaled_dot_product_attention` kernel stays in use, and `avg`/`avgmax` heads weight tokens by
size. A block with nothing to do while every token still has size 1 runs timm's own forward,
so `{"kind": "none"}` and `r = 0` are exactly the unpatched model.

Options: tome `order` (`reference`, the default: ToMe's matching as published, whose accuracies a
user patching a pretrained model expects; `spatial`: vitnas's order-keeping variant, see
`nas.ops.tome`), `prop_attn` (default True, as in ToMe) and `trace_source` (keep, per token, which
input tokens it holds: `source(model)` after a forward); evit `prop_attn` (default False, as in
EViT). Reductions are labelled `vitnas::tome` / `vitnas::evit` while `torch.profiler` records.

At small batch the reduction (keys mean, matching, merge, sizes) runs on one intra-op thread
(`nas.ops.small_work.serial`): it is a chain of small ops for which waking the other threads costs
more than it saves. What each block does is decided once when the schedule is applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from timm.layers import Attention as TimmAttention
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.profiler import record_function

from nas.internals import profiler_recording
from nas.ops.attention import attention, class_attention, merge_heads
from nas.ops.evit import evit_fuse
from nas.ops.small_work import serial
from nas.ops.tome import ORDERS, bipartite_soft_matching, tome_schedule

_OPTIONS = {
    "none": set(),
    "tome": {"r", "order", "prop_attn", "trace_source"},
    "evit": {"keep_rate", "layers", "prop_attn"},
}


@dataclass
class _Plan:
    """What each block does (`r` merges or a keep rate) and the tokens' state during one forward."""

    kind: str
    steps: list[float]
    num_prefix: int
    prop_attn: bool = False
    trace_source: bool = False
    order: str = "reference"
    size: Tensor | None = field(default=None, repr=False)
    source: Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        #: per block: "tome", "evit" or None (nothing to do), decided once rather than every forward
        self.actions = [self.kind if self._reduces(step) else None for step in self.steps]

    def _reduces(self, step: float) -> bool:
        """ToMe merges when ``r > 0``; EViT prunes when its keep rate is below 1."""
        return step > 0 if self.kind == "tome" else self.kind == "evit" and step < 1


def _parse(schedule: dict, depth: int, num_prefix: int, has_cls: bool) -> _Plan:
    if not isinstance(schedule, dict) or schedule.get("kind") not in _OPTIONS:
        raise ValueError(f"schedule must be a dict with kind in {sorted([*_OPTIONS, 'adavit'])}, got {schedule!r}")
    kind = schedule["kind"]
    unknown = set(schedule) - _OPTIONS[kind] - {"kind"}
    if unknown:
        raise ValueError(
            f"{kind} schedule: unknown keys {sorted(unknown)}; allowed: {sorted(_OPTIONS[kind])}"
        )
    flags = {key: schedule[key] for key in ("prop_attn", "trace_source") if key in schedule}
    if not all(isinstance(v, bool) for v in flags.values()):
        raise ValueError(f"{kind} schedule: {flags} must be true or false")
    if kind == "none":
        return _Plan(kind, [0] * depth, num_prefix)
    if kind == "tome":
        if "r" not in schedule:
            raise ValueError("tome schedule needs r (int, list per block, or rule dict)")
        steps = tome_schedule(schedule["r"], depth)
        order = schedule.get("order", "reference")
        if order not in ORDERS:
            raise ValueError(f"tome schedule: order must be one of {', '.join(ORDERS)}, got {order!r}")
        return _Plan(
            kind,
            steps,
            num_prefix,
            schedule.get("prop_attn", True),
            schedule.get("trace_source", False),
            order,
        )
    if not has_cls:
        raise ValueError("evit ranks tokens by class-token attention, and this model has no class token")
    rate, layers = schedule.get("keep_rate"), schedule.get("layers")
    if not isinstance(rate, (int, float)) or not 0 < rate <= 1:
        raise ValueError(f"evit keep_rate must be a number in (0, 1], got {rate!r}")
    if not isinstance(layers, (list, tuple)) or not all(
        isinstance(i, int) and 0 <= i < depth for i in layers
    ):
        raise ValueError(f"evit layers must be a list of block indices in [0, {depth}), got {layers!r}")
    steps = [float(rate) if i in layers else 1.0 for i in range(depth)]
    return _Plan(kind, steps, num_prefix, schedule.get("prop_attn", False))


def _attend(
    m: TimmAttention, x: Tensor, size: Tensor | None, want_cls: bool, num_prefix: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """timm's Attention.forward with proportional attention; also returns the keys and class attention."""
    b, n, _ = x.shape
    q, k, v = m.qkv(x).reshape(b, n, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = m.q_norm(q), m.k_norm(k)
    out, probs = attention(
        q, k, v, size, need_attn=not m.fused_attn, dropout_p=m.attn_drop.p if m.training else 0.0
    )
    cls = None
    if want_cls:
        with serial(b * n * m.head_dim):  # one query row: small work
            if probs is None:
                cls = class_attention(q, k, size, num_prefix)
            else:
                cls = probs[:, :, 0, num_prefix:].mean(1)
    y = m.norm(merge_heads(out))
    gate = getattr(m, "gate", None)
    if gate is not None:
        y = y * gate(x).sigmoid()
    return m.proj_drop(m.proj(y)), k, cls


def _tome_step(plan: _Plan, i: int, x: Tensor, keys: Tensor) -> Tensor:
    """ToMe after block `i`'s attention: match on the keys (mean over heads), merge `x` and the sizes."""
    b, n, c = x.shape
    with serial(b * n * c):  # a chain of small ops: one thread, no wake-ups (see nas.ops.small_work.serial)
        merge = bipartite_soft_matching(keys.mean(dim=1), int(plan.steps[i]), plan.num_prefix, plan.order)
        x, plan.size = merge.merge(x, plan.size)
        if plan.source is not None:
            plan.source = merge.merge_source(plan.source)
    return x


def _evit_step(plan: _Plan, i: int, x: Tensor, cls: Tensor) -> Tensor:
    """EViT after block `i`'s attention: keep the tokens the class token attends to most, fuse the rest."""
    x, plan.size = evit_fuse(x, cls, plan.steps[i], plan.size, plan.num_prefix)
    return x


def _labelled(label: str, step, *args) -> Tensor:
    """`step(*args)`, inside a `torch.profiler` region named `label` while a profiler records
    (entering a region costs ~10 µs, so it is skipped otherwise)."""
    if not torch.compiler.is_compiling() and profiler_recording():
        with record_function(label):
            return step(*args)
    return step(*args)


class _ReducingBlock:
    """Mixed in front of a timm Block class: reduce tokens after attention."""

    _vitnas: _Plan
    _vitnas_index: int

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        plan, i = self._vitnas, self._vitnas_index
        if i == 0:  # a new forward (forward, forward_features, forward_intermediates all start here)
            plan.size = None
            plan.source = (
                torch.eye(x.shape[1], device=x.device).expand(x.shape[0], -1, -1)
                if plan.trace_source
                else None
            )
        action = plan.actions[i]
        if action is None and plan.size is None and plan.source is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise ValueError("token reduction cannot follow an attention mask: the tokens it covers change")
        y, keys, cls = _attend(
            self.attn, self.norm1(x), plan.size if plan.prop_attn else None, action == "evit", plan.num_prefix
        )
        x = x + self.drop_path1(self.ls1(y))
        if action == "tome":
            x = _labelled("vitnas::tome", _tome_step, plan, i, x, keys)
        elif action == "evit":
            x = _labelled("vitnas::evit", _evit_step, plan, i, x, cls)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class _ReducingViT:
    """Mixed in front of the model class: size-weighted `avg`/`avgmax` pooling."""

    _vitnas: _Plan

    def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        size = self._vitnas.size
        pool_type = self.global_pool if pool_type is None else pool_type
        if (
            size is None
            or size.shape[:2] != x.shape[:2]
            or self.attn_pool is not None
            or pool_type not in ("avg", "avgmax")
        ):
            return super().pool(x, pool_type)
        p = 0 if getattr(self, "pool_include_prefix", False) else self.num_prefix_tokens
        tokens, weights = x[:, p:], size[:, p:]
        avg = (tokens * weights).sum(dim=1) / weights.sum(dim=1)
        return avg if pool_type == "avg" else 0.5 * (tokens.amax(dim=1) + avg)


_SUBCLASSES: dict[tuple[type, type], type] = {}


def _subclass(mixin: type, base: type) -> type:
    """One cached subclass per (mixin, timm class), so isinstance checks against timm still hold.

    It is published in this module under its name so that a patched model pickles (torch.save, Ray).
    """
    key = (mixin, base)
    if key not in _SUBCLASSES:
        name = f"Reducing{base.__name__}"
        cls = type(name, (mixin, base), {"__module__": __name__, "__qualname__": name})
        _SUBCLASSES[key] = globals()[name] = cls
    return _SUBCLASSES[key]


def apply(model: nn.Module, schedule: dict) -> nn.Module:
    """Patch `model` in place (re-applying replaces the schedule) and return it.

    `{"kind": "adavit", ...}` hands the model to `nas.ops.adavit_patch.apply` (input-adaptive
    patches, heads and sub-layers) after removing any token reduction; the other kinds remove an
    AdaViT patch first. One model carries one patch."""
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"timm_patch supports timm VisionTransformer models, got {type(model).__name__}")
    if isinstance(schedule, dict) and schedule.get("kind") == "adavit":
        from nas.ops import adavit_patch  # the decision networks are only needed for this kind

        return adavit_patch.apply(_remove_reduction(model), schedule)
    blocks = list(model.blocks)
    for i, blk in enumerate(blocks):
        if not isinstance(blk, TimmBlock) or not isinstance(blk.attn, TimmAttention):
            raise ValueError(
                f"block {i} is {type(blk).__name__} with {type(blk.attn).__name__}: only timm Block/Attention are supported"
            )
    plan = _parse(schedule, len(blocks), model.num_prefix_tokens, model.cls_token is not None)
    remove(model)  # only once the schedule is known good: a bad one leaves the current patch in place
    for i, blk in enumerate(blocks):
        blk.__class__ = _subclass(_ReducingBlock, type(blk))
        blk._vitnas, blk._vitnas_index = plan, i
    model.__class__ = _subclass(_ReducingViT, type(model))
    model._vitnas = plan
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo `apply`, whichever kind (a no-op on an unpatched model), and return the model."""
    if type(model).__module__ == "nas.ops.adavit_patch":
        from nas.ops import adavit_patch

        adavit_patch.remove(model)
    return _remove_reduction(model)


def _remove_reduction(model: nn.Module) -> nn.Module:
    for mod in [model, *getattr(model, "blocks", [])]:
        if isinstance(mod, (_ReducingBlock, _ReducingViT)):
            mod.__class__ = mod.__class__.__bases__[1]
            for attr in ("_vitnas", "_vitnas_index"):
                mod.__dict__.pop(attr, None)
    return model


def source(model: nn.Module) -> Tensor | None:
    """After a forward with `trace_source`: `[B, N, N0]` 0/1, which input tokens each output token holds."""
    plan = getattr(model, "_vitnas", None)
    return None if plan is None else plan.source


def token_sizes(model: nn.Module) -> Tensor | None:
    """After a forward: `[B, N, 1]`, how many input tokens each output token stands for (None: all one)."""
    plan = getattr(model, "_vitnas", None)
    return None if plan is None else plan.size
