"""Supernet checkpoints: weights and optimizer state as safetensors, everything else in a JSON sidecar.

A checkpoint folder (``WORKSPACE/supernet/<space-name>/``) holds

- ``supernet.safetensors``: the supernet's weights (metadata: space name and hash, epoch);
- ``optimizer.safetensors``: AdamW's per-parameter tensors, keyed ``<parameter>/<field>``;
- ``supernet.json``: the sidecar: space (name, hash, validated content), data, epoch, seed,
  hyperparameters, metrics history, the optimizer's scalar settings and the file names, and once
  ``vitnas rank-check`` measured these weights, its ``ranking`` (``nas.ranking``).

Each epoch overwrites them: the two tensor files first, the sidecar last, each through a
temporary file and an atomic rename. Nothing is ever unpickled (no ``torch.load``).

Loading verifies the weights file against the sidecar's ``weights_hash`` and refuses NaN or
infinite parameters: a corrupted checkpoint must not be searched, exported or resumed silently.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from nas.errors import UserError
from nas.files import freeze, write_atomically
from nas.space import SearchSpace, space_from_dict
from nas.supernet.supernet import Supernet, space_hash
from nas.weights import check_file, check_finite, file_hash, read_metadata, read_tensors

# /2: conv1d/avg pooling after an in-stage reduction reads the restored input positions (and
# its conv kernel follows from them): /1 weights mean something else there
FORMAT = "vitnas-supernet/2"
WEIGHTS, OPTIMIZER, SIDECAR = "supernet.safetensors", "optimizer.safetensors", "supernet.json"
FROZEN = "frozen"  # WORKSPACE/frozen/: checkpoints as campaigns scored them


def checkpoint_dir(workspace: str | Path, space: SearchSpace) -> Path:
    return Path(workspace) / "supernet" / space.name


def resolve(path: str | Path) -> Path:
    """The checkpoint folder from the folder itself, its ``supernet.json`` or its ``supernet.safetensors``."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not (folder / SIDECAR).is_file():
        raise UserError(
            f"{path}: no supernet checkpoint here (expected {SIDECAR} beside {WEIGHTS}, from vitnas train-supernet)"
        )
    return folder


def freeze_checkpoint(path: str | Path, workspace: str | Path) -> Path:
    """The checkpoint's weights and sidecar as they are now, in ``WORKSPACE/frozen/supernet-<weights
    hash>/``: what a campaign scores and export reads, whatever later training writes over the
    original. ``UserError`` when the checkpoint changed while being frozen (training still running)."""
    folder = resolve(path)
    digest = read_meta(folder)["weights_hash"]
    check_file(folder / WEIGHTS, digest, folder / SIDECAR)  # a corrupted original is named as such
    frozen = freeze(
        {WEIGHTS: folder / WEIGHTS, SIDECAR: folder / SIDECAR},
        Path(workspace).resolve() / FROZEN / f"supernet-{digest}",
    )
    if read_meta(frozen)["weights_hash"] != digest or file_hash(frozen / WEIGHTS) != digest:
        shutil.rmtree(frozen, ignore_errors=True)
        raise UserError(
            f"{folder}: the checkpoint changed while it was being read (is training still writing it?)"
        )
    return frozen


def read_meta(path: str | Path) -> dict:
    folder = resolve(path)
    try:
        meta = json.loads((folder / SIDECAR).read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{folder / SIDECAR}: not valid JSON ({err})") from None
    if meta.get("format") == "vitnas-supernet/1":
        raise UserError(
            f"{folder / SIDECAR}: a checkpoint of an earlier vitnas, whose pooling after in-stage reductions "
            "differs: train the supernet again (vitnas train-supernet ... --force)"
        )
    if meta.get("format") != FORMAT:
        raise UserError(f"{folder / SIDECAR}: not a {FORMAT} sidecar (format {meta.get('format')!r})")
    return meta


def check_space(meta: dict, space: SearchSpace, where: str | Path) -> None:
    """``UserError`` naming both spaces when a checkpoint was trained for another space."""
    theirs, ours = meta["space"], space_hash(space)
    if theirs["hash"] != ours:
        raise UserError(
            f"{where}: checkpoint was trained for space {theirs['name']!r} (hash {theirs['hash']}), "
            f"not for space {space.name!r} (hash {ours}) from {space.source}"
        )


def load_checkpoint(
    path: str | Path, space: SearchSpace | None = None, device: str | torch.device = "cpu"
) -> tuple[Supernet, dict]:
    """The trained supernet and its sidecar. With ``space``, refuse a checkpoint of another space;
    without, rebuild the space from the sidecar. ``UserError`` for weights that do not match the
    sidecar's ``weights_hash`` or hold NaN/inf."""
    folder = resolve(path)
    meta = read_meta(folder)
    if space is None:
        space = space_from_dict(
            meta["space"]["content"], f"{folder / SIDECAR} (space {meta['space']['name']})"
        )
    check_space(meta, space, folder)
    weights = folder / meta["files"]["weights"]
    _check_tensor_file(weights, meta)
    net = Supernet(space).to(device)
    state = read_tensors(weights, device, expect_hash=meta.get("weights_hash"), recorded_in=folder / SIDECAR)
    check_finite(weights, state, (name for name, _ in net.named_parameters()))
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(
            f"{weights}: weights do not fit space {space.name!r} ({str(err).splitlines()[-1].strip()})"
        ) from None
    return net, meta


def save_checkpoint(folder: Path, net: Supernet, optimizer: torch.optim.Optimizer, meta: dict) -> Path:
    """Write weights, optimizer state and sidecar (in that order, atomically); returns the weights path."""
    folder.mkdir(parents=True, exist_ok=True)
    tag = {
        "format": FORMAT,
        "space": net.space.name,
        "space_hash": net.space_hash,
        "epoch": str(meta["epoch"]),
    }
    write_atomically(folder / WEIGHTS, lambda tmp: save_file(_cpu(net.state_dict()), tmp, metadata=tag))
    write_atomically(
        folder / OPTIMIZER, lambda tmp: save_file(optimizer_tensors(net, optimizer), tmp, metadata=tag)
    )
    meta = {
        **meta,
        "format": FORMAT,
        "space": {
            "name": net.space.name,
            "hash": net.space_hash,
            "source": net.space.source,
            "content": net.space.spec.model_dump(mode="json"),
        },
        "files": {"weights": WEIGHTS, "optimizer": OPTIMIZER},
        "optimizer": {"param_groups": optimizer_groups(optimizer)},
        "weights_hash": file_hash(folder / WEIGHTS),
    }
    write_atomically(folder / SIDECAR, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    return folder / WEIGHTS


def write_ranking(path: str | Path, ranking: dict) -> Path:
    """Add a rank-check's result (``nas.ranking``) to the sidecar as ``ranking``; returns the sidecar.

    Only onto the weights it measured: ``UserError`` when the weights file no longer has the hash the
    ranking was measured on (training went on meanwhile). Training's next epoch writes a sidecar
    without it, as the ranking no longer describes those weights.
    """
    folder = resolve(path)
    meta = read_meta(folder)
    digest = ranking["weights_hash"]
    if meta["weights_hash"] != digest or file_hash(folder / meta["files"]["weights"]) != digest:
        raise UserError(
            f"{folder}: the checkpoint changed while it was rank-checked (weights hash {meta['weights_hash']}, "
            f"measured {digest}); run vitnas rank-check again once training has finished"
        )
    meta["ranking"] = ranking
    return write_atomically(folder / SIDECAR, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))


def fork_checkpoint(path: str | Path, dest: str | Path, **changes) -> Path:
    """A copy of the checkpoint in folder ``dest`` that resumes (``train_supernet(..., resume=True)``)
    with other supernet-only settings, e.g. ``pin``: how a few-shot split's sub-supernets (Zhao et al.
    2021) start from the weights and optimizer state the whole space was trained to. Returns ``dest``."""
    from nas.training.config import SUPERNET_ONLY

    unknown = sorted(set(changes) - set(SUPERNET_ONLY))
    if unknown:
        raise ValueError(f"fork_checkpoint changes only supernet-only settings, not {unknown}")
    folder, dest = resolve(path), Path(dest)
    meta = read_meta(folder)
    dest.mkdir(parents=True, exist_ok=True)
    for name in meta["files"].values():
        shutil.copy2(folder / name, dest / name)
    meta["config"] = {**meta["config"], **changes}
    meta.pop("ranking", None)
    write_atomically(dest / SIDECAR, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    return dest


# -- optimizer state ---------------------------------------------------------------------------
def optimizer_tensors(net: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Per-parameter state as ``{"<parameter name>/<field>": tensor}`` (scalars as 0-d tensors)."""
    names = {id(p): n for n, p in net.named_parameters()}
    out = {}
    for param, state in optimizer.state.items():
        for field, value in state.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            out[f"{names[id(param)]}/{field}"] = value.detach().contiguous().cpu()
    return out


def optimizer_groups(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Scalar settings of each group, with parameters as indices (JSON-safe)."""
    return json.loads(json.dumps(optimizer.state_dict()["param_groups"]))


def load_optimizer(folder: Path, net: nn.Module, optimizer: torch.optim.Optimizer, meta: dict) -> None:
    """Restore ``optimizer`` (built over ``net`` as at save time) from the checkpoint folder."""
    path = folder / meta["files"]["optimizer"]
    _check_tensor_file(path, meta)
    tensors = read_tensors(path)
    index = {n: i for i, (n, _) in enumerate(_ordered_params(net, optimizer))}
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        name, field = key.rsplit("/", 1)
        state.setdefault(index[name], {})[field] = value
    groups = meta["optimizer"]["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _ordered_params(net: nn.Module, optimizer: torch.optim.Optimizer):
    """(name, parameter) in the optimizer's own index order (its ``state_dict`` numbering)."""
    names = {id(p): n for n, p in net.named_parameters()}
    return [(names[id(p)], p) for group in optimizer.param_groups for p in group["params"]]


# -- files ----------------------------------------------------------------------------------------
def _cpu(state: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _check_tensor_file(path: Path, meta: dict) -> None:
    """The tensor file exists and belongs to the sidecar's space and epoch."""
    if not path.is_file():
        raise UserError(f"{path}: missing (the checkpoint's sidecar names it)")
    tag = read_metadata(path)
    if tag.get("space_hash") != meta["space"]["hash"] or tag.get("epoch") != str(meta["epoch"]):
        raise UserError(
            f"{path}: written for space hash {tag.get('space_hash')} epoch {tag.get('epoch')}, but the sidecar says "
            f"{meta['space']['hash']} epoch {meta['epoch']} (interrupted while saving?)"
        )
