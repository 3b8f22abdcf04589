"""Token merging by bipartite soft matching (ToMe, Bolya et al. 2023 ICLR).

The non-prefix tokens are split alternately into A (even positions) and B (odd positions); each A
token finds its most similar B token by cosine similarity of the metric (the attention keys
averaged over heads); the `r` A tokens with the best matches are merged into their B tokens by a
size-weighted average, and sizes add. Written from the paper, not from the reference code.

Unlike the reference, surviving tokens keep their original relative order (prefix first), so a
later 1D operator over the sequence (depthwise conv, conv pooling) still sees near neighbours. The
merge itself is one row gather of the kept tokens plus `r`-row updates: no full-size scatter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


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
    runs in parallel and pays a thread wake-up (~40 µs on 2 cores) for a few rows.
    """
    if rows.numel() < 32768:
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
def bipartite_soft_matching(metric: Tensor, r: int, num_prefix: int = 1) -> Merge:
    """Match `metric [B, N, C]` (keys averaged over heads) and pick the `r` best A→B merges."""
    b, n, _ = metric.shape
    r = clamp_r(r, n, num_prefix)
    if r == 0:
        return identity_merge(b, n, metric.device)
    m = metric[:, num_prefix:]
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    best, match = (m[:, ::2] @ m[:, 1::2].transpose(1, 2)).max(dim=-1)  # per A token: best B
    src_a = best.topk(r, dim=-1).indices  # [B, r] indices into A
    first = torch.arange(num_prefix, b * n, n, device=metric.device).unsqueeze(1)  # flat row of token p
    src = (first + 2 * src_a).view(-1)
    dst = (first + 1 + 2 * match.gather(1, src_a)).view(-1)
    keep = torch.ones(b * n, dtype=torch.bool, device=metric.device).index_fill_(0, src, 0)
    pos = keep.cumsum(dim=0) - 1  # every sample keeps n - r rows, so this is the flat output row
    return Merge(b, n, keep.nonzero().squeeze(1), src, dst, pos.index_select(0, dst))


def merge_wavg(merge: Merge, x: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Functional form of `merge.merge`: size-weighted average merge."""
    return merge.merge(x, size)


def tome_schedule(r: int | Sequence[int] | dict, num_layers: int) -> list[int]:
    """Merges per layer from an int (constant), a list (one per layer) or a rule dict.

    Rules: `{"rule": "constant", "r": 8}`, `{"rule": "decreasing", "start": 16}` (linear from
    `start` at the first layer down to 0 at the last).
    """
    if isinstance(r, bool):
        raise ValueError(f"ToMe r must be an int, a list or a rule dict, got {r!r}")
    if isinstance(r, int):
        out = [r] * num_layers
    elif isinstance(r, dict):
        rule = r.get("rule")
        if rule == "constant" and set(r) == {"rule", "r"}:
            return tome_schedule(r["r"], num_layers)
        if rule == "decreasing" and set(r) == {"rule", "start"} and isinstance(r["start"], int):
            start, last = r["start"], max(num_layers - 1, 1)
            out = [round(start * (last - i) / last) for i in range(num_layers)]
        else:
            raise ValueError(
                f"ToMe r rule {r!r} is not one of {{'rule': 'constant', 'r': int}}, {{'rule': 'decreasing', 'start': int}}"
            )
    else:
        out = list(r)
        if len(out) != num_layers:
            raise ValueError(f"ToMe r schedule has {len(out)} entries but the model has {num_layers} layers")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in out):
        raise ValueError(f"ToMe r values must be non-negative ints, got {out}")
    return out
