"""AdaViT for an existing timm `VisionTransformer`, in place and reversible.

``apply(model, {"kind": "adavit", "usage": {"patch": 0.7, "head": 0.8, "block": 0.9}})`` adds a
budget-conditioned decision network (``nas.ops.adavit.DecisionNet``) before every block from
``start`` on, kept in ``model.adavit`` (so ``state_dict`` holds them beside the backbone), and
swaps the model's class for a subclass whose ``forward_features`` takes the decisions;
``remove(model)`` swaps it back and drops the decision networks. Re-applying with other budgets
keeps trained decision networks whose shape still fits (what a search over budgets does).

Schedule keys: ``usage`` (budget per kind in (0, 1]; a kind left out, or at 1.0, is not decided:
nothing of that kind is dropped and its decisions are not computed), ``head_mode`` (``full``,
the default: a dropped head is removed from the qkv and output projections; ``partial``: its
values pass through without attention), ``start`` (first block with decisions, default 1: the
class token entering block 0 is the same for every image, so its decisions could not adapt),
``tau`` (Gumbel-softmax temperature, default 1), ``inference`` (``packed``, the default, or
``masked``: the training computation with hard decisions, for checking; it saves nothing) and
``batching`` (heads at batch > 1: ``union``, the default, or ``group``; see below).

Training (``model.train()``) runs the full token set with masks: a dropped patch is excluded
from the keys of every later attention and its row stops changing (cumulative: a patch that left
never comes back), a dropped head's output is zeroed (or replaced by its values), a dropped
sub-layer's residual branch is multiplied by 0; decisions are straight-through Gumbel samples,
and ``usage(model)`` holds each sample's kept fractions for the usage loss.

Inference (``model.eval()``) skips for real: tokens of all samples are packed into one
``[T, C]`` sequence, dropped patches are gathered out, each sub-layer runs only on the rows of the
samples that keep it (``index_select`` / ``index_add``), and heads are removed from the qkv and
projection matmuls (weights sliced per kept-head set, cached). Attention runs once per block for
all samples, padded to the longest with the padding masked out. Heads at batch > 1: ``union`` runs
the heads any sample keeps and zeroes per sample the ones it dropped (one call; a head is saved
when no sample keeps it), ``group`` runs each kept-head set on its samples alone (no head in vain,
a call per set). Per-token ops see only real tokens, whatever the batch; at batch 1 nothing is
padded and every dropped head is saved. ``forward_features`` still returns ``[B, N, C]``: a
dropped patch's row holds its value when it left. A block without any decision on equal-length
samples is timm's own forward, so with nothing dropped the output is exactly the unpatched model's.

Everything timm 1.0 puts in a block keeps working: LayerScale, q/k norm, the attention gate,
fused or explicit attention, dropout and drop-path (training). The class token is the policy
token and every prefix token (class, registers) is always kept. ``avg``/``max`` heads pool over
the tokens still present. ``sample_flops(x)`` gives each image's multiply-adds from the decisions
it took (``nas.ops.adavit.block_flops``), which ``nas.hardware.input_cost`` reads.
Not supported: a patch-dropout layer, dynamic image sizes, attention-pool heads with patch
decisions, head decisions with a scale-norm in attention (``full`` mode), attention masks.
``forward_intermediates`` runs the model without decisions.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from itertools import compress

import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from nas.ops.adavit import (
    HEAD_MODES,
    KINDS,
    DecisionNet,
    block_flops,
    gate_heads,
    head_channels,
    index_tensor,
    keep_decision,
    masked_attention,
    packed_attention,
    qkv_rows,
)

_OPTIONS = {"usage", "head_mode", "start", "tau", "inference", "batching"}
BATCHING = ("union", "group")
INFERENCE = ("packed", "masked")


@dataclass
class _Plan:
    """The decisions' settings and what the last forward recorded."""

    budget: dict[str, float]  # kinds decided -> budget
    head_mode: str = "full"
    start: int = 1
    tau: float = 1.0
    noise: float = 1.0  # scale of the Gumbel noise in training (``set_noise``)
    inference: str = "packed"
    batching: str = "union"  # heads at batch > 1 (``_packed_block``)
    num_prefix: int = 1
    generator: torch.Generator | None = field(default=None, repr=False)
    usage: dict[str, Tensor] | None = field(default=None, repr=False)  # per-sample kept fractions
    keep: Tensor | None = field(default=None, repr=False)  # [B, N] bool: tokens present at the end
    stats: list[dict] | None = field(default=None, repr=False)  # inference: per block, per image
    biases: dict = field(default_factory=dict, repr=False)  # (block, device, dtype) -> budget bias
    patches_total: int = 0

    def bias(self, i: int, net: DecisionNet) -> Tensor:
        """``net.budget_bias`` of the current budgets, made once per block, device and dtype."""
        key = (i, net.fc.weight.device, net.fc.weight.dtype)
        if key not in self.biases:
            with torch.inference_mode(False):  # a plain tensor: training may follow an inference
                self.biases[key] = net.budget_bias(self.budget)
        return self.biases[key]

    def offset(self, i: int, net: DecisionNet) -> Tensor:
        """``fc.bias + gain * bias``: the decision's whole constant term, so that inference runs the
        decision network as one LayerNorm and one linear; remade when either parameter changes."""
        bias, gain = net.fc.bias, net.gain
        if torch.is_grad_enabled():  # a gradient wanted in eval: through the parameters
            return bias + gain * self.bias(i, net)
        # the same tensors, unchanged (a step or a load bumps the version, a move changes the pointer);
        # checked cheaply: this runs before every decided block
        version = (bias._version, gain._version, bias.data_ptr(), gain.data_ptr())
        hit = self.biases.get(("offset", i))
        if hit is None or hit[0] != version or hit[1] is not bias or hit[2] is not gain:
            with torch.inference_mode(False), torch.no_grad():
                hit = self.biases[("offset", i)] = (version, bias, gain, bias + gain * self.bias(i, net))
        return hit[3]

    @property
    def enabled(self) -> tuple[str, ...]:
        return tuple(k for k in KINDS if k in self.budget)


def _parse(schedule: dict, depth: int) -> _Plan:
    if not isinstance(schedule, dict) or schedule.get("kind") != "adavit":
        raise ValueError(f"schedule must be a dict with kind 'adavit', got {schedule!r}")
    unknown = set(schedule) - _OPTIONS - {"kind"}
    if unknown:
        raise ValueError(f"adavit schedule: unknown keys {sorted(unknown)}; allowed: {sorted(_OPTIONS)}")
    usage = schedule.get("usage", {})
    if not isinstance(usage, dict) or set(usage) - set(KINDS):
        raise ValueError(f"adavit usage must map some of {', '.join(KINDS)} to budgets, got {usage!r}")
    for kind, value in usage.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(f"adavit usage.{kind} must be a number in (0, 1], got {value!r}")
    mode, start = schedule.get("head_mode", "full"), schedule.get("start", 1)
    tau, inference = schedule.get("tau", 1.0), schedule.get("inference", "packed")
    if mode not in HEAD_MODES:
        raise ValueError(f"adavit head_mode must be one of {', '.join(HEAD_MODES)}, got {mode!r}")
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < depth:
        raise ValueError(f"adavit start must be a block index in [0, {depth}), got {start!r}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
        raise ValueError(f"adavit tau must be a positive number, got {tau!r}")
    if inference not in INFERENCE:
        raise ValueError(f"adavit inference must be one of {', '.join(INFERENCE)}, got {inference!r}")
    batching = schedule.get("batching", "union")
    if batching not in BATCHING:
        raise ValueError(f"adavit batching must be one of {', '.join(BATCHING)}, got {batching!r}")
    budget = {k: float(usage[k]) for k in KINDS if k in usage and usage[k] < 1}
    return _Plan(budget, head_mode=mode, start=start, tau=float(tau), inference=inference, batching=batching)


def _check(model: nn.Module, plan: _Plan) -> None:
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"adavit supports timm VisionTransformer models, got {type(model).__name__}")
    for i, blk in enumerate(model.blocks):
        if not isinstance(blk, TimmBlock) or not isinstance(blk.attn, TimmAttention):
            raise ValueError(
                f"block {i} is {type(blk).__name__} with {type(blk.attn).__name__}: only timm Block/Attention are supported"
            )
    if model.cls_token is None:
        raise ValueError(
            "adavit reads the class token as its policy token, and this model has no class token"
        )
    if not isinstance(model.patch_drop, nn.Identity):
        raise ValueError(
            "adavit tracks every patch by position: a patch-dropout layer (patch_drop_rate > 0) breaks that"
        )
    if getattr(model, "dynamic_img_size", False):
        raise ValueError("adavit decides for a fixed number of patches: dynamic_img_size is not supported")
    if "patch" in plan.budget and model.attn_pool is not None:
        raise ValueError(
            "patch decisions with an attention-pool head are not supported (the head reads every token)"
        )
    if "head" in plan.budget and plan.head_mode == "full":
        for i, blk in enumerate(model.blocks):
            if not isinstance(blk.attn.norm, nn.Identity):
                raise ValueError(
                    f"block {i}: full head deactivation removes heads before the attention's scale norm, "
                    "which normalises over all heads; use head_mode partial"
                )


def _patches(model: VisionTransformer) -> int:
    return int(model.patch_embed.num_patches)


class _AdaptiveViT:
    """Mixed in front of the model class: the adaptive ``forward_features``, pooling and cost."""

    _adavit: _Plan
    #: ``nas.hardware.input_cost`` measures models with this flag over real inputs
    input_dependent_cost = True

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        plan = self._adavit
        plan.usage, plan.keep, plan.stats = None, None, None
        if attn_mask is not None or is_causal:
            raise ValueError("adavit decisions cannot follow an attention mask: the tokens it covers change")
        if not plan.enabled:
            return super().forward_features(x)
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        if self.training or plan.inference == "masked":
            x = _masked(self, x)
        else:
            x = _packed(self, x)
        return self.norm(x)

    def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        keep = self._adavit.keep
        pool_type = self.global_pool if pool_type is None else pool_type
        if (
            keep is None
            or keep.shape != x.shape[:2]
            or self.attn_pool is not None
            or pool_type not in ("avg", "max", "avgmax")
        ):
            return super().pool(x, pool_type)
        p = 0 if getattr(self, "pool_include_prefix", False) else self.num_prefix_tokens
        tokens, present = x[:, p:], keep[:, p:, None]
        avg = (tokens * present).sum(dim=1) / present.sum(dim=1).clamp(min=1)
        top = tokens.masked_fill(~present, float("-inf")).amax(dim=1)
        return {"avg": avg, "max": top, "avgmax": 0.5 * (avg + top)}[pool_type]

    @torch.inference_mode()
    def sample_flops(self, x: Tensor) -> Tensor:
        """Each image's multiply-adds ``[B]`` (float64) in inference, from the decisions it takes."""
        was_training = self.training
        self.eval()
        try:
            self(x)
        finally:
            self.train(was_training)
        return flops_of_last_forward(self, x.shape[0])


def _decision_nets(model) -> dict[int, DecisionNet]:
    return {int(k): v for k, v in model.adavit.items()}


# -- training: masks over the full token set ------------------------------------------------------
def _masked(model, x: Tensor) -> Tensor:
    plan, nets, p = model._adavit, _decision_nets(model), model.num_prefix_tokens
    b = x.shape[0]
    train = model.training
    keep = None  # [B, N]: tokens still present (0/1, straight-through); None: all
    kept: dict[str, list[Tensor]] = {k: [] for k in plan.enabled}
    for i, blk in enumerate(model.blocks):
        net = nets.get(i)
        heads = sub = None
        if net is not None:
            pl, hl, bl = net(x[:, 0], plan.bias(i, net))
            if "patch" in plan.budget:
                m = keep_decision(pl, train, plan.tau, plan.generator, plan.noise)
                patches = m if keep is None else keep[:, p:] * m
                keep = torch.cat([patches.new_ones(b, p), patches], dim=1)
                kept["patch"].append(patches.mean(dim=1))
            if "head" in plan.budget:
                heads = keep_decision(hl, train, plan.tau, plan.generator, plan.noise)
                kept["head"].append(heads.mean(dim=1))
            if "block" in plan.budget:
                sub = keep_decision(bl, train, plan.tau, plan.generator, plan.noise)
                kept["block"].append(sub.mean(dim=1))
        if keep is None and heads is None and sub is None:
            x = blk(x)
        else:
            x = _masked_block(blk, x, keep, heads, sub, plan.head_mode, train)
    plan.usage = {k: torch.stack(v).mean(dim=0) for k, v in kept.items() if v}
    plan.keep = None if keep is None else keep.detach() > 0.5
    return x


def _masked_block(blk, x: Tensor, keep, heads, sub, mode: str, train: bool) -> Tensor:
    """A timm block with the decisions as masks (see the module docstring)."""

    def gated(y: Tensor, j: int) -> Tensor:
        g = None if keep is None else keep[..., None].to(y.dtype)
        if sub is not None:
            s = sub[:, j, None, None].to(y.dtype)
            g = s if g is None else g * s
        return y if g is None else y * g

    h = blk.norm1(x)
    y = blk.attn(h) if keep is None and heads is None else _masked_msa(blk.attn, h, keep, heads, mode, train)
    x = x + gated(blk.drop_path1(blk.ls1(y)), 0)
    return x + gated(blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x)))), 1)


def _masked_msa(a: TimmAttention, h: Tensor, keep, heads, mode: str, train: bool) -> Tensor:
    b, n, _ = h.shape
    gate = getattr(a, "gate", None)
    q, k, v = a.qkv(h).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = a.q_norm(q), a.k_norm(k)
    drop = a.attn_drop.p if train else 0.0
    if keep is None:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
    else:
        out = masked_attention(q, k, v, keep, drop)
    if heads is not None:
        out = gate_heads(out, v, heads, mode)
    y = a.norm(out.transpose(1, 2).reshape(b, n, a.num_heads * a.head_dim))
    if gate is not None:
        y = y * gate(h).sigmoid()
    return a.proj_drop(a.proj(y))


# -- inference: packed tokens, real skipping ------------------------------------------------------
def _packed(model, x: Tensor) -> Tensor:
    """Inference with real skipping. Decisions come to Python once per block (one ``tolist``), so the
    bookkeeping of who keeps what costs list operations, not a trail of small tensor ops."""
    plan, nets, p = model._adavit, _decision_nets(model), model.num_prefix_tokens
    b, n, c = x.shape
    heads_total = model.blocks[0].attn.num_heads
    rows = x.reshape(b * n, c)
    members = [list(range(n)) for _ in range(b)]  # each image's tokens, by original position, in row order
    gone: list[tuple[Tensor, list[int]]] = []  # rows that left, and their (image, position) slots in [B * N]
    stats: list[dict] = []
    for i, blk in enumerate(model.blocks):
        net = nets.get(i)
        heads = attn = ffn = None
        if net is not None:
            token = (
                rows[:1] if b == 1 else rows.index_select(0, index_tensor(_starts(members), x.device))
            )
            logits = F.linear(net.norm(token), net.fc.weight, plan.offset(i, net)).tolist()
            decided = [[v > 0 for v in row] for row in logits]  # in Python: one tensor op less a block
            patches, h = net.patches, net.heads
            if "patch" in plan.budget:
                rows, members = _drop_patches(rows, members, decided, p, n, gone)
            if "head" in plan.budget:
                heads = [[k for k in range(h) if d[patches + k]] for d in decided]
            if "block" in plan.budget:
                attn = [d[patches + h] for d in decided]
                ffn = [d[patches + h + 1] for d in decided]
        lengths = [len(m) for m in members]
        stats.append(
            {"tokens": lengths, "heads": [heads_total] * b if heads is None else [len(k) for k in heads],
             "attn": attn or [True] * b, "ffn": ffn or [True] * b, "decided": net is not None}
        )  # fmt: skip
        rows = _packed_block(blk, rows, lengths, heads, attn, ffn, plan.head_mode, plan.batching)
    plan.stats, plan.usage = stats, None  # usage: from the stats when asked (``usage``)
    plan.patches_total = n - p
    if not gone:
        plan.keep = None
        return rows.view(b, n, c)
    slots = [q + j * n for j, m in enumerate(members) for q in m]
    row_of = [0] * (b * n)  # slot -> its row in (present rows, then the departed in the order they left)
    for r, slot in enumerate(slots + [s for _, ss in gone for s in ss]):
        row_of[slot] = r
    out = torch.cat([rows, *(t for t, _ in gone)]).index_select(0, index_tensor(row_of, x.device))
    if model.global_pool in ("avg", "max", "avgmax"):
        keep = torch.zeros(b * n, dtype=torch.bool, device=x.device)
        keep[index_tensor(slots, x.device)] = True
        plan.keep = keep.view(b, n)
    else:
        plan.keep = None
    return out.view(b, n, c)


def _drop_patches(
    rows: Tensor, members, decided, p: int, n: int, gone: list
) -> tuple[Tensor, list[list[int]]]:
    """Gather out the patches whose keep decision is 0 (prefix tokens always stay)."""
    kept_rows, left_rows, slots, new_members = [], [], [], []
    offset, prefix = 0, [True] * p
    for j, (m, d) in enumerate(zip(members, decided)):
        by_position = prefix + d  # d: patch decisions first, then heads and sub-layers (never indexed)
        flags = list(map(by_position.__getitem__, m))
        rows_here = range(offset, offset + len(m))
        if all(flags):
            kept_rows.extend(rows_here)
            new_members.append(m)
        else:  # compress: the loops in C, as this runs before every decided block
            dropped = [not f for f in flags]
            kept_rows.extend(compress(rows_here, flags))
            left_rows.extend(compress(rows_here, dropped))
            slots.extend(j * n + q for q in compress(m, dropped))
            new_members.append(list(compress(m, flags)))
        offset += len(m)
    if not left_rows:
        return rows, members
    # one gather for both: the kept rows first, then those leaving
    both = rows.index_select(0, index_tensor(kept_rows + left_rows, rows.device))
    gone.append((both[len(kept_rows) :], slots))
    return both[: len(kept_rows)], new_members


def _starts(members) -> list[int]:
    starts, total = [], 0
    for m in members:
        starts.append(total)
        total += len(m)
    return starts


def _packed_block(
    blk, rows: Tensor, lengths: list[int], heads, attn, ffn, mode: str, batching: str
) -> Tensor:
    """One block over packed rows, each sub-layer on the rows of the images that keep it only.

    Heads at batch > 1 (``batching``): ``union`` (default) runs the heads any image keeps in one
    call and zeroes, per image, those it dropped (few large calls: what small CPU matmuls want);
    ``group`` runs each set of kept heads on its images alone (no head computed in vain, more calls).
    """
    b, c = len(lengths), rows.shape[1]
    if heads is None and attn is None and all(n == lengths[0] for n in lengths):
        return blk(rows.view(b, lengths[0], c)).view(-1, c)  # timm's own forward
    a, starts = blk.attn, None
    running = [s for s in range(b) if attn is None or attn[s]]
    groups: list[tuple[list[int] | None, list[int], list | None]] = []  # (heads run, images, per-image heads)
    if running and heads is not None and b > 1 and batching == "union":
        union = sorted({h for s in running for h in heads[s]})
        exact = all(len(heads[s]) == len(union) for s in running)
        kept = None if len(union) == a.num_heads else union
        groups.append((kept, running, None if exact else [heads[s] for s in running]))
    elif running:
        by_heads: dict[tuple | None, list[int]] = {}
        for s in running:
            by_heads.setdefault(
                None if heads is None or len(heads[s]) == a.num_heads else tuple(heads[s]), []
            ).append(s)
        groups = [(None if k is None else list(k), members, None) for k, members in by_heads.items()]
    for kept, members, per_image in groups:
        index, starts = _rows_of(members, lengths, starts, rows.device)
        count = rows.shape[0] if index is None else index.numel()
        if kept == [] and mode == "full":  # no head left: the projection's bias is all that remains
            if a.proj.bias is None:
                continue
            y = a.proj.bias.expand(count, c)
        else:
            xr = rows if index is None else rows.index_select(0, index)
            mask = None
            if per_image is not None:
                run = list(range(a.num_heads)) if kept is None else kept
                flags = torch.tensor([[h in set(hs) for h in run] for hs in per_image], device=rows.device)
                mask = flags.repeat_interleave(
                    index_tensor([lengths[s] for s in members], rows.device), dim=0
                )
            y = _packed_msa(a, blk.norm1(xr), [lengths[s] for s in members], kept, mode, mask)
        rows = _add_rows(rows, index, blk.ls1(y))
    members = [s for s in range(b) if ffn is None or ffn[s]]
    if members:
        index, starts = _rows_of(members, lengths, starts, rows.device)
        xr = rows if index is None else rows.index_select(0, index)
        rows = _add_rows(rows, index, blk.ls2(blk.mlp(blk.norm2(xr))))
    return rows


def _add_rows(rows: Tensor, index: Tensor | None, y: Tensor) -> Tensor:
    """``rows + y`` on the rows in ``index`` (all when None); in place when no gradient is recorded."""
    if index is None:
        return rows + y
    return rows.index_add_(0, index, y) if not torch.is_grad_enabled() else rows.index_add(0, index, y)


def _rows_of(members: list[int], lengths: list[int], starts, device) -> tuple[Tensor | None, list[int]]:
    """Row indices of the images ``members`` (None: every row), and the images' first rows."""
    if starts is None:
        starts = _starts([range(n) for n in lengths])
    if len(members) == len(lengths):
        return None, starts
    index = [r for s in members for r in range(starts[s], starts[s] + lengths[s])]
    return index_tensor(index, device), starts


def _packed_msa(
    a: TimmAttention,
    h: Tensor,
    lengths: list[int],
    kept: list[int] | None,
    mode: str,
    mask: Tensor | None = None,
) -> Tensor:
    """timm's attention on packed rows with only the heads in ``kept`` (None: all); ``mask [T, heads
    run]``: which of them each row's image keeps (None: all), the others deactivated per ``mode``."""
    t = h.shape[0]
    heads, d = a.num_heads, a.head_dim
    gate = getattr(a, "gate", None)
    if kept is None:
        q, k, v = a.qkv(h).view(t, 3, heads, d).unbind(1)
        q, k = a.q_norm(q), a.k_norm(k)
        o = packed_attention(q, k, v, lengths, a.fused_attn)
        if mask is not None:
            m = mask[..., None].to(o.dtype)
            o = o * m if mode == "full" else o * m + v * (1 - m)
        y = a.norm(o.reshape(t, heads * d))
        if gate is not None:
            y = y * gate(h).sigmoid()
        return a.proj_drop(a.proj(y))
    w = _sliced(a, kept, mode)
    qkv = F.linear(h, w["qkv_w"], w["qkv_b"])
    hk = len(kept)
    q, k = qkv[:, : 2 * hk * d].view(t, 2, hk, d).unbind(1)
    q, k = a.q_norm(q), a.k_norm(k)
    if mode == "full":
        v = qkv[:, 2 * hk * d :].view(t, hk, d)
        o = packed_attention(q, k, v, lengths, a.fused_attn)
        y = (o if mask is None else o * mask[..., None].to(o.dtype)).reshape(t, hk * d)
        if gate is not None:
            y = y * F.linear(h, w["gate_w"], w["gate_b"]).sigmoid()
        return a.proj_drop(F.linear(y, w["proj_w"], a.proj.bias))
    v = qkv[:, 2 * hk * d :].view(t, heads, d)
    y = v.clone()
    if hk:
        o = packed_attention(q, k, v[:, kept], lengths, a.fused_attn)
        if mask is not None:
            m = mask[..., None].to(o.dtype)
            o = o * m + v[:, kept] * (1 - m)
        y[:, kept] = o
    y = a.norm(y.reshape(t, heads * d))
    if gate is not None:
        y = y * gate(h).sigmoid()
    return a.proj_drop(a.proj(y))


def _sliced(a: TimmAttention, kept: list[int], mode: str) -> dict[str, Tensor | None]:
    """The kept heads' rows of qkv (and gate) and columns of proj. Without gradients they are cached
    on the module until any of those weights changes (a training step, a load); with gradients
    they are sliced afresh, so the weights get theirs."""
    gate = getattr(a, "gate", None)
    params = [a.qkv.weight, a.proj.weight] + ([gate.weight] if gate is not None else [])
    cached = not (torch.is_grad_enabled() and any(p.requires_grad for p in params))
    version = tuple((p._version, p.data_ptr()) for p in params)
    cache = a.__dict__.setdefault("_adavit_cache", {})
    key = (tuple(kept), mode)
    hit = cache.get(key) if cached else None
    if hit is not None and hit[0] == version:
        return hit[1]
    device = a.qkv.weight.device
    grad = contextlib.nullcontext() if not cached else torch.no_grad()
    with torch.inference_mode(False), grad:  # plain tensors, usable whatever mode the next call runs in
        rows = qkv_rows(kept, a.num_heads, a.head_dim, mode).to(device)
        channels = head_channels(kept, a.head_dim).to(device)
        w = {
            "qkv_w": a.qkv.weight.index_select(0, rows),
            "qkv_b": None if a.qkv.bias is None else a.qkv.bias.index_select(0, rows),
            "proj_w": a.proj.weight.index_select(1, channels),
            "gate_w": None if gate is None else gate.weight.index_select(0, channels),
            "gate_b": None if gate is None or gate.bias is None else gate.bias.index_select(0, channels),
        }
    if cached:
        if len(cache) >= 64:
            cache.clear()
        cache[key] = (version, w)
    return w


# -- cost -----------------------------------------------------------------------------------------
def flops_of_last_forward(model, batch: int) -> Tensor:
    """Each image's multiply-adds ``[B]`` in the last inference forward (fvcore's conventions)."""
    plan = model._adavit
    c = model.embed_dim
    stats = plan.stats
    if stats is None:  # no decision was taken: every image runs the whole model
        n = _patches(model) + model.num_prefix_tokens
        stats = [
            {"tokens": [n] * batch, "heads": [blk.attn.num_heads] * batch, "attn": [True] * batch,
             "ffn": [True] * batch, "decided": False}
            for blk in model.blocks
        ]  # fmt: skip
    total = torch.full((batch,), float(_outer_flops(model)), dtype=torch.float64)
    nets = _decision_nets(model)
    for i, (blk, s) in enumerate(zip(model.blocks, stats)):
        a = blk.attn
        tokens, heads, attn, ffn = (
            torch.tensor(s[k], dtype=torch.float64) for k in ("tokens", "heads", "attn", "ffn")
        )
        total += block_flops(
            tokens, heads, attn, ffn, dim=c, num_heads=a.num_heads, head_dim=a.head_dim, mlp=_mlp_flops(blk.mlp),
            mode=plan.head_mode, qk_norm=not isinstance(a.q_norm, nn.Identity), gated=getattr(a, "gate", None) is not None,
        )  # fmt: skip
        if i in nets and s["decided"]:
            total += decision_flops(model, i)
    return total


def decision_flops(model, block: int) -> int:
    """Multiply-adds of block ``block``'s decision network for one image (LayerNorm and linear).
    fvcore's trace leaves them out: their result goes to Python (``tolist``), not to the output."""
    net = _decision_nets(model)[block]
    return 5 * model.embed_dim + model.embed_dim * net.outputs


def _norm_flops(norm: nn.Module, elements: int) -> int:
    if isinstance(norm, nn.LayerNorm):
        return elements * (5 if norm.elementwise_affine else 4)
    if isinstance(norm, nn.Identity):
        return 0
    raise ValueError(f"adavit counts LayerNorm or no norm, not {type(norm).__name__}")


def _mlp_flops(mlp: nn.Module) -> int:
    """Multiply-adds per token of timm's ``Mlp``-like MLPs (fc1, optional norm, fc2)."""
    fc1, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
    if not isinstance(fc1, nn.Linear) or not isinstance(fc2, nn.Linear):
        raise ValueError(f"adavit counts FLOPs of timm's Mlp (fc1, fc2), not {type(mlp).__name__}")
    norm = getattr(mlp, "norm", nn.Identity())
    return (
        fc1.in_features * fc1.out_features
        + fc2.in_features * fc2.out_features
        + _norm_flops(norm, fc2.in_features)
    )


def _outer_flops(model) -> int:
    """Patch embedding, pre- and final norm (over all N tokens) and the head."""
    c, patches = model.embed_dim, _patches(model)
    n = patches + model.num_prefix_tokens
    proj = model.patch_embed.proj
    k = proj.weight.shape[1] * proj.weight.shape[2] * proj.weight.shape[3]
    total = patches * c * k + _norm_flops(model.norm_pre, n * c) + _norm_flops(model.norm, n * c)
    total += _norm_flops(model.fc_norm, c)
    if isinstance(model.head, nn.Linear):
        total += model.head.in_features * model.head.out_features
    return total


# -- patching -------------------------------------------------------------------------------------
_SUBCLASSES: dict[type, type] = {}


def _subclass(base: type) -> type:
    """One cached subclass per timm model class (isinstance checks against timm still hold),
    published in this module under its name so that a patched model pickles."""
    if base not in _SUBCLASSES:
        name = f"Adaptive{base.__name__}"
        cls = type(name, (_AdaptiveViT, base), {"__module__": __name__, "__qualname__": name})
        _SUBCLASSES[base] = globals()[name] = cls
    return _SUBCLASSES[base]


def apply(model: nn.Module, schedule: dict) -> nn.Module:
    """Patch ``model`` in place (re-applying replaces the schedule, keeping decision networks
    that still fit) and return it."""
    if any(type(m).__module__ == "nas.ops.timm_patch" for m in (model, *getattr(model, "blocks", ()))):
        raise ValueError("the model carries a token-reduction patch (nas.ops.timm_patch): remove it first")
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"adavit supports timm VisionTransformer models, got {type(model).__name__}")
    plan = _parse(schedule, len(model.blocks))
    _check(model, plan)
    plan.num_prefix = model.num_prefix_tokens
    old = model.__dict__.get("_modules", {}).get("adavit") if isinstance(model, _AdaptiveViT) else None
    if not _fits(old, model, plan.start):
        device, dtype = model.cls_token.device, model.cls_token.dtype
        nets = nn.ModuleDict(
            {
                str(i): DecisionNet(model.embed_dim, _patches(model), blk.attn.num_heads)
                for i, blk in enumerate(model.blocks)
                if i >= plan.start
            }
        ).to(device, dtype)
    else:
        nets = old
    if not isinstance(model, _AdaptiveViT):
        model.__class__ = _subclass(type(model))
    model.adavit = nets
    model._adavit = plan
    return model


def _fits(nets, model, start: int) -> bool:
    if nets is None or sorted(int(k) for k in nets) != list(range(start, len(model.blocks))):
        return False
    return all(
        nets[str(i)].patches == _patches(model) and nets[str(i)].heads == model.blocks[i].attn.num_heads
        for i in range(start, len(model.blocks))
    )


def remove(model: nn.Module) -> nn.Module:
    """Undo ``apply`` (a no-op on an unpatched model): the decision networks go too."""
    if isinstance(model, _AdaptiveViT):
        model.__class__ = model.__class__.__bases__[1]
        model.__dict__.pop("_adavit", None)
        model._modules.pop("adavit", None)
        for blk in model.blocks:
            blk.attn.__dict__.pop("_adavit_cache", None)
    return model


def is_adaptive(model: nn.Module) -> bool:
    return isinstance(model, _AdaptiveViT)


def set_budget(model: nn.Module, budget: dict[str, float]) -> None:
    """Change the budgets of the kinds decided (training draws one per step); the kinds stay."""
    plan = _plan(model)
    if set(budget) != set(plan.budget):
        raise ValueError(
            f"set_budget: budgets for {sorted(budget)}, but the model decides {sorted(plan.budget)}"
        )
    plan.budget = {k: float(budget[k]) for k in KINDS if k in budget}
    plan.biases = {}


@contextlib.contextmanager
def decisions_off(model: nn.Module):
    """Within: the model runs whole (every decision off), e.g. as its own distillation teacher."""
    plan = _plan(model)
    kept = plan.budget
    plan.budget = {}
    try:
        yield model
    finally:
        plan.budget = kept


def set_generator(model: nn.Module, generator: torch.Generator | None) -> None:
    """The random stream of the Gumbel noise in training (None: torch's global one)."""
    _plan(model).generator = generator


def set_noise(model: nn.Module, scale: float) -> None:
    """Scale of the Gumbel noise in training: 1 samples as AdaViT does, 0 takes inference's decisions."""
    _plan(model).noise = float(scale)


def usage(model: nn.Module) -> dict[str, Tensor] | None:
    """Each sample's kept fraction per kind in the last forward ([B]; differentiable in training)."""
    plan = _plan(model)
    if plan.usage is None and plan.stats is not None:  # inference: from the decisions it recorded
        decided = [s for s in plan.stats if s["decided"]]
        heads = model.blocks[0].attn.num_heads
        per_kind = {
            "patch": [[(t - plan.num_prefix) / plan.patches_total for t in s["tokens"]] for s in decided],
            "head": [[h / heads for h in s["heads"]] for s in decided],
            "block": [[(a + f) / 2 for a, f in zip(s["attn"], s["ffn"])] for s in decided],
        }
        plan.usage = {
            k: torch.tensor(v, dtype=torch.float32).mean(dim=0)
            for k, v in per_kind.items()
            if k in plan.budget and v
        }
    return plan.usage


def budget(model: nn.Module) -> dict[str, float]:
    return dict(_plan(model).budget)


def _plan(model: nn.Module) -> _Plan:
    if not isinstance(model, _AdaptiveViT):
        raise ValueError("the model is not patched with adavit (nas.ops.adavit_patch.apply)")
    return model._adavit
