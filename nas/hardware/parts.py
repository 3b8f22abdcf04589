"""The measurable parts of a ``VitnasSubnet``, for kernel-level latency prediction.

nn-Meter (Zhang et al., "nn-Meter: towards accurate latency prediction of deep-learning model
inference on diverse edge devices", MobiSys 2021) predicts a network's latency as the sum of the
latencies of the kernels it runs. Here the kernels are the steps ``nas.supernet.blocks`` runs in
sequence: the stem, each cell (attention, the token reduction after it, MLP), the pooling between
stages and the head. A part's latency depends on discrete settings, taken exactly from the space's
choice lists (its ``key``), and on the token count ``n`` entering it, which the predictor
interpolates. Cells and pools run the subnet's own forward functions on real modules, so what is
measured is what the subnet computes.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nas.arch import ArchConfig, Reduction, StageConfig
from nas.families import require
from nas.families.psvit import stage_structures
from nas.space import SearchSpace
from nas.supernet import blocks


@dataclass(frozen=True)
class StemPart:
    """Patch embedding, class token and position embedding (``n`` is the fixed token count)."""

    in_chans: int
    image_size: int
    patch: int
    dim: int

    @property
    def key(self) -> str:
        return f"stem in={self.in_chans} img={self.image_size} patch={self.patch} d={self.dim}"

    def module(self, n: int) -> tuple[nn.Module, tuple[int, ...]]:
        return _Stem(self, n), (self.in_chans, self.image_size, self.image_size)


@dataclass(frozen=True)
class CellPart:
    """One computing cell, with the reduction (if any) that runs after its attention.

    ``need_attn``: the cell forms its attention map for a following ``share`` cell; ``sized``:
    an earlier reduction in the stage gave tokens sizes (proportional attention, weighted merges).
    """

    dim: int
    heads: int
    hidden: int
    cell: str
    attention: str
    need_attn: bool
    sized: bool
    reduce: str = "none"
    r: int = 0
    keep_rate: float = 1.0
    method: str = "kmedoids"  # clustering method; the default for the other kinds

    @property
    def key(self) -> str:
        red = {
            "tome": f" r={self.r}",
            "evit": f" keep={self.keep_rate}",
            "cluster": f" keep={self.keep_rate} {self.method}",
        }
        return (
            f"cell d={self.dim} h={self.heads} mlp={self.hidden} {self.cell} {self.attention}"
            f" map={int(self.need_attn)} sized={int(self.sized)} {self.reduce}{red.get(self.reduce, '')}"
        )

    def reduction(self) -> Reduction:
        if self.reduce == "tome":
            return Reduction(kind="tome", r=(self.r,))
        if self.reduce in ("evit", "cluster"):
            return Reduction(kind=self.reduce, keep_rate=self.keep_rate, at=(0,), method=self.method)
        return Reduction()

    def module(self, n: int) -> tuple[nn.Module, tuple[int, ...]]:
        return _Cell(self, n), (n, self.dim)


@dataclass(frozen=True)
class PoolPart:
    """Pooling into a stage of ``out_tokens`` (class token included) from ``n`` tokens."""

    kind: str
    in_dim: int
    out_dim: int
    out_tokens: int

    @property
    def key(self) -> str:
        return f"pool {self.kind} {self.in_dim}->{self.out_dim} to={self.out_tokens}"

    def module(self, n: int) -> tuple[nn.Module, tuple[int, ...]]:
        return _Pool(self, n), (n, self.in_dim)


@dataclass(frozen=True)
class HeadPart:
    """Final norm of the class token and the classifier."""

    dim: int
    num_classes: int

    @property
    def key(self) -> str:
        return f"head d={self.dim} classes={self.num_classes}"

    def module(self, n: int) -> tuple[nn.Module, tuple[int, ...]]:
        return _Head(self), (n, self.dim)


Part = StemPart | CellPart | PoolPart | HeadPart


# -- an architecture as parts ------------------------------------------------------------------
def decompose(arch: ArchConfig) -> list[tuple[Part, int]]:
    """The parts ``VitnasSubnet(arch)`` runs, in order, each with the token count entering it."""
    first = arch.stages[0]
    parts: list[tuple[Part, int]] = [
        (StemPart(arch.in_chans, arch.image_size, arch.patch_size, first.dim), first.tokens)
    ]
    prev: StageConfig | None = None
    for st in arch.stages:
        if prev is not None:
            parts.append((PoolPart(st.pool, prev.dim, st.dim, st.tokens), _pool_input(st.pool, prev)))
        parts += stage_cells(st)
        prev = st
    parts.append((HeadPart(prev.dim, arch.num_classes), prev.exit_tokens))
    return parts


def _pool_input(kind: str, prev: StageConfig) -> int:
    """Tokens a pool reads: a positional pool the previous stage's input positions (refilled after
    its reductions, see ``blocks.restore_positions``), any other pool the tokens that stage left."""
    return prev.tokens if kind in blocks.POSITIONAL_POOLS else prev.exit_tokens


def stage_cells(st: StageConfig) -> list[tuple[CellPart, int]]:
    """The computing cells of a stage as parts, from the subnet's own plan (``blocks.stage_plan``)."""
    hidden = blocks.mlp_hidden(st.dim, st.mlp_ratio)
    n, sized, cells = st.tokens, False, []
    for plan in blocks.stage_plan(st):
        if plan.kind == "identity":
            continue
        keep = plan.keep_rate if plan.reduce in ("evit", "cluster") else 1.0
        method = plan.method if plan.reduce == "cluster" else "kmedoids"
        part = CellPart(
            dim=st.dim,
            heads=st.heads,
            hidden=hidden,
            cell=plan.kind,
            attention=st.attention,
            need_attn=plan.need_attn,
            sized=sized,
            reduce=plan.reduce,
            r=plan.r,
            keep_rate=keep,
            method=method,
        )
        cells.append((part, n))
        n, sized = plan.tokens_out, sized or plan.reduce != "none"
    return cells


# -- every part a space can need ------------------------------------------------------------------
def space_parts(space: SearchSpace) -> dict[Part, set[int]]:
    """Every part any member of ``space`` runs, with every token count it can enter it with.

    Exact, not sampled: it walks each stage's token choices, the floor the next stage sets, and the
    stage structures the space itself enumerates for counting.
    """
    spec = space.spec
    require(space, "psvit", "a latency table")
    found: dict[Part, set[int]] = defaultdict(set)
    first = spec.stages[0]
    for dim in first.dim:
        found[StemPart(spec.in_chans, spec.image_size, spec.patch_size, dim)].add(first.tokens[0])
    # the previous stage's exit and input token counts, by the tokens this stage takes
    exits: dict[int, set[int]] = {}
    entries: dict[int, set[int]] = {}
    for i, choices in enumerate(spec.stages):
        floors = spec.stages[i + 1].tokens if i + 1 < len(spec.stages) else (2,)
        next_exits: dict[int, set[int]] = defaultdict(set)
        next_entries: dict[int, set[int]] = defaultdict(set)
        for tokens, floor in itertools.product(choices.tokens, floors):
            for attention, cells, reduction in stage_structures(choices, tokens, floor):
                for dim, heads, ratio in itertools.product(choices.dim, choices.heads, choices.mlp_ratio):
                    st = StageConfig(
                        tokens=tokens,
                        dim=dim,
                        heads=heads,
                        mlp_ratio=ratio,
                        attention=attention,
                        cells=cells,
                        reduction=reduction,
                    )
                    for part, n in stage_cells(st):
                        found[part].add(n)
                    next_exits[floor].add(st.exit_tokens)
                    next_entries[floor].add(tokens)
        if i:
            prev_dims = spec.stages[i - 1].dim
            for kind, in_dim, out_dim, tokens in itertools.product(
                choices.pool, prev_dims, choices.dim, choices.tokens
            ):
                entering = entries if kind in blocks.POSITIONAL_POOLS else exits
                found[PoolPart(kind, in_dim, out_dim, tokens)].update(entering[tokens])
        exits, entries = next_exits, next_entries
    for dim in spec.stages[-1].dim:
        found[HeadPart(dim, spec.num_classes)].update(exits[2])
    return dict(found)


# -- the parts as modules (parameters at the part's sizes; forward = the subnet's code) ------------
class _Stem(nn.Module):
    def __init__(self, part: StemPart, n: int):
        super().__init__()
        self.patch = part.patch
        self.patch_embed, self.cls_token, self.pos_embed = blocks.make_stem(
            part.in_chans, part.dim, part.patch, n
        )
        blocks.init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        # The first lines of blocks.forward_features, which has no stem function of its own.
        x = F.conv2d(x, self.patch_embed.proj.weight, self.patch_embed.proj.bias, stride=self.patch)
        x = x.flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed


class _Cell(nn.Module):
    """``blocks.cell_forward`` on one cell; sizes and a shared map are buffers when the part has them."""

    def __init__(self, part: CellPart, n: int):
        super().__init__()
        red = part.reduction()
        self.stage = StageConfig(
            tokens=n,
            dim=part.dim,
            heads=part.heads,
            mlp_ratio=part.hidden / part.dim,
            attention=part.attention,
            cells=(part.cell,),
            reduction=red,
        )
        self.plan = blocks.CellPlan(
            kind=part.cell,
            need_attn=part.need_attn,
            reduce=part.reduce,
            r=part.r,
            keep_rate=part.keep_rate,
            method=red.method,
            tokens_out=red.tokens_after(0, n),
        )
        self.cell = blocks.make_cell(part.dim, part.hidden, part.cell, part.attention == "linear")
        blocks.init_weights(self)
        self.register_buffer("size", torch.ones(1, n, 1) if part.sized else None)
        shared = torch.rand(1, part.heads, n, n).softmax(-1) if part.cell == "share" else None
        self.register_buffer("shared", shared)

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        size = None if self.size is None else self.size.expand(b, -1, -1)
        shared = None if self.shared is None else self.shared.expand(b, -1, -1, -1)
        return blocks.cell_forward(self.stage, self.plan, self.cell, x, size, shared)[0]


class _Pool(nn.Module):
    def __init__(self, part: PoolPart, n: int):
        super().__init__()
        self.kind, self.out = part.kind, part.out_tokens - 1
        kernel = blocks.conv_kernel(part.kind, n, part.out_tokens)
        self.pool = blocks.make_pool(
            part.in_dim,
            part.out_dim,
            conv1d=kernel if part.kind == "conv1d" else 0,
            conv2d=kernel if part.kind == "conv2d" else 0,
        )
        blocks.init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return blocks.pool_forward(self.kind, self.pool, x, self.out)


class _Head(nn.Module):
    def __init__(self, part: HeadPart):
        super().__init__()
        self.norm = nn.LayerNorm(part.dim, eps=blocks.LN_EPS)
        self.head = nn.Linear(part.dim, part.num_classes)
        blocks.init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return blocks.linear(blocks.layer_norm(x[:, 0], self.norm), self.head)
