"""``VitnasSubnet``: one PSViT-style architecture as a plain ``nn.Module`` that follows timm's conventions.

It holds parameters at exactly its architecture's sizes and nothing else (no supernet, no slicing),
so its latency is the latency of the real network. The forward is ``nas.supernet.blocks``, the same
code the supernet runs on its sliced weights; ``extract`` fills one of these with those slices.

As a timm model (what ``timm.create_model("vitnas_subnet", arch=...)`` returns, see
``nas.timm_model``) it has what timm's ``VisionTransformer`` has:

- ``pretrained_cfg``/``default_cfg`` with the architecture's ``input_size``, ``num_classes``, the
  ``mean``/``std`` of the data the weights were trained on, ``first_conv`` and ``classifier``;
- ``forward_features(x)`` → every token after the final norm ``[B, N, C]`` (class token first; N is
  the last stage's token count after its reductions), ``forward_head(x, pre_logits=False)``,
  ``num_features``/``head_hidden_size``, ``reset_classifier(num_classes, global_pool=None)``
  (``num_classes=0``: the pooled features);
- ``global_pool`` (``token``: the class token, the default and what the supernet trains;
  ``avg``/``max``/``avgmax`` over the non-class tokens; ``""``: no pooling), ``drop_rate`` (dropout
  before the head), ``drop_path_rate`` (stochastic depth over the computing cells, rising linearly
  from 0 at the first to ``drop_path_rate`` at the last, as timm does over blocks);
- ``set_grad_checkpointing``, ``forward_intermediates``, ``prune_intermediate_layers`` and
  ``feature_info``, all indexed by *computing cell* (identity cells are not layers): cell ``c`` is
  the ``c``-th non-identity cell of the network, counted across stages.

What an intermediate holds: the tokens leaving computing cell ``c`` (after its reduction, if any,
and its MLP), at that cell's stage width. Token counts change inside the network: inter-stage
pooling and in-stage reductions (ToMe merges, EViT's kept tokens plus one fused token, cluster
means) leave fewer tokens, and reduced tokens are no longer a patch grid, so intermediates are
``NLC`` only (``output_fmt="NCHW"`` is refused). ``feature_info[c]`` gives ``num_chs`` (the stage
width), ``tokens`` (class token included), ``module`` (``stages.i.cells.j``) and ``reduction``:
the effective stride, i.e. the side in pixels of the image area one non-class token stands for on
average, ``patch_size * sqrt(patches / tokens)`` rounded to an integer (``patch_size`` until a
reduction or pooling acts; never decreasing along the network).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from nas.arch import ArchConfig
from nas.errors import UserError
from nas.supernet import blocks

#: Normalisation of the data when the weights say nothing (``vitnas export`` records it in the
#: safetensors metadata): ImageNet's mean and std (timm's default) for 3 channels; for other
#: channel counts their channel averages, repeated.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GLOBAL_POOLS = ("token", "avg", "max", "avgmax", "")


def default_mean_std(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if in_chans == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    mean, std = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3
    return (round(mean, 4),) * in_chans, (round(std, 4),) * in_chans


def arch_pretrained_cfg(arch: ArchConfig, mean=None, std=None) -> dict:
    """timm's ``pretrained_cfg`` of a model of ``arch`` (vitnas's eval transform: resize and centre-crop
    to ``image_size``, bilinear, so ``crop_pct`` 1). ``mean``/``std`` default to ``default_mean_std``."""
    default_mean, default_std = default_mean_std(arch.in_chans)
    return {
        "url": "",
        "architecture": "vitnas_subnet",
        "num_classes": arch.num_classes,
        "input_size": (arch.in_chans, arch.image_size, arch.image_size),
        "pool_size": None,
        "fixed_input_size": True,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": tuple(mean if mean is not None else default_mean),
        "std": tuple(std if std is not None else default_std),
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }


def linear_drop_path_rates(rate: float, cells: int) -> tuple[float, ...]:
    """Linearly from 0 (first computing cell) to ``rate`` (last), as timm's ``calculate_drop_path_rates``."""
    return tuple(float(v) for v in torch.linspace(0, rate, cells, device="cpu"))


def take_indices(count: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """timm's ``feature_take_indices``: None → all, an int n → the last n, a sequence → those
    (negative from the end). Returns the absolute indices and the largest."""
    if indices is None:
        indices = count
    if isinstance(indices, int):
        if not 0 < indices <= count:
            raise ValueError(f"last-n ({indices}) is out of range (1 to {count})")
        taken = list(range(count - indices, count))
    else:
        taken = []
        for i in indices:
            idx = count + i if i < 0 else i
            if not 0 <= idx < count:
                raise ValueError(f"feature index {idx} is out of range (0 to {count - 1})")
            taken.append(idx)
    return taken, max(taken)


def stage_out_indices(arch: ArchConfig) -> tuple[int, ...]:
    """The last computing cell of each stage that has one: ``features_only``'s default ``out_indices``."""
    return tuple(p.first + p.computing - 1 for p in blocks.network_plan(arch) if p.computing)


def pool_tokens(x: Tensor, pool_type: str, num_prefix: int = 1) -> Tensor:
    """timm's ``global_pool_nlc``: the class token (``token``), a reduction over the non-class tokens
    (``avg``, ``max``, ``avgmax``), or ``x`` unchanged (``""``)."""
    if not pool_type:
        return x
    if pool_type == "token":
        return x[:, 0]
    tokens = x[:, num_prefix:]
    if pool_type == "avg":
        return tokens.mean(dim=1)
    if pool_type == "max":
        return tokens.amax(dim=1)
    return 0.5 * (tokens.amax(dim=1) + tokens.mean(dim=1))


def _check_pool(global_pool: str) -> str:
    if global_pool not in GLOBAL_POOLS:
        raise UserError(
            f"vitnas_subnet global_pool {global_pool!r}: expected one of {', '.join(map(repr, GLOBAL_POOLS))}"
        )
    return global_pool


class VitnasSubnet(nn.Module):
    """A stand-alone network for ``arch`` (``timm.create_model("vitnas_subnet", ...)`` builds this).

    ``device="meta"`` builds the layout without memory (used to learn the state-dict shapes).
    ``num_classes`` (default: the arch's; 0: no head), ``in_chans`` and ``img_size`` (must be the
    arch's: the patch embedding and position embedding are fixed), ``global_pool``, ``drop_rate``
    and ``drop_path_rate`` are timm's model arguments (see the module docstring).
    """

    def __init__(
        self,
        arch: ArchConfig,
        device=None,
        *,
        num_classes: int | None = None,
        in_chans: int | None = None,
        img_size: int | Sequence[int] | None = None,
        global_pool: str = "token",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if in_chans is not None and in_chans != arch.in_chans:
            raise UserError(
                f"vitnas_subnet: in_chans={in_chans}, but the architecture takes {arch.in_chans}-channel "
                f"images (its patch embedding is fixed); pass in_chans={arch.in_chans} or search a space "
                f"with in_chans {in_chans}"
            )
        if img_size is not None:
            size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
            if size != (arch.image_size, arch.image_size):
                raise UserError(
                    f"vitnas_subnet: img_size={img_size} but the architecture takes "
                    f"{arch.image_size}x{arch.image_size} images (its patch grid and position embedding are fixed)"
                )
        self.arch = arch
        self.in_chans = arch.in_chans
        self.global_pool = _check_pool(global_pool)
        self.num_prefix_tokens = 1
        self.num_features = self.head_hidden_size = self.embed_dim = arch.stages[-1].dim
        self.drop_rate, self.drop_path_rate = float(drop_rate), float(drop_path_rate)
        self.grad_checkpointing = False
        self._plans = blocks.network_plan(arch)
        self._cells = blocks.computing_cells(arch)
        self._stop: int | None = None  # last computing cell that runs (prune_intermediate_layers)
        #: stochastic-depth rate of each computing cell (empty: none)
        self.drop_path_rates = (
            linear_drop_path_rates(self.drop_path_rate, len(self._cells)) if drop_path_rate else ()
        )
        self.patch_embed, self.cls_token, self.pos_embed = blocks.make_stem(
            arch.in_chans, arch.stages[0].dim, arch.patch_size, arch.stages[0].tokens, device
        )
        self.stages = nn.ModuleList()
        prev = None
        for st in arch.stages:
            stage = nn.Module()
            if prev is not None:
                kernel = blocks.conv_kernel(st.pool, prev.tokens, st.tokens)
                stage.pool = blocks.make_pool(
                    prev.dim,
                    st.dim,
                    conv1d=kernel if st.pool == "conv1d" else 0,
                    conv2d=kernel if st.pool == "conv2d" else 0,
                    device=device,
                )
            hidden = blocks.mlp_hidden(st.dim, st.mlp_ratio)
            local = st.attention == "linear"
            stage.cells = nn.ModuleList(blocks.make_cell(st.dim, hidden, c, local, device) for c in st.cells)
            self.stages.append(stage)
            prev = st
        self.norm = nn.LayerNorm(arch.stages[-1].dim, eps=blocks.LN_EPS, device=device)
        self.head_drop = nn.Dropout(self.drop_rate)
        self.head = nn.Linear(arch.stages[-1].dim, arch.num_classes, device=device)
        self.num_classes = arch.num_classes
        self.feature_info = self._feature_info()
        self.pretrained_cfg = self.default_cfg = arch_pretrained_cfg(arch)
        if device != "meta" and str(device) != "meta":
            blocks.init_weights(self)
        if num_classes is not None and num_classes != arch.num_classes:
            self.reset_classifier(num_classes)
        if dtype is not None:
            self.to(dtype=dtype)

    # -- timm's feature API ---------------------------------------------------------------------
    def _feature_info(self) -> list[dict]:
        arch = self.arch
        patches = arch.grid**2
        info = []
        for i, j in self._cells:
            st = arch.stages[i]
            tokens = st.token_trace()[j]
            reduction = round(arch.patch_size * math.sqrt(patches / (tokens - 1)))
            info.append(
                {
                    "num_chs": st.dim,
                    "reduction": reduction,
                    "module": f"stages.{i}.cells.{j}",
                    "tokens": tokens,
                }
            )
        return info

    def _cell_count(self) -> int:
        return len(self._cells) if self._stop is None else self._stop + 1

    def _run_options(self) -> dict:
        tracing = blocks.is_symbolic_tracing() or torch.jit.is_scripting()
        return {
            "plans": self._plans,
            "stop": self._stop,
            "drop_path_rates": self.drop_path_rates if self.training else (),
            "training": self.training,
            "checkpoint": self.grad_checkpointing and not tracing,
        }

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every computing cell in the backward pass instead of keeping its activations."""
        self.grad_checkpointing = enable

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NLC",
        intermediates_only: bool = False,
        stop_early: bool = False,
        return_prefix_tokens: bool = False,
    ):
        """Tokens leaving computing cells (timm's ``forward_intermediates``).

        ``indices``: None → every computing cell, an int n → the last n, a sequence → those cells
        (network-wide computing-cell indices, see the module docstring). Each intermediate is the
        non-class tokens ``[B, N_c - 1, C_c]`` of that cell (``(tokens, class token [B, 1, C_c])``
        with ``return_prefix_tokens``). ``norm`` applies the final norm to intermediates of the last
        stage, the only ones of its width (timm's hierarchical models do the same). Returns
        ``(final, intermediates)``: ``final`` equals ``forward_features(x)``; with ``stop_early`` the
        network stops at the last requested cell, and ``final`` is that cell's tokens, normalised
        only when it is in the last stage.
        """
        if output_fmt != "NLC":
            raise ValueError(
                f"vitnas_subnet intermediates are output_fmt 'NLC' only, not {output_fmt!r}: token "
                "reductions and pooling leave tokens that are not a patch grid"
            )
        taken_idx, max_index = take_indices(self._cell_count(), indices)
        stop = self._last_cell(max_index) if stop_early else self._stop
        options = self._run_options()
        options["stop"] = stop
        take = frozenset(taken_idx)
        tokens, taken = blocks.forward_tokens(self.arch, self, x, take=take, **options)
        last_stage = len(self.arch.stages) - 1
        intermediates, prefixes = [], []
        for c, y in zip(sorted(take), taken):
            if norm and self._cells[c][0] == last_stage:
                y = self.norm(y)
            intermediates.append(y[:, self.num_prefix_tokens :])
            prefixes.append(y[:, : self.num_prefix_tokens])
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefixes))
        if intermediates_only:
            return intermediates
        final = self.norm(tokens) if stop is None or self._cells[stop][0] == last_stage else tokens
        return final, intermediates

    def _last_cell(self, index: int) -> int | None:
        """The ``stop`` of a network that ends after computing cell ``index`` (None: the whole
        network, which also runs the pooling of trailing stages that have no computing cell)."""
        return None if index >= len(self._cells) - 1 else index

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the computing cells (and stages) after the last of ``indices``, and optionally the
        final norm and the head (timm's API). The norm goes too when the network now ends before
        its last stage (it has the last stage's width). Returns the absolute indices kept."""
        taken, max_index = take_indices(self._cell_count(), indices)
        self._stop = self._last_cell(max_index)
        stop_stage = self._cells[max_index][0]
        if self._stop is not None:
            for i in range(stop_stage + 1, len(self.stages)):
                self.stages[i] = nn.Module()
            for c, (i, j) in enumerate(self._cells):
                if i == stop_stage and c > max_index:
                    self.stages[i].cells[j] = nn.Identity()
            self.num_features = self.head_hidden_size = self.arch.stages[stop_stage].dim
        if prune_norm or (self._stop is not None and stop_stage < len(self._plans) - 1):
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return taken

    # -- classifier -----------------------------------------------------------------------------
    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh head for ``num_classes`` (0: none, the model returns pooled features), and the
        pooling when ``global_pool`` is given (timm's API, e.g. for fine-tuning on other labels)."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = _check_pool(global_pool)
        if num_classes >= 2:  # the arch describes the head too; it needs 2+ classes
            self.arch = self.arch.model_copy(update={"num_classes": num_classes})
        device = self.norm.weight.device if isinstance(self.norm, nn.LayerNorm) else self.cls_token.device
        if num_classes > 0:
            self.head = nn.Linear(self.num_features, num_classes, device=device, dtype=self.cls_token.dtype)
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        else:
            self.head = nn.Identity()
        self.head.train(self.training)

    # -- forward --------------------------------------------------------------------------------
    def forward_features(self, x: Tensor) -> Tensor:
        """Images ``[B, C, H, W]`` → every final token after the final norm ``[B, N, C]``."""
        tokens, _ = blocks.forward_tokens(self.arch, self, x, **self._run_options())
        return self.norm(tokens)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens ``[B, N, C]`` → pooled (``global_pool``), dropout, then the head (unless ``pre_logits``)."""
        x = pool_tokens(x, self.global_pool, self.num_prefix_tokens)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def extra_repr(self) -> str:
        return f"arch={self.arch.arch_hash()}"


@functools.lru_cache(maxsize=1024)
def subnet_shapes(arch: ArchConfig) -> tuple[tuple[str, torch.Size], ...]:
    """The state-dict keys and shapes of ``VitnasSubnet(arch)``, without allocating it."""
    return tuple((k, v.shape) for k, v in VitnasSubnet(arch, device="meta").state_dict().items())
