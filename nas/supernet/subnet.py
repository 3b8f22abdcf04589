"""``VitnasSubnet``: one PSViT-style architecture as a plain ``nn.Module``.

It holds parameters at exactly its architecture's sizes and nothing else (no supernet, no slicing),
so its latency is the latency of the real network. The forward is ``nas.supernet.blocks``, the same
code the supernet runs on its sliced weights; ``extract`` fills one of these with those slices.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from nas.arch import ArchConfig
from nas.supernet import blocks


class VitnasSubnet(nn.Module):
    """A stand-alone network for ``arch`` (``timm.create_model("vitnas_subnet", ...)`` builds this).

    ``device="meta"`` builds the layout without memory (used to learn the state-dict shapes).
    """

    def __init__(self, arch: ArchConfig, device=None):
        super().__init__()
        self.arch = arch
        self.num_classes = arch.num_classes
        self.num_features = arch.stages[-1].dim
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
        self.head = nn.Linear(arch.stages[-1].dim, arch.num_classes, device=device)
        if device != "meta" and str(device) != "meta":
            blocks.init_weights(self)

    def forward_features(self, x: Tensor) -> Tensor:
        return blocks.forward_features(self.arch, self, x)

    def forward_head(self, x: Tensor) -> Tensor:
        return blocks.linear(x, self.head)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh head for ``num_classes`` (timm's API, e.g. for fine-tuning on other labels)."""
        self.num_classes = num_classes
        self.arch = self.arch.model_copy(update={"num_classes": num_classes})
        self.head = nn.Linear(self.num_features, num_classes, device=self.head.weight.device)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        return blocks.forward_logits(self.arch, self, x)

    def extra_repr(self) -> str:
        return f"arch={self.arch.arch_hash()}"


@functools.lru_cache(maxsize=1024)
def subnet_shapes(arch: ArchConfig) -> tuple[tuple[str, torch.Size], ...]:
    """The state-dict keys and shapes of ``VitnasSubnet(arch)``, without allocating it."""
    return tuple((k, v.shape) for k, v in VitnasSubnet(arch, device="meta").state_dict().items())
