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

Either way the merge is one row gather of the kept tokens plus `r`-row updates: no full-size scatter.
Every tensor has a shape fixed by `(B, N, r)` (no `nonzero` or boolean-mask indexing), so the
matching compiles without graph breaks (`torch.compile(fullgraph=True)`) and exports (ONNX) with
a dynamic batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

ORDERS = ("reference", "spatial")


@dataclass(frozen=True)
class Merge:
    """A matching, as flat row indices into `x.reshape(B * N, C)`; apply it with `merge`.

    keep: the rows that survive, in output order `[B * M]`; src: the merged-away rows `[B * r]`;
    dst: the row each of them merges into; slot: that row's position in the output `[B * r]`.
    """

    batch: int
    tokens: int
    keep: Tensor
    src: Tensor
    dst: Tensor
    slot: Tensor

    @property
    def out_tokens(self) -> int:
        return self.keep.numel() // self.batch

    def merge(self, x: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Size-weighted average of each group; returns `(x [B, M, C], size [B, M, 1])`.

        Computed as `x_dst + sum_i s_i (x_i - x_dst) / S`, which touches only the merged rows
        after the gather of the kept ones.
        """
        b, n, c = x.shape
        xf = x.reshape(b * n, c)
        out = xf.index_select(0, self.keep)
        if size is None:
            s_src = x.new_ones(self.src.numel(), 1)
            s_out = x.new_ones(self.keep.numel(), 1)
        else:
            sf = size.reshape(b * n, 1)
            s_src = sf.index_select(0, self.src)
            s_out = sf.index_select(0, self.keep)
        s_out = _add_rows(s_out, self.slot, s_src)  # in place: fresh tensors from the gathers
        delta = (xf.index_select(0, self.src) - xf.index_select(0, self.dst)) * (
            s_src / s_out.index_select(0, self.slot)
        )
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
    b, n, _ = metric.shape
    r = clamp_r(r, n, num_prefix)
    if r == 0:
        return identity_merge(b, n, metric.device)
    if order == "reference":
        return _reference_matching(metric, r, num_prefix)
    m = metric[:, num_prefix:]
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    best, match = (m[:, ::2] @ m[:, 1::2].transpose(1, 2)).max(dim=-1)  # per A token: best B
    src_a = best.topk(r, dim=-1).indices  # [B, r] indices into A
    first = torch.arange(num_prefix, b * n, n, device=metric.device).unsqueeze(1)  # flat row of token p
    src = (first + 2 * src_a).view(-1)
    dst = (first + 1 + 2 * match.gather(1, src_a)).view(-1)
    keep = torch.ones(b * n, dtype=torch.bool, device=metric.device).index_fill_(0, src, 0)
    pos = keep.cumsum(dim=0) - 1  # every sample keeps n - r rows, so this is the flat output row
    rows = torch.arange(b * n, device=metric.device)
    return Merge(b, n, _kept_rows(keep, pos, rows, b * (n - r)), src, dst, pos.index_select(0, dst))


def _kept_rows(keep: Tensor, pos: Tensor, rows: Tensor, count: int) -> Tensor:
    """`rows[keep]` in order, given `pos = keep.cumsum(0) - 1` and `count = keep.sum()` (known
    from the shapes): a permutation scatter instead of boolean indexing, so the result's shape
    does not depend on the data (no graph break under `torch.compile`, exportable)."""
    dropped = (~keep).cumsum(dim=0) - 1 + count  # the dropped rows go after the kept ones
    order = torch.where(keep, pos, dropped)
    return torch.zeros_like(rows).scatter_(0, order, rows)[:count]


def _reference_matching(metric: Tensor, r: int, p: int) -> Merge:
    """ToMe as published: A = even positions, B = odd, over the whole sequence; prefix protected.

    Output order: prefix, unmerged non-prefix A, non-prefix B (each in sequence order). `r` is
    already clamped, so it never exceeds the non-prefix A tokens and a -inf row is never picked.
    """
    b, n, _ = metric.shape
    dev = metric.device
    m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)  # [B, |A|, |B|]
    scores[:, : (p + 1) // 2] = -torch.inf  # prefix tokens at even positions never merge ...
    scores[:, :, : p // 2] = -torch.inf  # ... and those at odd positions never take a merge
    best, match = scores.max(dim=-1)
    src_a = best.topk(r, dim=-1).indices  # [B, r] indices into A
    dst_b = match.gather(1, src_a)  # [B, r] indices into B, never a prefix column
    first = torch.arange(0, b * n, n, device=dev).unsqueeze(1)  # flat row of each sample's token 0
    src, dst = (first + 2 * src_a).view(-1), (first + 2 * dst_b + 1).view(-1)
    # output order of all n positions (built from aranges only: a static permutation of n)
    even = torch.arange(p + p % 2, n, 2, device=dev)
    perm = torch.cat([torch.arange(p, device=dev), even, torch.arange(p + 1 - p % 2, n, 2, device=dev)])
    kept = torch.ones(b * n, dtype=torch.bool, device=dev).index_fill_(0, src, 0).view(b, n)[:, perm]
    out_row = (kept.view(-1).cumsum(dim=0) - 1).view(b, n)  # flat output row of each place (n - r per sample)
    slot = out_row.gather(1, dst_b + (p + even.numel() - p // 2))  # B index k sits at p + |even| + k - p//2
    keep = _kept_rows(kept.view(-1), out_row.view(-1), (first + perm).view(-1), b * (n - r))
    return Merge(b, n, keep, src, dst, slot.view(-1))


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
