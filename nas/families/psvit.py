"""The PSViT family: stand-alone subnets of a weight-sharing supernet (``family: psvit`` spaces).

Drawing follows rules that make every drawn architecture legal (``nas.arch``) by construction:

- the first cell of a stage is always ``basic``; cells past the drawn depth are ``identity``;
- a stage with linear attention draws its cells and reductions from lists without ``share``
  and ``evit`` (conditional parameters under other names, so Optuna sees consistent choices);
- a reduction is applied only where it is legal: never right before a ``share`` cell, never
  below the tokens the next stage takes, never more merges than bipartite matching allows.

A campaign scores a member with the weights it inherits from the supernet checkpoint, frozen under
the workspace first (``nas.supernet.checkpoint.freeze_checkpoint``) so that export writes exactly
those weights whatever training does to the checkpoint later.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Sequence
from pathlib import Path

from nas.arch import ArchConfig, Reduction, StageConfig, tome_max_r
from nas.errors import UserError
from nas.families import Candidates, ExportedWeights
from nas.space import Chooser, PsvitSpace, ReductionChoices, ReplayChooser, StageChoices

NAME = "psvit"
WEIGHTS_TAG = "supernet_hash"
FROZEN_TAG = "frozen_weights"  # the campaign's frozen copy of what it scored

USAGE = """import nas, timm
model = timm.create_model("vitnas_subnet", arch="{out}/arch.yaml",
                          pretrained_file="{out}/weights.safetensors")
data_config = timm.data.resolve_data_config({{}}, model=model)  # input size, mean and std of the weights"""


# -- drawing ------------------------------------------------------------------------------------
def draw(spec: PsvitSpace, chooser: Chooser) -> ArchConfig:
    tokens = [chooser.choose(f"s{i}.tokens", st.tokens) for i, st in enumerate(spec.stages)]
    stages = []
    for i, st in enumerate(spec.stages):
        p = f"s{i}"
        floor = tokens[i + 1] if i + 1 < len(tokens) else 2
        attention = chooser.choose(f"{p}.attention", st.attention)
        stage = dict(
            tokens=tokens[i],
            dim=chooser.choose(f"{p}.dim", st.dim),
            heads=chooser.choose(f"{p}.heads", st.heads),
            mlp_ratio=chooser.choose(f"{p}.mlp_ratio", st.mlp_ratio),
            attention=attention,
            pool=chooser.choose(f"{p}.pool", st.pool) if i else None,
        )
        cells, reduction = _draw_structure(st, attention, tokens[i], floor, chooser, p)
        stages.append(StageConfig(**stage, cells=cells, reduction=reduction))
    return ArchConfig(
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        in_chans=spec.in_chans,
        num_classes=spec.num_classes,
        stages=tuple(stages),
    )


def _draw_structure(st: StageChoices, attention: str, tokens: int, floor: int, chooser: Chooser, p: str):
    """Cells and reduction of one stage; linear attention uses its own parameter names."""
    linear = attention == "linear"
    tag = "_linear" if linear else ""
    depth = chooser.choose(f"{p}.depth", st.depth)
    cell_options = [c for c in st.cells if not (linear and c == "share")] or ["basic"]
    cells = ["basic"] + [
        chooser.choose(f"{p}.cell{j}{tag}", cell_options) if len(cell_options) > 1 else cell_options[0]
        for j in range(1, depth)
    ]
    cells += ["identity"] * (st.max_depth - depth)
    red = st.reduction
    kinds = _kind_options(red, linear)
    kind = chooser.choose(f"{p}.reduction{tag}", kinds) if len(kinds) > 1 else kinds[0]
    if kind == "tome":
        r = chooser.choose(f"{p}.r", red.r)
        return tuple(cells), _place_tome(cells, r, tokens, floor)
    if kind in ("evit", "cluster"):
        keep = chooser.choose(f"{p}.keep_rate", red.keep_rate)
        method = chooser.choose(f"{p}.method", red.method) if kind == "cluster" else "kmedoids"
        return tuple(cells), _place_keep(cells, kind, keep, method, red.at, tokens, floor)
    return tuple(cells), Reduction()


def _kind_options(red: ReductionChoices, linear: bool) -> list[str]:
    """Reduction kinds a stage may draw; linear attention has no class attention to rank by (no evit)."""
    return [k for k in red.kind if not (linear and k == "evit")] or ["none"]


def _reducible(cells: Sequence[str], j: int, kind: str) -> bool:
    """Cell j may reduce: it computes its own attention (any non-identity cell for cluster), and
    the next computing cell does not reuse its map."""
    ok_cell = cells[j] != "identity" if kind == "cluster" else cells[j] == "basic"
    following = next((c for c in cells[j + 1 :] if c != "identity"), None)
    return ok_cell and following != "share"


def _place_tome(cells, r: int, tokens: int, floor: int) -> Reduction:
    n, rs = tokens, []
    for j in range(len(cells)):
        rj = min(r, tome_max_r(n - 1), n - floor) if _reducible(cells, j, "tome") else 0
        rs.append(max(rj, 0))
        n -= rs[-1]
    return Reduction(kind="tome", r=tuple(rs)) if any(rs) else Reduction()


def _place_keep(cells, kind, keep, method, at, tokens, floor) -> Reduction:
    n, placed = tokens, []
    for j in at:
        if j >= len(cells) or not _reducible(cells, j, kind):
            continue
        trial = Reduction(kind=kind, keep_rate=keep, at=(j,), method=method)
        n_after = trial.tokens_after(j, n)
        if n_after >= floor and n_after < n:
            placed.append(j)
            n = n_after
    if not placed:
        return Reduction()
    return Reduction(kind=kind, keep_rate=keep, at=tuple(placed), method=method)


# -- membership and counting ------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def stage_structures(st: StageChoices, tokens: int, floor: int) -> frozenset:
    """Every distinct (attention, cells, reduction) one stage can take."""
    found = set()
    for attention in st.attention:
        for params in _enumerate_structure_params(st, attention):
            cells, red = _draw_structure(st, attention, tokens, floor, ReplayChooser(params), "s")
            found.add((attention, cells, red))
    return frozenset(found)


def _enumerate_structure_params(st: StageChoices, attention: str):
    """All decision sets ``_draw_structure`` can ask for, as ReplayChooser params."""
    linear = attention == "linear"
    tag = "_linear" if linear else ""
    cell_options = [c for c in st.cells if not (linear and c == "share")] or ["basic"]
    kinds = _kind_options(st.reduction, linear)
    red = st.reduction
    for depth in st.depth:
        for cells in itertools.product(cell_options, repeat=depth - 1):
            base = {"s.depth": depth, **{f"s.cell{j}{tag}": c for j, c in enumerate(cells, start=1)}}
            for kind in kinds:
                base_k = {**base, f"s.reduction{tag}": kind}
                if kind == "tome":
                    yield from ({**base_k, "s.r": r} for r in red.r)
                elif kind in ("evit", "cluster"):
                    methods = red.method if kind == "cluster" else ("kmedoids",)
                    for keep, method in itertools.product(red.keep_rate, methods):
                        yield {**base_k, "s.keep_rate": keep, "s.method": method}
                else:
                    yield base_k


def _token_paths(spec: PsvitSpace):
    return itertools.product(*(st.tokens for st in spec.stages))


def count(spec: PsvitSpace) -> int:
    total = 0
    for path in _token_paths(spec):
        n = 1
        for i, st in enumerate(spec.stages):
            floor = path[i + 1] if i + 1 < len(path) else 2
            plain = len(st.dim) * len(st.heads) * len(st.mlp_ratio) * (len(st.pool) if i else 1)
            n *= plain * len(stage_structures(st, path[i], floor))
        total += n
    return total


def contains(spec: PsvitSpace, arch: ArchConfig) -> bool:
    head = (arch.image_size, arch.patch_size, arch.in_chans, arch.num_classes)
    if head != (spec.image_size, spec.patch_size, spec.in_chans, spec.num_classes):
        return False
    if len(arch.stages) != len(spec.stages):
        return False
    for i, (st, a) in enumerate(zip(spec.stages, arch.stages)):
        floor = arch.stages[i + 1].tokens if i + 1 < len(arch.stages) else 2
        plain_ok = (
            a.tokens in st.tokens
            and a.dim in st.dim
            and a.heads in st.heads
            and a.mlp_ratio in st.mlp_ratio
            and (a.pool in st.pool if i else a.pool is None)
        )
        if not plain_ok or (a.attention, a.cells, a.reduction) not in stage_structures(st, a.tokens, floor):
            return False
    return True


# -- description ----------------------------------------------------------------------------------
def describe_choices(choices: dict) -> list[str]:
    lines = [
        f"  image {choices['image_size']}px, patch {choices['patch_size']}, {choices['num_classes']} classes"
    ]
    for i, st in enumerate(choices["stages"]):
        lines.append(f"  stage {i}:")
        lines += [f"    {key:<10} {value}" for key, value in st.items()]
    return lines


def describe_arch(arch: ArchConfig) -> str:
    """One row per stage: tokens through the stage, dims, cells and reduction."""
    from nas.report import format_table

    rows = []
    for i, (st, trace) in enumerate(zip(arch.stages, arch.token_trace())):
        rows.append(
            {
                "stage": i,
                "pool": st.pool or "patch",
                "tokens": "->".join(map(str, [st.tokens, *trace])),
                "dim": st.dim,
                "heads": st.heads,
                "mlp": st.mlp_ratio,
                "attention": st.attention,
                "cells": " ".join(st.cells),
                "reduction": reduction_text(st.reduction),
            }
        )
    head = (
        f"{arch.image_size}px, patch {arch.patch_size}, {arch.num_classes} classes, hash {arch.arch_hash()}"
    )
    return head + "\n" + format_table(rows)


def reduction_text(red: Reduction) -> str:
    if red.kind == "tome":
        return f"ToMe: merge r = {', '.join(map(str, red.r))} per cell"
    if red.kind == "evit":
        return f"EViT: keep {red.keep_rate:g} after cells {', '.join(map(str, red.at))}"
    if red.kind == "cluster":
        return f"clustering ({red.method}): keep {red.keep_rate:g} after cells {', '.join(map(str, red.at))}"
    return "no reduction"


def drawing(arch: ArchConfig) -> dict:
    """What the dashboard draws: the patch embedding, every stage (pool into it, dims, heads,
    attention, reduction) with its cells and the token count after each, the head."""
    stages, before = [], arch.grid**2 + 1
    for i, st in enumerate(arch.stages):
        cells = [
            {"kind": kind, "tokens": after, "reduces": kind != "identity" and st.reduction.reduces_at(j)}
            for j, (kind, after) in enumerate(zip(st.cells, st.token_trace()))
        ]
        stages.append({
            "index": i,
            "pool": st.pool,
            "tokens_before": before,
            "tokens": st.tokens,
            "dim": st.dim,
            "heads": st.heads,
            "mlp_ratio": st.mlp_ratio,
            "attention": st.attention,
            "reduction": {"kind": st.reduction.kind, "text": reduction_text(st.reduction)},
            "cells": cells,
            "exit_tokens": st.exit_tokens,
        })  # fmt: skip
        before = st.exit_tokens
    return {
        "family": NAME,
        "image_size": arch.image_size,
        "patch_size": arch.patch_size,
        "grid": arch.grid,
        "in_chans": arch.in_chans,
        "num_classes": arch.num_classes,
        "stages": stages,
    }


# -- models ---------------------------------------------------------------------------------------
def input_chw(arch: ArchConfig) -> tuple[int, int, int]:
    return (arch.in_chans, arch.image_size, arch.image_size)


def build(arch: ArchConfig, reduce: dict | None = None):
    """The stand-alone subnet, randomly initialised; a psvit architecture carries its own reductions."""
    if reduce is not None:
        raise UserError("--reduce applies to timm models; a psvit architecture carries its own reductions")
    from nas.supernet.subnet import VitnasSubnet

    return VitnasSubnet(arch)


def candidates(space, *, workspace, device, supernet, weights, data, val_subset) -> Candidates:
    """Subnets extracted from the supernet checkpoint, frozen under ``workspace`` and loaded on
    ``device``; accuracy on the data the supernet was trained on (or ``data``)."""
    if weights:
        raise UserError(
            f"space {space.name} is a supernet space: --weights is for timm spaces, pass --supernet"
        )
    if not supernet:
        raise UserError(
            f"space {space.name} is a supernet space: pass --supernet CHECKPOINT (from vitnas train-supernet)"
        )
    from nas.data import load_splits
    from nas.supernet.checkpoint import freeze_checkpoint, load_checkpoint

    frozen = freeze_checkpoint(supernet, workspace)
    net, meta = load_checkpoint(frozen, space)
    net = net.to(device).eval()  # subnets are extracted where the supernet is
    spec, seed = data or meta["data"]["spec"], meta["data"].get("seed")
    splits = load_splits(spec, space.spec.image_size, seed=seed, val_subset=val_subset)
    return Candidates(
        build=lambda arch: net.extract(arch).eval(),
        val_data=splits.val,
        data_spec=splits.spec.spec,
        weights_hash=meta["weights_hash"],
        weights_tag=WEIGHTS_TAG,
        frozen=frozen,
    )


def worker_inputs(folder: str) -> dict[str, str]:
    """A Ray worker's campaign settings for the frozen files shipped to ``folder``."""
    return {"supernet": folder, "weights": None}


def training_step(arch: ArchConfig, config, device) -> None:
    """A subnet trains on plain cross-entropy (``nas.training.loop.SupervisedStep``)."""
    return None


# -- export ---------------------------------------------------------------------------------------
def export_weights(arch: ArchConfig, record: dict, out: Path) -> ExportedWeights:
    """The subnet's weights from the checkpoint the campaign scored with (its frozen copy; for a
    campaign older than frozen copies, the recorded checkpoint path), refused unless its hash is
    the one recorded for the trial."""
    from nas.supernet.checkpoint import load_checkpoint
    from nas.weights import file_hash, save_weights

    params, tags = record["params"], record["tags"]
    scored = record["trial_tags"].get(WEIGHTS_TAG) or tags.get(WEIGHTS_TAG)
    checkpoint = _recorded_checkpoint(params, tags)
    net, meta = load_checkpoint(checkpoint)  # the space from the sidecar; the file verified against its hash
    if scored and meta.get("weights_hash") != scored:
        raise UserError(
            f"{checkpoint}: checkpoint hash {meta.get('weights_hash')} is not {scored}, the one the campaign "
            "scored this trial with (trained further or replaced since?): the exported weights would not be "
            "the weights scored"
        )
    metadata = {"arch_hash": arch.arch_hash()}
    norm = meta.get("normalisation")
    if norm:  # timm's pretrained_cfg mean/std for the exported model
        metadata.update(mean=json.dumps(norm["mean"]), std=json.dumps(norm["std"]))
    path = save_weights(net.extract(arch), out / "weights.safetensors", metadata=metadata)
    return ExportedWeights(
        files=["weights.safetensors"],
        note=f"supernet checkpoint {meta.get('weights_hash')}, epoch {meta.get('epoch')}",
        weights_hash=file_hash(path),
        usage=USAGE.format(out=out),
    )


def _recorded_checkpoint(params: dict, tags: dict) -> Path:
    frozen = tags.get(FROZEN_TAG)
    if frozen and Path(frozen).is_dir():
        return Path(frozen)
    recorded = params.get("supernet")
    if not recorded or recorded == "None":
        raise UserError("the campaign's parent run names no supernet checkpoint")
    path = Path(recorded)
    if not path.exists():
        where = f"its frozen copy {frozen} is gone and " if frozen else ""
        raise UserError(
            f"the campaign's supernet checkpoint cannot be found: {where}{recorded} does not exist"
        )
    return path
