"""``timm.create_model("vitnas_subnet", arch=...)``: exported architectures as timm models.

Registered when this module is imported (``import nas`` arranges that once timm is imported).
``arch`` is an ``ArchConfig``, a mapping, or a path to an ``arch.yaml``; ``pretrained_file`` (or
timm's own ``checkpoint_path``) loads weights from a local safetensors file, such as the
``weights.safetensors`` that ``vitnas export`` writes; the ``pretrained`` flag together with
``pretrained_cfg_overlay={"file": ...}`` (what timm's ``train.py --pretrained-path`` passes) reads
that local file too. Nothing is ever fetched: timm's own loader (hub, URL) is never asked.

The model's ``pretrained_cfg`` comes from the architecture: ``input_size`` (in_chans, image_size,
image_size), ``num_classes``, ``first_conv="patch_embed.proj"``, ``classifier="head"``, and the
``mean``/``std`` of the data the weights were trained on, read from ``pretrained_file``'s
safetensors metadata (keys ``mean`` and ``std``, JSON lists of floats) when it has them, else
``nas.supernet.subnet.default_mean_std`` (ImageNet's); ``pretrained_cfg_overlay`` overrides any
field. So ``timm.data.resolve_data_config({}, model=model)`` gives the transform the model needs.

Model arguments (what timm's train script passes): ``num_classes`` (0: pooled features),
``in_chans`` (must be the arch's), ``img_size`` (must be the arch's), ``global_pool``,
``drop_rate``, ``drop_path_rate``, ``features_only`` (with ``out_indices``, default the last
computing cell of each stage; outputs ``NLC`` tokens through ``forward_intermediates``, timm's
``feature_cls="getter"``, the only feature wrapper that fits: the cells are parameter holders that
the functional forward reads, so module hooks never fire), plus timm's ``pretrained_cfg``,
``pretrained_cfg_overlay``, ``cache_dir`` and ``checkpoint_path``. Anything else is a ``TypeError``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._builder import resolve_pretrained_cfg
from timm.models._pretrained import PretrainedCfg

from nas.arch import ArchConfig, arch_from_dict, load_arch
from nas.errors import UserError

MODEL_NAME = "vitnas_subnet"
_MODEL_ARGS = {
    "num_classes",
    "in_chans",
    "img_size",
    "global_pool",
    "drop_rate",
    "drop_path_rate",
    "device",
    "dtype",
}


def _registry_cfg() -> dict:
    """The registry's cfg: placeholders for an ImageNet-sized arch; every model replaces the input
    size, classes and normalisation with its arch's (``nas.supernet.subnet.arch_pretrained_cfg``)."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "fixed_input_size": True,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "description": "a vitnas-searched PSViT-style ViT; pass arch= (the architecture) to create it",
    }


default_cfgs = generate_default_cfgs({MODEL_NAME: _registry_cfg()})


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


def weights_mean_std(path: str | Path, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(mean, std)`` from a safetensors file's metadata (keys ``mean``, ``std``: JSON lists of
    floats, one per channel or one for all), or None when it records neither."""
    from nas.weights import read_metadata

    meta = read_metadata(path)
    present = [key for key in ("mean", "std") if key in meta]
    if not present:
        return None
    if len(present) == 1:
        raise UserError(
            f"{path}: metadata has {present[0]} but not {'std' if present[0] == 'mean' else 'mean'}"
        )
    out = []
    for key in ("mean", "std"):
        try:
            values = json.loads(meta[key])
            ok = isinstance(values, list) and len(values) in (1, in_chans)
            values = [float(v) for v in values] if ok else values
            ok = (
                ok and all(math.isfinite(v) for v in values) and (key == "mean" or all(v > 0 for v in values))
            )
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise UserError(
                f"{path}: metadata {key}={meta[key]!r} is not a JSON list of {in_chans} (or 1) "
                f"{'positive ' if key == 'std' else ''}numbers"
            )
        out.append(tuple(values * in_chans if len(values) == 1 else values))
    return out[0], out[1]


def model_pretrained_cfg(
    arch: ArchConfig,
    pretrained_file: str | Path | None = None,
    pretrained_cfg=None,
    pretrained_cfg_overlay: dict | None = None,
) -> dict:
    """The ``pretrained_cfg`` of a model of ``arch``: the registry's (or the one passed), then the
    arch's values, mean/std from the weights' metadata when they have them (else from a passed
    ``pretrained_cfg``, else the default), then ``pretrained_cfg_overlay``."""
    from nas.supernet.subnet import arch_pretrained_cfg

    base = resolve_pretrained_cfg(MODEL_NAME, pretrained_cfg=pretrained_cfg).to_dict()
    stats = weights_mean_std(pretrained_file, arch.in_chans) if pretrained_file else None
    if stats is None and isinstance(pretrained_cfg, (dict, PretrainedCfg)):
        stats = (base.get("mean"), base.get("std"))
    mean, std = stats if stats is not None else (None, None)
    cfg = PretrainedCfg(**{**base, **arch_pretrained_cfg(arch, mean, std)})
    try:
        cfg = dataclasses.replace(cfg, **(pretrained_cfg_overlay or {}))
    except TypeError as err:
        raise TypeError(f"vitnas_subnet pretrained_cfg_overlay: {err}") from None
    return cfg.to_dict()


def _build(
    arch: ArchConfig, pretrained_file: str | Path | None = None, num_classes: int | None = None, **kwargs
):
    """The model at the arch's head size, its weights, then the requested head (``build_model_with_cfg``
    calls this, so ``features_only`` wraps a model whose weights are loaded)."""
    from nas.supernet.subnet import VitnasSubnet
    from nas.weights import load_weights

    unknown = sorted(set(kwargs) - _MODEL_ARGS)
    if unknown:
        raise TypeError(f"vitnas_subnet got unexpected arguments: {', '.join(unknown)}")
    model = VitnasSubnet(arch, **kwargs)
    if pretrained_file:
        load_weights(model, pretrained_file)
    if num_classes is not None and num_classes != arch.num_classes:
        model.reset_classifier(num_classes)
    return model


@register_model
def vitnas_subnet(pretrained: bool = False, arch=None, pretrained_file: str | None = None, **kwargs):
    """A stand-alone vitnas subnet (see the module docstring for the arguments)."""
    from nas.supernet.subnet import stage_out_indices

    spec = resolve_arch(arch)
    overlay = kwargs.pop("pretrained_cfg_overlay", None)
    if pretrained and not pretrained_file:
        # timm's train.py --pretrained-path: the pretrained flag, with a local file in the cfg overlay
        pretrained_file = (overlay or {}).get("file")
        if not pretrained_file:
            raise UserError("vitnas_subnet has no hub weights: pass pretrained_file='weights.safetensors'")
    cfg = model_pretrained_cfg(spec, pretrained_file, kwargs.pop("pretrained_cfg", None), overlay)

    out_indices = kwargs.pop("out_indices", stage_out_indices(spec))
    feature_cfg = {"out_indices": out_indices, "feature_cls": "getter", "output_fmt": "NLC"}
    return build_model_with_cfg(
        _build,
        MODEL_NAME,
        pretrained=False,  # weights come from pretrained_file, loaded by _build
        pretrained_cfg=cfg,
        feature_cfg=feature_cfg,
        arch=spec,
        pretrained_file=pretrained_file,
        **kwargs,
    )
