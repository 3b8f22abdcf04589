"""AdaViT's decision networks and its three kinds of gating (Meng et al., CVPR 2022, "AdaViT:
Adaptive Vision Transformers for Efficient Image Recognition"; no public code: written from the
paper's description).

Before a block, a light decision network reads the class token (the *policy token*) and gives a
keep logit for every patch, every head and the block's two sub-layers (MSA, FFN); the keep
probability is its sigmoid. Training samples binary decisions with the Gumbel-softmax trick,
straight-through (hard 0/1 forward, the relaxed sample's gradient backward), so the decision
networks learn by back-propagation; inference keeps what has probability above 0.5.

The decision networks here are *budget-conditioned* (vitnas's addition): each logit gets
``gain * logit(budget)`` added, with the budget of its kind (patch, head or sub-layer) and a
learned per-output gain that starts at 1. At initialisation the keep probability is the budget
itself, and one network trained over a range of budgets serves every budget in it: a search
over budgets needs no fine-tune per candidate.

Everything here is pure torch and batched; ``nas.ops.adavit_patch`` puts it into a timm ViT.
"""

from __future__ import annotations

from array import array

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KINDS = ("patch", "head", "block")
HEAD_MODES = ("full", "partial")
#: budgets are clamped into [EPS, 1 - EPS] before their logit (1.0 would be infinite)
BUDGET_EPS = 1e-3
#: exp() argument cap in masked attention: a dropped key scoring far above every kept one cannot
#: overflow (its weight is multiplied by 0 anyway; its gradient to the keep decision is capped)
_EXP_CAP = 20.0


def index_tensor(values: list[int], device: torch.device | str) -> Tensor:
    """``torch.tensor(values)`` (int64) on ``device``, through a buffer: several times cheaper for the
    short index lists inference builds before every decided block (about 1.5 against 9 us here)."""
    if not values:
        return torch.empty(0, dtype=torch.int64, device=device)
    return torch.frombuffer(array("q", values), dtype=torch.int64).to(device)


def budget_logit(budget: float) -> float:
    """log(b / (1 - b)) of the budget clamped into [BUDGET_EPS, 1 - BUDGET_EPS]."""
    b = min(max(float(budget), BUDGET_EPS), 1 - BUDGET_EPS)
    return float(torch.logit(torch.tensor(b, dtype=torch.float64)))


class DecisionNet(nn.Module):
    """Keep logits for ``patches`` patches, ``heads`` heads and 2 sub-layers from the policy token.

    LayerNorm + one linear layer (``dim -> patches + heads + 2``): light next to the block it
    decides for (the paper's decision networks are linear layers on the class token too). The
    budget enters as ``gain * logit(budget)`` per output (see the module docstring).
    """

    def __init__(self, dim: int, patches: int, heads: int) -> None:
        super().__init__()
        self.patches, self.heads = patches, heads
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, patches + heads + 2)
        self.gain = nn.Parameter(torch.ones(patches + heads + 2))
        nn.init.normal_(self.fc.weight, std=0.01)  # small: probabilities start at the budget
        nn.init.zeros_(self.fc.bias)

    @property
    def outputs(self) -> int:
        return self.patches + self.heads + 2

    def budget_bias(self, budget: dict[str, float]) -> Tensor:
        """The ``logit(budget)`` of each output as a vector (a kind without a budget: 0)."""
        values = [budget_logit(budget[k]) if k in budget else 0.0 for k in KINDS]
        counts = (self.patches, self.heads, 2)
        bias = torch.cat([torch.full((n,), v) for n, v in zip(counts, values)])
        return bias.to(self.fc.weight.device, self.fc.weight.dtype)

    def forward(self, token: Tensor, bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``token [B, C]``, ``bias`` from ``budget_bias`` -> logits ``[B, P]``, ``[B, H]``, ``[B, 2]``."""
        logits = self.fc(self.norm(token)) + self.gain * bias
        return logits.split([self.patches, self.heads, 2], dim=-1)


def keep_decision(
    logits: Tensor,
    training: bool,
    tau: float = 1.0,
    generator: torch.Generator | None = None,
    noise: float = 1.0,
) -> Tensor:
    """Binary keep decisions (float 0/1) from keep logits.

    Training: the Gumbel-softmax over {keep, drop} with log-probabilities (log p, log(1 - p)),
    which is ``sigmoid((logit + L) / tau)`` with logistic noise L (the difference of two Gumbels),
    made hard (> 0.5) on the forward pass and differentiable as the relaxed sample on the backward
    pass (straight-through). Otherwise: ``logit > 0`` (keep probability above 0.5).

    ``noise`` scales the logistic noise (vitnas's addition): annealed to 0 over a training, the
    last steps take the decisions inference will take, so the usage loss sees the usage inference
    gets (with the noise the decisions are Bernoulli(p); thresholding at 0.5 agrees with them
    only where p has moved away from 0.5, which a short training does not guarantee).
    """
    if not training:
        return (logits > 0).to(logits.dtype)
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    u = u.clamp(1e-6, 1 - 1e-6)
    shifted = logits + noise * (u.log() - (-u).log1p()).to(logits.dtype)
    soft = torch.sigmoid(shifted / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard - soft.detach() + soft


def masked_attention(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, dropout_p: float = 0.0) -> Tensor:
    """Softmax attention over the kept keys only, differentiable in ``keep``.

    ``q, k, v [B, H, N, d]``, ``keep [B, N]`` (0/1 forward, straight-through gradient):
    ``a_ij = exp(s_ij) keep_j / sum_k exp(s_ik) keep_k``, which with 0/1 values equals attention
    over the kept tokens alone (a dropped token has left the sequence), and passes gradient to
    ``keep`` (as DynamicViT's attention masking, Rao et al. 2021).
    """
    s = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    mask = keep[:, None, None, :].to(s.dtype)
    top = s.masked_fill(mask <= 0.5, float("-inf")).amax(dim=-1, keepdim=True).detach()
    e = torch.exp((s - top).clamp(max=_EXP_CAP)) * mask
    attn = e / e.sum(dim=-1, keepdim=True)
    if dropout_p:
        attn = F.dropout(attn, dropout_p)
    return attn @ v


def gate_heads(out: Tensor, v: Tensor, keep: Tensor, mode: str = "full") -> Tensor:
    """Per-head gating of the attention output ``out [B, H, N, d]`` by ``keep [B, H]``.

    ``full``: a dropped head's output is zero: the same as removing its rows of the qkv
    projection and its columns of the output projection. ``partial``: a dropped head passes its
    values through without attention (the paper's partial deactivation).
    """
    g = keep[:, :, None, None].to(out.dtype)
    if mode == "full":
        return out * g
    if mode == "partial":
        return out * g + v * (1 - g)
    raise ValueError(f"head mode must be one of {', '.join(HEAD_MODES)}, got {mode!r}")


def usage_loss(usage: dict[str, Tensor], budget: dict[str, float]) -> Tensor:
    """AdaViT's L_usage: ``sum over kinds of (mean kept fraction - budget)^2``.

    ``usage[kind]`` holds each sample's kept fraction ``[B]``; the mean is over the batch (so one
    image may use more and another less). Zero exactly when every kind's mean is its budget.
    """
    terms = [(usage[k].float().mean() - float(budget[k])) ** 2 for k in KINDS if k in usage]
    if not terms:
        raise ValueError("usage_loss: no decisions were taken (no kind has a budget below 1)")
    return torch.stack(terms).sum()


# -- hard inference on packed tokens --------------------------------------------------------------
def qkv_rows(kept: list[int], heads: int, head_dim: int, mode: str) -> Tensor:
    """Rows of a fused qkv weight ``[3 * heads * head_dim, C]`` a set of kept heads needs: q and k
    of the kept heads, v of the kept heads (``full``) or of every head (``partial``)."""
    per = torch.arange(head_dim)
    parts = []
    for part in range(3):
        chosen = kept if part < 2 or mode == "full" else range(heads)
        parts += [part * heads * head_dim + h * head_dim + per for h in chosen]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def head_channels(kept: list[int], head_dim: int) -> Tensor:
    """Channels of the merged heads ``[.., heads * head_dim]`` that belong to the kept heads."""
    per = torch.arange(head_dim)
    return torch.cat([h * head_dim + per for h in kept]) if kept else torch.zeros(0, dtype=torch.long)


def packed_attention(q: Tensor, k: Tensor, v: Tensor, lengths: list[int], fused: bool = True) -> Tensor:
    """Attention of each sample over its own tokens, for tokens packed sample after sample.

    ``q, k, v [T, h, d]`` with ``T = sum(lengths)``; returns ``[T, h, d]``. Equal lengths are one
    batched call (what an unpatched timm block runs); unequal ones are padded to the longest, the
    padding masked out of the keys (``-inf``), and unpadded again.
    """
    b, longest = len(lengths), max(lengths)
    h, d = q.shape[1], q.shape[2]
    if all(n == longest for n in lengths):
        qkv = [t.view(b, longest, h, d).transpose(1, 2) for t in (q, k, v)]
        return _attend(*qkv, None, fused).transpose(1, 2).reshape(-1, h, d)
    # built in Python and moved in one call each: a tensor op per step costs more than the lists here
    rows = index_tensor([j * longest + r for j, n in enumerate(lengths) for r in range(n)], q.device)
    inf = float("-inf")
    bias = torch.tensor([[0.0] * n + [inf] * (longest - n) for n in lengths], dtype=q.dtype, device=q.device)
    padded = q.new_zeros(b * longest, 3, h, d)
    padded[rows] = torch.stack([q, k, v], dim=1)
    pq, pk, pv = padded.view(b, longest, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    out = _attend(pq, pk, pv, bias[:, None, None, :], fused).transpose(1, 2).reshape(b * longest, h, d)
    return out.index_select(0, rows)


def _attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, fused: bool) -> Tensor:
    """timm's two attention paths: the fused kernel, or the explicit softmax (``fused_attn`` off)."""
    if fused:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias
    return attn.softmax(dim=-1) @ v


# -- analytic cost --------------------------------------------------------------------------------
def block_flops(
    tokens: Tensor,
    heads: Tensor,
    attn: Tensor,
    ffn: Tensor,
    *,
    dim: int,
    num_heads: int,
    head_dim: int,
    mlp: int,
    mode: str = "full",
    qk_norm: bool = False,
    gated: bool = False,
) -> Tensor:
    """Multiply-adds of one pre-norm block as fvcore counts them (linear: rows x in x out; attention:
    h n^2 (d + d); LayerNorm: 5 per element; element-wise ops free), per sample.

    ``tokens``: tokens entering the block; ``heads``: heads kept; ``attn``/``ffn``: 1 where the
    sub-layer runs (all ``[B]``); ``mlp``: the MLP's multiply-adds per token. A skipped sub-layer
    costs nothing (its LayerNorm neither).
    """
    n, hk = tokens.double(), heads.double()
    v_heads = hk if mode == "full" else torch.full_like(hk, num_heads)
    proj_in = hk if mode == "full" else torch.full_like(hk, num_heads)
    msa = 5 * n * dim + n * dim * (2 * hk + v_heads) * head_dim + hk * n * n * 2 * head_dim
    msa = msa + n * proj_in * head_dim * dim
    if qk_norm:
        msa = msa + 2 * 5 * n * hk * head_dim
    if gated:
        msa = msa + n * dim * proj_in * head_dim
    if mode == "full":
        msa = torch.where(hk > 0, msa, torch.zeros_like(msa))  # no head left: only the projection's bias
    ffn_cost = 5 * n * dim + n * mlp
    return msa * attn.double() + ffn_cost * ffn.double()
