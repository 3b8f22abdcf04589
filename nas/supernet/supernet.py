"""The weight-sharing supernet of a PSViT-style search space, and subnet extraction.

The supernet holds every weight at the space's largest size; an architecture uses leading slices
of them (weight entanglement, AutoFormer: Chen et al. 2021, ICCV):

- linear layers: the first output and input channels; the MLP's first ``int(dim * ratio)`` units;
- qkv: seen as ``(3, D_max, D_max)``, a subnet takes ``[:, :dim, :dim]`` (first ``dim`` channels of
  each of q, k and v, regrouped into its ``heads`` heads of ``dim / heads``); a ``share`` cell uses
  the v part of the same weight, so both cell kinds at one position share it;
- softmax and linear attention at one position share ``proj`` and the MLP, but not qkv: ReLU
  feature maps and softmax want different queries and keys, so a stage that may use linear
  attention also holds ``attn.linear_qkv`` (plus its depthwise conv ``attn.local``);
- patch embedding, class token, position embedding, LayerNorms and the head: first channels;
- conv pooling: weights at ``(D_max out, D_max in, K_max)``; a subnet whose stride is ``s`` takes
  the leading ``s`` taps (the stride follows the token counts). ``proj`` is shared by the pool
  kinds (a conv pool projects only the class token with it; avg, tome and cluster every token):
  one projection per kind was tried and gave lower inherited accuracy (smallest 74% vs 83% after
  60 epochs, mid-size subnets about 8 points lower), so they share.

``Supernet.forward(x, arch)`` runs ``nas.supernet.blocks`` on these slices (views: gradients reach
the shared weights); ``extract(arch)`` copies them into a ``VitnasSubnet``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from nas.arch import ArchConfig
from nas.errors import UserError
from nas.families import require
from nas.space import PsvitSpace, SearchSpace, load_space
from nas.supernet import blocks
from nas.supernet.subnet import VitnasSubnet, subnet_shapes


def space_hash(space: SearchSpace) -> str:
    """16 hex digits over the space's validated choices (name and description left out: a renamed
    copy of a space takes the same checkpoints)."""
    content = space.spec.model_dump(mode="json", exclude={"name", "description"})
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StageMax:
    dim: int
    hidden: int
    depth: int
    local: bool
    conv1d: int  # kernel of the conv1d pool at its largest stride (0: not a choice)
    conv2d: int


def stage_maxima(spec: PsvitSpace) -> list[StageMax]:
    """The largest size of every weight a stage can need, from the space's choices."""
    out = []
    for i, st in enumerate(spec.stages):
        pools = st.pool or ()
        kernels = {k: 0 for k in ("conv1d", "conv2d")}
        for kind in kernels:
            if kind in pools:
                kernels[kind] = blocks.conv_kernel(kind, max(spec.stages[i - 1].tokens), min(st.tokens))
        out.append(
            StageMax(
                dim=max(st.dim),
                hidden=max(blocks.mlp_hidden(d, r) for d in st.dim for r in st.mlp_ratio),
                depth=st.max_depth,
                local="linear" in st.attention,
                **kernels,
            )
        )
    return out


class Supernet(nn.Module):
    """All weights of a space at their largest sizes; ``forward(x, arch)`` runs any member."""

    def __init__(self, space: SearchSpace | str):
        super().__init__()
        space = load_space(space) if isinstance(space, str) else space
        require(space, "psvit", "a supernet")
        self.space, self.space_hash = space, space_hash(space)
        spec, maxima = space.spec, stage_maxima(space.spec)
        self.maxima = maxima
        self.patch_embed, self.cls_token, self.pos_embed = blocks.make_stem(
            spec.in_chans, maxima[0].dim, spec.patch_size, spec.stages[0].tokens[0]
        )
        self.stages = nn.ModuleList()
        for i, m in enumerate(maxima):
            stage = nn.Module()
            if i:
                stage.pool = blocks.make_pool(maxima[i - 1].dim, m.dim, m.conv1d, m.conv2d)
            stage.cells = nn.ModuleList(
                blocks.make_cell(m.dim, m.hidden, "basic", m.local) for _ in range(m.depth)
            )
            if m.local:
                for cell in stage.cells:
                    cell.attn.linear_qkv = nn.Linear(m.dim, 3 * m.dim)
            self.stages.append(stage)
        self.norm = nn.LayerNorm(maxima[-1].dim, eps=blocks.LN_EPS)
        self.head = nn.Linear(maxima[-1].dim, spec.num_classes)
        blocks.init_weights(self)

    # -- slicing -----------------------------------------------------------------------------
    def sliced_state(self, arch: ArchConfig) -> dict[str, Tensor]:
        """``VitnasSubnet(arch)``'s state dict as leading slices of this supernet's weights.

        Views, except qkv weights and biases: those are the q, k and v views stacked (a copy that
        autograd traces back to the shared weight).
        """
        self.check_fits(arch)
        params = dict(self.named_parameters())
        out = {}
        for key, shape in subnet_shapes(arch):
            source = params.get(source_key(key, arch))
            if ".attn.qkv." in key or ".attn.v." in key:
                out[key] = _qkv_slice(source, key, shape)
                continue
            if source is None or any(s > t for s, t in zip(shape, source.shape)):
                have = "missing" if source is None else f"at most {tuple(source.shape)}"
                raise UserError(
                    f"architecture does not fit supernet of space {self.space.name!r}: {key} {tuple(shape)} ({have})"
                )
            out[key] = source[tuple(slice(0, s) for s in shape)]
        return out

    def check_fits(self, arch: ArchConfig) -> None:
        """``UserError`` naming the first size of ``arch`` beyond this supernet's."""
        spec = self.space.spec
        fixed = ("image_size", "patch_size", "in_chans", "num_classes")
        for name in fixed:
            if getattr(arch, name) != getattr(spec, name):
                raise UserError(
                    f"architecture {name} {getattr(arch, name)} != {getattr(spec, name)} of space {spec.name!r}"
                )
        if len(arch.stages) != len(self.maxima):
            raise UserError(
                f"architecture has {len(arch.stages)} stages, space {spec.name!r} has {len(self.maxima)}"
            )
        for i, (st, m) in enumerate(zip(arch.stages, self.maxima)):
            limits = [
                ("dim", st.dim, m.dim),
                ("MLP units", blocks.mlp_hidden(st.dim, st.mlp_ratio), m.hidden),
                ("cells", len(st.cells), m.depth),
            ]
            for what, have, most in limits:
                if have > most:
                    raise UserError(
                        f"stages[{i}]: {what} {have} > {most}, the largest in space {spec.name!r}"
                    )
            if st.attention == "linear" and not m.local:
                raise UserError(f"stages[{i}]: linear attention is not a choice of space {spec.name!r}")
            if i and st.pool in ("conv1d", "conv2d") and not getattr(m, st.pool):
                raise UserError(f"stages[{i}]: pool {st.pool} is not a choice of space {spec.name!r}")

    # -- running and extracting ---------------------------------------------------------------
    def forward(self, x: Tensor, arch: ArchConfig) -> Tensor:
        return blocks.forward_logits(arch, blocks.ParamTree(self.sliced_state(arch)), x)

    def extract(self, arch: ArchConfig) -> VitnasSubnet:
        """A stand-alone ``VitnasSubnet`` holding copies of ``arch``'s slices (same outputs).

        Its parameters are ordinary trainable tensors even when called under ``inference_mode``.
        """
        with torch.inference_mode(False), torch.no_grad():
            sliced = self.sliced_state(arch)
            net = VitnasSubnet(arch, device="meta").to_empty(device=self.head.weight.device)
            net.load_state_dict({k: v.detach().clone() for k, v in sliced.items()})
        return net.train(self.training)

    def largest(self) -> ArchConfig:
        return self.space.largest()

    def smallest(self) -> ArchConfig:
        return self.space.smallest()


def extract(supernet: Supernet, arch: ArchConfig) -> VitnasSubnet:
    """Function form of ``Supernet.extract``."""
    return supernet.extract(arch)


def source_key(key: str, arch: ArchConfig) -> str:
    """The supernet parameter that a subnet state-dict key is a slice of.

    A ``share`` cell's ``attn.v`` is the v part of the position's ``attn.qkv``; a linear-attention
    stage takes its q, k, v from ``attn.linear_qkv`` (its own weights, see the module docstring).
    """
    if ".attn.v." in key:
        key = key.replace(".attn.v.", ".attn.qkv.")
    if ".attn.qkv." in key and arch.stages[int(key.split(".")[1])].attention == "linear":
        key = key.replace(".attn.qkv.", ".attn.linear_qkv.")
    return key


def _qkv_slice(weight: Tensor, key: str, shape: torch.Size) -> Tensor:
    """Leading slices of q, k and v from a ``[3 * D_max, ...]`` qkv weight or bias; ``attn.v`` keys
    (``share`` cells) take the v part only."""
    d_max = weight.shape[0] // 3
    parts = weight.view(3, d_max, *weight.shape[1:])
    d = shape[0] if ".attn.v." in key else shape[0] // 3
    lead = (slice(0, d),) + tuple(slice(0, s) for s in shape[1:])
    if ".attn.v." in key:
        return parts[(2,) + lead]
    return parts[(slice(None),) + lead].reshape(shape)
