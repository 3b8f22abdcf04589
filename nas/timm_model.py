"""``timm.create_model("vitnas_subnet", arch=...)``: exported architectures as timm models.

Registered when ``nas`` is imported. ``arch`` is an ``ArchConfig``, a mapping, or a path to an
``arch.yaml``; ``pretrained_file`` (or timm's own ``checkpoint_path``) loads weights from a local
safetensors file, such as the ``weights.safetensors`` that ``vitnas export`` writes.
"""

from __future__ import annotations

from pathlib import Path

from timm.models import register_model

from nas.arch import ArchConfig, arch_from_dict, load_arch
from nas.errors import UserError


def resolve_arch(arch) -> ArchConfig:
    if isinstance(arch, ArchConfig):
        return arch
    if isinstance(arch, dict):
        resolved = arch_from_dict(arch)
    elif isinstance(arch, (str, Path)):
        resolved = load_arch(arch)
    else:
        raise UserError("vitnas_subnet needs arch=: an ArchConfig, a mapping or a path to arch.yaml")
    if not isinstance(resolved, ArchConfig):
        raise UserError(f"vitnas_subnet builds family psvit architectures, got family {resolved.family}")
    return resolved


@register_model
def vitnas_subnet(
    pretrained: bool = False,
    arch=None,
    pretrained_file: str | None = None,
    num_classes: int | None = None,
    **kwargs,
):
    """A stand-alone vitnas subnet. ``num_classes`` other than the arch's replaces the head."""
    from nas.supernet.subnet import VitnasSubnet
    from nas.weights import load_weights

    for unused in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(unused, None)
    if kwargs:
        raise TypeError(f"vitnas_subnet got unexpected arguments: {', '.join(kwargs)}")
    spec = resolve_arch(arch)
    model = VitnasSubnet(spec)
    if pretrained_file:
        load_weights(model, pretrained_file)
    elif pretrained:
        raise UserError("vitnas_subnet has no hub weights: pass pretrained_file='weights.safetensors'")
    if num_classes is not None and num_classes != spec.num_classes:
        model.reset_classifier(num_classes)
    return model
