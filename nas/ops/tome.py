"""Token merging by bipartite soft matching (ToMe, Bolya et al. 2023 ICLR), in two orders.

Each token of set A finds its most similar token of set B by cosine similarity of the metric (the
attention keys averaged over heads); the `r` A tokens with the best matches are merged into their B
tokens by a size-weighted average, and sizes add. Prefix tokens (class, distillation, registers)
are never merged. Written from the paper; outputs checked against the reference code (none of it
copied). Two variants, by `order`:

- `reference` (ToMe as published; the default of `nas.ops.timm_patch`, since the paper's accuracies
  were measured with it): A and B alternate over the whole sequence, position 0 (the class token) in
  A, so A = positions 0, 2, 4, ... and B = 1, 3, 5, ...; prefix tokens in A never merge and prefix
  tokens in B never receive a merge. The output is the prefix, then the unmerged non-prefix A tokens
  in sequence order, then every non-prefix B token in sequence order (the merged groups sit where
  their B token is in that list). Where the reference code leaves a model without a class token in
  score order, this one keeps sequence order too.
- `spatial` (vitnas's order-keeping variant; the default here, used by the psvit family, whose
  supernet checkpoints were trained with it): A and B alternate over the non-prefix tokens only
  (the first non-prefix token in A), and every survivor keeps its sequence position (prefix
  first), so a later 1D operator over the sequence (depthwise conv, conv pooling) still sees near
  neighbours.

Either way the merge is one row gather (the kept tokens and both ends of every merge) plus `r`-row
updates: no full-size scatter. Every tensor has a shape fixed by `(B, N, r)` (no `nonzero` or
boolean-mask indexing), so the matching compiles without graph breaks
(`torch.compile(fullgraph=True)`) and exports (ONNX) with a dynamic batch.

Cheap at batch 1, where a matching is a chain of small ops whose fixed costs (dispatch, a thread
wake-up per parallel op, caches cold after the attention's matmuls) outweigh their arithmetic:
the index tensors that depend only on the shapes are built once per `(device, B, N, prefix, r)`;
the survivors come from one scatter and one top-k over a rank vector instead of cumulative sums;
the kept, source and destination rows are one index tensor, so `merge` gathers once; and small
work runs on one thread (`serial`). The outputs (tokens, sizes, indices, the choice among ties)
are bit-for-bit those of the straightforward formulation (`tests/ops/test_tome.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from nas.ops.small_work import register_constants, serial, shape_constants

ORDERS = ("reference", "spatial")


@dataclass(eq=False, slots=True)
class Merge:
    """A matching, as flat row indices into `x.reshape(B * N, C)`; apply it with `merge`.

    keep: the rows that survive, in output order `[B * M]`; src: the merged-away rows `[B * r]`;
    dst: the row each of them merges into; slot: that row's position in the output `[B * r]`.
    rows: optionally `keep`, `src` and `dst` in one tensor (those three are then views of it), so
    that `merge` gathers everything it reads in one op.
    """

    batch: int
    tokens: int
    keep: Tensor
    src: Tensor
    dst: Tensor
    slot: Tensor
    rows: Tensor | None = None

    @classmethod
    def from_rows(cls, batch: int, tokens: int, rows: Tensor, merges: int, slot: Tensor) -> Merge:
        """From `rows = [keep, src, dst]` (flat), `merges` = B * r."""
        kept = rows.shape[0] - 2 * merges
        src, dst = rows[kept : kept + merges], rows[kept + merges :]
        return cls(batch, tokens, rows[:kept], src, dst, slot, rows)

    @property
    def out_tokens(self) -> int:
        return self.keep.numel() // self.batch

    def merge(self, x: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Size-weighted average of each group; returns `(x [B, M, C], size [B, M, 1])`.

        Computed as `x_dst + sum_i s_i (x_i - x_dst) / S`, which touches only the merged rows
        after the gather of the kept ones.
        """
        b, n, c = x.shape
        k, r = self.keep.shape[0], self.src.shape[0]
        with serial(b * n * c):
            xf = x.reshape(b * n, c)
            if self.rows is None:
                out, x_src, x_dst = (xf.index_select(0, i) for i in (self.keep, self.src, self.dst))
            else:  # one gather; `out` is the leading part of it
                rows = xf.index_select(0, self.rows)
                out, x_src, x_dst = rows[:k], rows[k : k + r], rows[k + r :]
            if size is None:
                ones = x.new_ones(k + r, 1)
                s_out, s_src = ones[:k], ones[k:]
            elif self.rows is None or size.requires_grad:
                sf = size.reshape(b * n, 1)
                s_out, s_src = sf.index_select(0, self.keep), sf.index_select(0, self.src)
            else:
                sizes = size.reshape(b * n, 1).index_select(0, self.rows[: k + r])
                s_out, s_src = sizes[:k], sizes[k:]
            s_out = _add_rows(s_out, self.slot, s_src)  # in place: fresh tensors from the gathers
            delta = (x_src - x_dst) * (s_src / s_out.index_select(0, self.slot))
            _add_rows(out, self.slot, delta)
        m = self.out_tokens
        return out.view(b, m, c), s_out.view(b, m, 1)

    def merge_source(self, source: Tensor) -> Tensor:
        """Union of the input patches each group holds: `source [B, N, N0]` 0/1 → `[B, M, N0]`."""
        b, n, n0 = source.shape
        sf = source.reshape(b * n, n0)
        return _add_rows(sf.index_select(0, self.keep), self.slot, sf.index_select(0, self.src)).view(
            b, -1, n0
        )


def _add_rows(out: Tensor, index: Tensor, rows: Tensor) -> Tensor:
    """`out[index] += rows` in place, duplicates summed.

    Below PyTorch's parallel grain a serial accumulating `index_put_` is used: a small `index_add_`
    runs in parallel and pays a thread wake-up (~40 µs on 2 cores) for a few rows. Under
    `torch.compile`/`torch.export` it is always `index_put_`, so a dynamic batch size puts no guard
    on the graph (both sum the same rows).
    """
    if torch.compiler.is_compiling() or rows.numel() < 32768:
        return out.index_put_((index,), rows, accumulate=True)
    return out.index_add_(0, index, rows)


def _reference_constants(device: torch.device, b: int, n: int, p: int, r: int) -> tuple[Tensor, ...]:
    """Shape constants of the reference order for `b` samples of `n` tokens, `p` prefix, `r` merges.

    `rank` (float `[|A|]`: |A| - j for the mergeable A tokens j, 0 for the prefix ones: the largest
    |A| - pa - r of a copy with the merged ones zeroed are the unmerged ones, in sequence order);
    `zeros [p]` and `b_index` (the non-prefix B indices k) that stand in the index list for the
    prefix and B tokens; `base` such that `base + 2 * [prefix 0s, unmerged A, B indices, src A,
    dst B]` (flattened per part over the batch) are the flat rows `[keep, src, dst]` of
    `[B * n, C]`; `slot_base`: `dst B index + slot_base` is that token's flat output row.
    """
    size_a, size_b, pa, pb = (n + 1) // 2, n // 2, (p + 1) // 2, p // 2
    j = torch.arange(size_a, device=device)
    rank = torch.where(j >= pa, size_a - j, 0).float()
    unmerged = size_a - pa - r
    m = n - r
    local = torch.cat(
        [
            torch.arange(p, device=device),  # prefix: its positions
            torch.zeros(unmerged, dtype=torch.long, device=device),  # A: 2j
            torch.ones(size_b - pb, dtype=torch.long, device=device),  # B: 2k + 1
        ]
    )
    sample = torch.arange(b, device=device).unsqueeze(1)
    base = torch.cat(
        [
            (local + n * sample).view(-1),
            (n * sample).expand(b, r).reshape(-1),  # src: 2j
            (n * sample + 1).expand(b, r).reshape(-1),  # dst: 2k + 1
        ]
    )
    slot_base = m * sample + (p + unmerged - pb)
    zeros = torch.zeros(p, dtype=torch.long, device=device)
    return rank, zeros, torch.arange(pb, size_b, device=device), base, slot_base


def _spatial_constants(device: torch.device, b: int, n: int, r: int) -> tuple[Tensor, ...]:
    """Shape constants of the spatial order: `rank` (float `[n]`: n - i; the largest n - r of a copy
    with the merged tokens zeroed are the survivors in sequence order), `base` (the flat row of
    each sample's token 0, for every entry of `[keep, src, dst]`) and `slot_base` (the flat output
    row of each sample's first output token, `[B, 1]`)."""
    sample = torch.arange(b, device=device).unsqueeze(1)
    base = torch.cat([(n * sample).expand(b, k).reshape(-1) for k in (n - r, r, r)])
    return torch.arange(n, 0, -1, device=device).float(), base, (n - r) * sample


register_constants("reference", _reference_constants)
register_constants("spatial", _spatial_constants)


def identity_merge(batch: int, tokens: int, device: torch.device | None = None) -> Merge:
    """The matching that merges nothing (r = 0)."""
    empty = torch.empty(0, dtype=torch.long, device=device)
    return Merge(batch, tokens, torch.arange(batch * tokens, device=device), empty, empty, empty)


def clamp_r(r: int, tokens: int, num_prefix: int = 1) -> int:
    """At most floor(n / 2) merges of the n non-prefix tokens (= |B|, as `nas.arch` counts them)."""
    return max(0, min(r, (tokens - num_prefix) // 2))


@torch.no_grad()
def bipartite_soft_matching(metric: Tensor, r: int, num_prefix: int = 1, order: str = "spatial") -> Merge:
    """Match `metric [B, N, C]` (keys averaged over heads) and pick the `r` best A→B merges.

    `order` is `spatial` (default: what the psvit supernet was trained with) or `reference`
    (ToMe as published); the module docstring says how they differ.
    """
    if order not in ORDERS:
        raise ValueError(f"ToMe order must be one of {', '.join(ORDERS)}, got {order!r}")
    b, n, c = metric.shape
    r = clamp_r(r, n, num_prefix)
    if r == 0:
        return identity_merge(b, n, metric.device)
    with serial(b * n * c):
        if order == "reference":
            return _reference_matching(metric, r, num_prefix)
        return _spatial_matching(metric, r, num_prefix)


def _spatial_matching(metric: Tensor, r: int, p: int) -> Merge:
    """vitnas's order: A/B alternate over the non-prefix tokens; survivors keep sequence order."""
    b, n, _ = metric.shape
    m = metric[:, p:]
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    best, match = (m[:, ::2] @ m[:, 1::2].transpose(1, 2)).max(dim=-1)  # per A token: best B
    src_a = best.topk(r, dim=-1).indices  # [B, r] indices into A
    src = 2 * src_a + p  # token positions
    dst = 2 * match.gather(1, src_a) + (p + 1)
    rank, base, slot_base = shape_constants("spatial", metric.device, b, n, r)
    keep = rank.expand(b, n).scatter(1, src, 0.0).topk(n - r, dim=-1).indices  # survivors, in order
    slot = dst - (dst.unsqueeze(2) > src.unsqueeze(1)).sum(dim=-1)  # minus the merged tokens before it
    if torch.compiler.is_compiling() or b > 1:  # sample offsets (none for one sample)
        rows = torch.cat([keep.view(-1), src.view(-1), dst.view(-1)]) + base
        slot = slot + slot_base
    else:
        rows = torch.cat([keep, src, dst], dim=1).view(-1)
    return Merge.from_rows(b, n, rows, b * r, slot.view(-1))


def _reference_matching(metric: Tensor, r: int, p: int) -> Merge:
    """ToMe as published: A = even positions, B = odd, over the whole sequence; prefix protected.

    Output order: prefix, unmerged non-prefix A, non-prefix B (each in sequence order). `r` is
    already clamped, so it never exceeds the non-prefix A tokens and a -inf row is never picked.
    """
    b, n, _ = metric.shape
    m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)  # [B, |A|, |B|]
    pa, pb = (p + 1) // 2, p // 2
    scores[:, :pa] = -torch.inf  # prefix tokens at even positions never merge ...
    if pb:
        scores[:, :, :pb] = -torch.inf  # ... and those at odd positions never take a merge
    best, match = scores.max(dim=-1)
    src_a = best.topk(r, dim=-1).indices  # [B, r] indices into A
    dst_b = match.gather(1, src_a)  # [B, r] indices into B, never a prefix column
    rank, zeros, b_index, base, slot_base = shape_constants("reference", metric.device, b, n, p, r)
    unmerged = scores.shape[1] - pa - r
    unm_a = rank.expand(b, -1).scatter(1, src_a, 0.0).topk(unmerged, dim=-1).indices  # in order
    parts = [zeros.expand(b, -1), unm_a, b_index.expand(b, -1)][0 if p else 1 :]
    if torch.compiler.is_compiling() or b > 1:  # [keep of every sample, src of every sample, dst ...]
        index = torch.cat([torch.cat(parts, dim=1).view(-1), src_a.view(-1), dst_b.view(-1)])
    else:  # one sample: one cat
        index = torch.cat([*parts, src_a, dst_b], dim=1).view(-1)
    rows = torch.add(base, index, alpha=2)
    return Merge.from_rows(b, n, rows, b * r, (dst_b + slot_base).view(-1))


def merge_wavg(merge: Merge, x: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Functional form of `merge.merge`: size-weighted average merge."""
    return merge.merge(x, size)


def tome_schedule(r: int | Sequence[int] | dict, num_layers: int) -> list[int]:
    """Merges per layer from an int (constant), a list (one per layer) or a rule dict.

    Rules: `{"rule": "constant", "r": 8}`; `{"rule": "decreasing", "start": 16}` (linear from
    `start` at the first layer down to 0 at the last, rounded to nearest); `{"rule": "inflection",
    "r": 8, "inflection": -1}`, the reference code's `r=(8, -1)` form: linear from
    `int(r * (1 - inflection))` to `2r` minus that, each value truncated as the reference does
    (inflection -1 is the paper's decreasing schedule, 0 constant r, +1 increasing).
    `decreasing` with `start = 2r` is the reference's `(r, -1)` but for rounding: with 12 layers
    `start=16` gives 16, 15, 13, 12, 10, 9, 7, 6, 4, 3, 1, 0 where `(8, -1)` gives
    16, 14, 13, 11, 10, 8, 7, 5, 4, 2, 1, 0; use the `inflection` rule to match it exactly.
    """
    if isinstance(r, bool):
        raise ValueError(f"ToMe r must be an int, a list or a rule dict, got {r!r}")
    if isinstance(r, int):
        out = [r] * num_layers
    elif isinstance(r, dict):
        rule = r.get("rule")
        if rule == "constant" and set(r) == {"rule", "r"}:
            return tome_schedule(r["r"], num_layers)
        if rule == "decreasing" and set(r) == {"rule", "start"} and _is_int(r["start"]):
            start, last = r["start"], max(num_layers - 1, 1)
            out = [round(start * (last - i) / last) for i in range(num_layers)]
        elif rule == "inflection" and set(r) == {"rule", "r", "inflection"} and _is_int(r["r"]):
            out = _inflection_schedule(r["r"], r["inflection"], num_layers)
        else:
            raise ValueError(
                f"ToMe r rule {r!r} is not one of {{'rule': 'constant', 'r': int}}, "
                "{'rule': 'decreasing', 'start': int}, {'rule': 'inflection', 'r': int, 'inflection': float}"
            )
    else:
        out = list(r)
        if len(out) != num_layers:
            raise ValueError(f"ToMe r schedule has {len(out)} entries but the model has {num_layers} layers")
    if not all(_is_int(v) and v >= 0 for v in out):
        raise ValueError(f"ToMe r values must be non-negative ints, got {out}")
    return out


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _inflection_schedule(r: int, inflection: object, num_layers: int) -> list[int]:
    """The reference's `(r, inflection)` schedule, float for float, so the lists agree exactly."""
    if isinstance(inflection, bool) or not isinstance(inflection, (int, float)) or not -1 <= inflection <= 1:
        raise ValueError(f"ToMe r inflection must be a number in [-1, 1], got {inflection!r}")
    if r < 0:
        raise ValueError(f"ToMe r values must be non-negative ints, got {r}")
    low = int(r * (1.0 - inflection))
    step = (2 * r - 2 * low) / max(num_layers - 1, 1)
    return [int(low + step * i) for i in range(num_layers)]
