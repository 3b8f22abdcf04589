"""The network's forward pass and module layout, written once for the subnet and the supernet.

Every forward function here takes a *parameter tree*: any object whose attributes mirror the module
tree of ``VitnasSubnet`` (``p.stages[i].cells[j].attn.qkv.weight`` ...). The stand-alone
``VitnasSubnet`` passes itself; the ``Supernet`` passes a ``ParamTree`` of leading slices of its
largest weights (weight entanglement, AutoFormer: Chen et al. 2021). So the two run the same code
and differ only in where the tensors come from.

The family is PSViT's (Chen et al. 2021, "PSViT: Better Vision Transformer via Token Pooling and
Attention Sharing"): patch embedding, stages of ``basic``/``share``/``identity`` cells, token
pooling between stages, optional token reduction inside a stage. Choices made here:

- Heads: q, k and v each use the first ``dim`` channels, regrouped into ``heads`` heads of
  ``dim / heads`` (AutoFormer-style): "first h heads" means the first ``dim`` channels.
- A reduction (ToMe, EViT, clustering) acts after a cell's attention, before its MLP (as in ToMe
  and EViT); token sizes are tracked through the stage and feed proportional attention.
- Sizes reset to one after inter-stage pooling: each stage starts from unweighted tokens.
- Position-aware pooling: conv1d/avg pooling reads the tokens as a sequence of the stage's input
  positions. After an in-stage reduction each position is filled with the token that now holds it
  (its ToMe group, its cluster, EViT's fused token for the dropped ones) before pooling, so every
  window covers the same image region whatever the reduction. Pooling the reduced sequence
  directly would shift the windows by a data-dependent amount (and leave padding-only windows),
  so the supernet's shared conv taps would mean different neighbourhoods for different subnets.
- Stochastic depth (drop-path) on the attention and MLP branches of computing cells is an option
  of the forward (``drop_path``, per computing cell, training only); the supernet never uses it, so
  its train and eval outputs are equal. There is no other dropout inside the network.

Tracing and compiling: every token count is fixed by the architecture, so the forward has no
data-dependent shapes (``torch.compile(fullgraph=True)`` and ONNX export see one static graph; only
the batch may vary). Python-level shape arithmetic lives in the reduction and pooling steps, which
are leaf functions for ``torch.fx`` symbolic tracing (``torch.fx.wrap``, which every fx tracer,
timm's and torchvision's included, honours): a traced graph calls them as single nodes and
computes exactly what eager does.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from nas.arch import ArchConfig, StageConfig, kept_tokens
from nas.ops.attention import apply_shared_attention, attention, class_attention, merge_heads, split_heads
from nas.ops.cluster import cluster_pool, cluster_pool_assign
from nas.ops.evit import evit_keep, fuse_topk, top_tokens
from nas.ops.linear_attention import local_term, relu_linear_attention
from nas.ops.pooling import avg_pool, conv1d_pool, conv2d_pool, pool_stride, tome_pool
from nas.ops.tome import bipartite_soft_matching

LN_EPS = 1e-6
LOCAL_KERNEL = 3  # depthwise conv of linear attention (EfficientViT's local term), over the sequence
POSITIONAL_POOLS = ("conv1d", "conv2d", "avg")  # pools whose windows are token positions


# -- module layout (parameters only; the forward lives in the functions below) -----------------
def mlp_hidden(dim: int, ratio: float) -> int:
    return int(dim * ratio)


def make_cell(dim: int, hidden: int, kind: str, local: bool, device=None) -> nn.Module:
    """A cell's parameters: ``basic`` holds ``attn.qkv``, ``share`` only ``attn.v`` (PSViT),
    ``local`` adds linear attention's depthwise conv; ``identity`` is an empty ``nn.Identity``."""
    if kind == "identity":
        return nn.Identity()
    cell, attn, mlp = nn.Module(), nn.Module(), nn.Module()
    cell.norm1 = nn.LayerNorm(dim, eps=LN_EPS, device=device)
    if kind == "share":
        attn.v = nn.Linear(dim, dim, device=device)
    else:
        attn.qkv = nn.Linear(dim, 3 * dim, device=device)
    if local:
        attn.local = nn.Conv1d(dim, dim, LOCAL_KERNEL, groups=dim, device=device)
    attn.proj = nn.Linear(dim, dim, device=device)
    cell.attn = attn
    cell.norm2 = nn.LayerNorm(dim, eps=LN_EPS, device=device)
    mlp.fc1 = nn.Linear(dim, hidden, device=device)
    mlp.fc2 = nn.Linear(hidden, dim, device=device)
    cell.mlp = mlp
    return cell


def make_pool(
    in_dim: int,
    out_dim: int,
    conv1d: int = 0,
    conv2d: int = 0,
    projections: tuple[str, ...] = ("proj",),
    device=None,
) -> nn.Module:
    """Inter-stage pooling parameters: a projection (the class token for convs, every token
    otherwise) under each name in ``projections``, plus a strided conv of kernel ``conv1d`` (1D)
    or ``conv2d`` (per side) when nonzero."""
    pool = nn.Module()
    for name in projections:
        setattr(pool, name, nn.Linear(in_dim, out_dim, device=device))
    if conv1d:
        pool.conv1d = nn.Conv1d(in_dim, out_dim, conv1d, device=device)
    if conv2d:
        pool.conv2d = nn.Conv2d(in_dim, out_dim, conv2d, device=device)
    return pool


def make_stem(
    in_chans: int, dim: int, patch: int, tokens: int, device=None
) -> tuple[nn.Module, nn.Parameter, nn.Parameter]:
    """Patch embedding (a strided conv), class token and position embedding (class token first)."""
    embed = nn.Module()
    embed.proj = nn.Conv2d(in_chans, dim, patch, stride=patch, device=device)
    cls = nn.Parameter(torch.zeros(1, 1, dim, device=device))
    pos = nn.Parameter(torch.zeros(1, tokens, dim, device=device))
    return embed, cls, pos


def init_weights(model: nn.Module) -> None:
    """ViT initialisation (timm): truncated normal 0.02 for linears and embeddings, zero biases."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for name in ("cls_token", "pos_embed"):
        if hasattr(model, name):
            nn.init.trunc_normal_(getattr(model, name), std=0.02)


class ParamTree:
    """Nested attribute access over a flat ``{"a.b.0.c": tensor}`` dict: ``tree.a.b[0].c``."""

    __slots__ = ("_children",)

    def __init__(self, flat: dict[str, Tensor] | None = None):
        self._children: dict[str, object] = {}
        for key, value in (flat or {}).items():
            node = self
            *path, leaf = key.split(".")
            for part in path:
                node = node._children.setdefault(part, ParamTree())
            node._children[leaf] = value

    def __getattr__(self, name: str):
        try:
            return self._children[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, index: int):
        return self._children[str(index)]


# -- the plan of one stage ---------------------------------------------------------------------
@dataclass(frozen=True)
class CellPlan:
    """What one cell does: its kind, whether to form the attention map for a following ``share``
    cell, which reduction acts after its attention, and the tokens it must leave."""

    kind: str
    need_attn: bool
    reduce: str  # "none", "tome", "evit", "cluster"
    r: int
    keep_rate: float
    method: str
    tokens_out: int


@functools.lru_cache(maxsize=4096)
def stage_plan(st: StageConfig) -> tuple[CellPlan, ...]:
    red, trace = st.reduction, st.token_trace()
    computing = [j for j, c in enumerate(st.cells) if c != "identity"]
    plans = []
    for j, cell in enumerate(st.cells):
        nxt = next((st.cells[i] for i in computing if i > j), None)
        reduce = red.kind if cell != "identity" and red.reduces_at(j) else "none"
        plans.append(
            CellPlan(
                kind=cell,
                need_attn=cell == "basic" and nxt == "share",
                reduce=reduce,
                r=red.r[j] if reduce == "tome" else 0,
                keep_rate=red.keep_rate or 1.0,
                method=red.method,
                tokens_out=trace[j],
            )
        )
    return tuple(plans)


@dataclass(frozen=True)
class StagePlan:
    """A stage as the network runs it: its cells' plans, the tokens entering each cell, and the
    network-wide index of its first computing cell (computing cells are numbered 0, 1, ... over
    the whole network, identity cells skipped: the numbering of ``forward_intermediates``)."""

    config: StageConfig
    cells: tuple[CellPlan, ...]
    tokens_in: tuple[int, ...]
    first: int

    @property
    def computing(self) -> int:
        return sum(c.kind != "identity" for c in self.cells)


@functools.lru_cache(maxsize=1024)
def network_plan(arch: ArchConfig) -> tuple[StagePlan, ...]:
    """Every stage's plan (static: computed once per architecture, never during a forward)."""
    out, first = [], 0
    for st in arch.stages:
        trace = st.token_trace()
        plan = StagePlan(st, stage_plan(st), (st.tokens, *trace[:-1]), first)
        out.append(plan)
        first += plan.computing
    return tuple(out)


def computing_cells(arch: ArchConfig) -> list[tuple[int, int]]:
    """``(stage, cell)`` of every computing cell, in network order (index = intermediate index)."""
    return [(i, j) for i, st in enumerate(arch.stages) for j, c in enumerate(st.cells) if c != "identity"]


# -- functional layers ---------------------------------------------------------------------------
def linear(x: Tensor, p) -> Tensor:
    return F.linear(x, p.weight, p.bias)


def layer_norm(x: Tensor, p) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), p.weight, p.bias, LN_EPS)


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth on a residual branch ``[B, N, C]``: each sample's branch is dropped with
    probability ``rate`` and kept ones are scaled by ``1 / (1 - rate)`` (timm's ``drop_path``)."""
    if rate <= 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty(x.shape[0], 1, 1).bernoulli_(keep)
    return x * mask.div_(keep)


def _cls_attn(attn: Tensor | None, q: Tensor | None, k: Tensor | None, size: Tensor | None) -> Tensor:
    """Class attention over the other tokens, mean over heads: from the map when there is one."""
    if attn is not None:
        return attn[:, :, 0, 1:].mean(dim=1)
    return class_attention(q, k, size)


# -- token reductions inside a stage: leaf functions for torch.fx ------------------------------------
def tome_step(x: Tensor, metric: Tensor, size: Tensor | None, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """ToMe (vitnas's order-keeping variant) with ``r`` merges: ``(x, size, index)``, where
    ``index [B, N_in]`` is the output token each input token went to."""
    merge = bipartite_soft_matching(metric, r)
    x, size = merge.merge(x, size)
    return x, size, _merge_index(merge)


def evit_step(x: Tensor, score: Tensor, size: Tensor | None, keep: int) -> tuple[Tensor, Tensor, Tensor]:
    """EViT keeping ``keep`` of the non-class tokens (fewer than there are): ``(x, size, index)``."""
    out, size = fuse_topk(x, score, keep, size)
    return out, size, _fuse_index(score, keep)


def cluster_step(
    x: Tensor, size: Tensor | None, weights: Tensor | None, keep: int, method: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Clustering of the non-class tokens into ``keep``: ``(x, size, index)``."""
    x, size, assign = cluster_pool_assign(x, keep, method, size=size, weights=weights)
    return x, size, F.pad(assign + 1, (1, 0))


def _merge_index(merge) -> Tensor:
    """The output token of every input token of a ToMe ``Merge`` (kept rows and merged-away rows)."""
    b, n, m = merge.batch, merge.tokens, merge.out_tokens
    index = torch.empty(b * n, dtype=torch.long, device=merge.keep.device)
    index[merge.keep] = torch.arange(b * m, device=index.device)
    index[merge.src] = merge.slot
    return index.view(b, n) - m * torch.arange(b, device=index.device).unsqueeze(1)


def _fuse_index(score: Tensor, keep: int) -> Tensor | None:
    """The output token of every input token of ``evit_fuse``: kept tokens in order after the
    class token, the dropped ones in the fused token at the end (None when nothing is dropped)."""
    b, n = score.shape
    if keep >= n:
        return None
    kept = top_tokens(score, keep) + 1
    index = torch.full((b, n + 1), keep + 1, dtype=torch.long, device=score.device)
    index[:, 0] = 0
    return index.scatter_(1, kept, torch.arange(1, keep + 1, device=score.device).expand(b, -1))


def is_symbolic_tracing() -> bool:
    """True inside ``torch.fx`` symbolic tracing (not under ``torch.compile``/``torch.export``)."""
    if torch.compiler.is_compiling():
        return False
    return torch.fx._symbolic_trace.is_fx_symbolic_tracing()


# -- the forward ----------------------------------------------------------------------------------
def cell_forward(
    st: StageConfig,
    plan: CellPlan,
    p,
    x: Tensor,
    size: Tensor | None,
    shared: Tensor | None,
    tokens_in: int | None = None,
    drop_rate: float = 0.0,
    training: bool = False,
):
    """One computing cell: attention (+ reduction) and MLP.

    Returns ``(x, size, map to share, index)``: ``index [B, N_in]`` is the output token each input
    token went to (None when the cell keeps every token where it was). ``tokens_in`` is the token
    count entering the cell (from the plan; read off ``x`` when not given, in eager mode only);
    ``drop_rate`` is the cell's stochastic-depth rate, applied in ``training`` only.
    """
    n_in = x.shape[1] if tokens_in is None else tokens_in
    h = layer_norm(x, p.norm1)
    b, n, d = h.shape
    q = k = attn = None
    if plan.kind == "share":
        attn = shared  # PSViT: the previous cell's probabilities, applied to this cell's values
        y = merge_heads(apply_shared_attention(attn, split_heads(linear(h, p.attn.v), st.heads)))
    else:
        q, k, v = (
            linear(h, p.attn.qkv).view(b, n, 3, st.heads, d // st.heads).permute(2, 0, 3, 1, 4).unbind(0)
        )
        if st.attention == "linear":
            local = local_term(merge_heads(v), p.attn.local.weight, p.attn.local.bias)
            y = merge_heads(relu_linear_attention(q, k, v, size)) + local
        else:
            out, attn = attention(q, k, v, size, need_attn=plan.need_attn)
            y = merge_heads(out)
    x = x + drop_path(linear(y, p.attn.proj), drop_rate, training)
    index = None
    if plan.reduce == "tome":
        x, size, index = tome_step(x, k.mean(dim=1), size, plan.r)
    elif plan.reduce == "evit":
        keep = evit_keep(n_in - 1, plan.keep_rate)
        if keep < n_in - 1:  # static: whether EViT drops anything depends on the counts only
            x, size, index = evit_step(x, _cls_attn(attn, q, k, size), size, keep)
    elif plan.reduce == "cluster":
        weighted = plan.method == "weighted_kmedoids"
        weights = _cls_attn(attn, q, k, size) if weighted else None
        method = "kmedoids" if weighted else plan.method
        x, size, index = cluster_step(x, size, weights, kept_tokens(plan.keep_rate, n_in - 1), method)
    if isinstance(x.shape[1], int) and x.shape[1] != plan.tokens_out:  # a Proxy under torch.fx
        raise RuntimeError(
            f"{plan.reduce} left {x.shape[1]} tokens where the architecture expects {plan.tokens_out} "
            "(nas.ops and nas.arch disagree on token counts)"
        )
    mlp = linear(F.gelu(linear(layer_norm(x, p.norm2), p.mlp.fc1)), p.mlp.fc2)
    x = x + drop_path(mlp, drop_rate, training)
    return x, size, attn, index


def stage_forward(
    st: StageConfig,
    cells,
    x: Tensor,
    *,
    plan: StagePlan | None = None,
    take: frozenset[int] | set[int] = frozenset(),
    taken: list[Tensor] | None = None,
    stop: int | None = None,
    drop_path_rates: Sequence[float] = (),
    training: bool = False,
    checkpoint: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The cells of one stage; sizes start at one (``None``) and follow the reductions.

    Returns ``(x, owner)``: ``owner [B, N_in - 1]`` is the token that holds each of the stage's
    input (non-class) positions at its end, None when no reduction acted.

    Options (used by ``forward_tokens``): the outputs of the computing cells whose network index is
    in ``take`` are appended to ``taken``; cells after network index ``stop`` do not run;
    ``drop_path_rates[c]`` is computing cell ``c``'s stochastic-depth rate (training only);
    ``checkpoint`` recomputes each cell in the backward pass (activation checkpointing).
    """
    if plan is None:
        plan = StagePlan(st, stage_plan(st), (st.tokens, *st.token_trace()[:-1]), 0)
    size, shared, owner = None, None, None
    c = plan.first
    for j, cell_plan in enumerate(plan.cells):
        if cell_plan.kind == "identity":
            continue
        if stop is not None and c > stop:
            break
        rate = drop_path_rates[c] if drop_path_rates else 0.0
        args = (st, cell_plan, cells[j], x, size, shared, plan.tokens_in[j], rate, training)
        if checkpoint:
            x, size, shared, index = torch.utils.checkpoint.checkpoint(
                cell_forward, *args, use_reentrant=False
            )
        else:
            x, size, shared, index = cell_forward(*args)
        if index is not None:
            owner = index[:, 1:] if owner is None else index.gather(1, owner)
        if c in take and taken is not None:
            taken.append(x)
        c += 1
    return x, owner


def restore_positions(x: Tensor, owner: Tensor) -> Tensor:
    """The class token, then for each input position of the stage the token that holds it."""
    held = x.gather(1, owner.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return torch.cat([x[:, :1], held], dim=1)


def pool_forward(kind: str, p, x: Tensor, out_tokens: int) -> Tensor:
    """Inter-stage pooling to ``out_tokens`` non-class tokens and the pool's output dim.

    conv1d/conv2d: stride = kernel = ceil(in / out) (per side for conv2d), the class token through
    ``proj``; avg: window means then ``proj``; tome/cluster: the reduction then ``proj``.
    """
    if kind == "conv1d":
        w = p.conv1d.weight
        return conv1d_pool(x, w, p.conv1d.bias, w.shape[-1], out_tokens, 1, p.proj.weight, p.proj.bias)[0]
    if kind == "conv2d":
        w = p.conv2d.weight
        return conv2d_pool(x, w, p.conv2d.bias, w.shape[-1], out_tokens, 1, p.proj.weight, p.proj.bias)[0]
    if kind == "avg":
        return avg_pool_step(x, p.proj.weight, p.proj.bias, out_tokens)
    if kind == "tome":
        x, _ = tome_pool(x, out_tokens)
    else:
        x, _ = cluster_pool(x, out_tokens, "kmedoids")
    return linear(x, p.proj)


def avg_pool_step(x: Tensor, weight: Tensor, bias: Tensor, out_tokens: int) -> Tensor:
    """``nas.ops.pooling.avg_pool`` over the windows that hold tokens.

    TODO(ops): when ceil(n / stride) < out_tokens the last windows are padding only and ops'
    avg_pool divides 0 by 0 (NaN). Until ops decides, such windows come out like conv1d's padding
    windows: the projection's bias.
    """
    n = x.shape[1] - 1
    real = math.ceil(n / pool_stride(n, out_tokens))
    y, _ = avg_pool(x, weight, bias, real)
    if real == out_tokens:
        return y
    return torch.cat([y, bias.expand(x.shape[0], out_tokens - real, -1)], dim=1)


def conv_kernel(kind: str, in_tokens: int, out_tokens: int) -> int:
    """Kernel (= stride) of a conv pool between token counts that include the class token; a conv
    pool sees the previous stage's input positions (``restore_positions``), so ``in_tokens`` is
    that stage's ``tokens``."""
    n, m = in_tokens - 1, out_tokens - 1
    if kind == "conv2d":
        n, m = math.isqrt(n), math.isqrt(m)
    return pool_stride(n, m)


def embed(arch: ArchConfig, p, x: Tensor) -> Tensor:
    """Images ``[B, C, H, W]`` → patch tokens with the class token first, plus position embedding."""
    x = F.conv2d(x, p.patch_embed.proj.weight, p.patch_embed.proj.bias, stride=arch.patch_size)
    x = x.flatten(2).transpose(1, 2)
    return torch.cat([p.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + p.pos_embed


def forward_tokens(
    arch: ArchConfig,
    p,
    x: Tensor,
    *,
    plans: tuple[StagePlan, ...] | None = None,
    take: frozenset[int] | set[int] = frozenset(),
    stop: int | None = None,
    drop_path_rates: Sequence[float] = (),
    training: bool = False,
    checkpoint: bool = False,
) -> tuple[Tensor, list[Tensor]]:
    """Images → ``(tokens [B, N, C] before the final norm, intermediates)``.

    The intermediates are the tokens (class token first) leaving each computing cell whose network
    index is in ``take``, in network order. With ``stop`` the network ends after that computing
    cell (later stages do not run: the tokens are then that cell's, at its stage's width).
    """
    plans = network_plan(arch) if plans is None else plans
    x = embed(arch, p, x)
    taken: list[Tensor] = []
    owner = None
    for i, plan in enumerate(plans):
        st = plan.config
        if stop is not None and plan.first > stop:
            break
        if i:
            if owner is not None and st.pool in POSITIONAL_POOLS:
                x = restore_positions(x, owner)
            x = pool_forward(st.pool, p.stages[i].pool, x, st.tokens - 1)
        x, owner = stage_forward(
            st,
            p.stages[i].cells,
            x,
            plan=plan,
            take=take,
            taken=taken,
            stop=stop,
            drop_path_rates=drop_path_rates,
            training=training,
            checkpoint=checkpoint,
        )
    return x, taken


def forward_features(arch: ArchConfig, p, x: Tensor) -> Tensor:
    """Images ``[B, C, H, W]`` → every final token after the final norm ``[B, N, dim of the last stage]``
    (class token first; timm's ``forward_features``)."""
    return layer_norm(forward_tokens(arch, p, x)[0], p.norm)


def forward_logits(arch: ArchConfig, p, x: Tensor) -> Tensor:
    """Logits from the normalised class token (the supernet's forward)."""
    return linear(layer_norm(forward_tokens(arch, p, x)[0][:, 0], p.norm), p.head)


# Leaves for torch.fx symbolic tracing: each runs as one graph node (they do Python arithmetic on
# token counts, which a symbolic trace cannot follow). torch.fx.wrap patches these names in this
# module's globals while any fx tracer runs.
for _leaf in (
    "tome_step",
    "evit_step",
    "cluster_step",
    "avg_pool_step",
    "conv1d_pool",
    "conv2d_pool",
    "tome_pool",
    "cluster_pool",
):
    torch.fx.wrap(_leaf)
