"""``vitnas finetune --adaptive``: train AdaViT's decision networks (and, with ``train_backbone``,
the backbone) of a timm ViT on the user's data, through the one training loop.

Loss per micro-batch (Meng et al., CVPR 2022): cross-entropy + ``usage_weight`` x L_usage (the
squared gap between each kind's mean kept fraction and its budget), plus ``distill`` x the soft
cross-entropy against the same network with every decision off (vitnas's addition: it tells the
decisions which drops change the prediction). Each optimizer step draws its
budgets uniformly from the ranges asked for (``patch=0.5..1``): the decision networks take the
budget as an input (``nas.ops.adavit.DecisionNet``), so one training serves every budget in the
ranges and a search over budgets (``family: adaptive``) needs no fine-tune per candidate. A single
value (``patch=0.7``) trains at that budget alone. With ``train_backbone`` the backbone learns at
``backbone_lr`` times the decision networks' rate (default 0.1): at the full rate the backbone forgets
what it knew while the decisions are still random (measured in ``benchmarks/adaptive.py``).

A checkpoint (weights, AdamW state, a JSON sidecar) is written beside ``out`` after every epoch;
``resume`` continues it exactly: every random stream of an epoch (batch order, budgets, Gumbel
noise, dropout) is seeded from (seed, epoch). The Gumbel noise is annealed from 1 at the first
epoch to 0 at the last (``anneal``; ``nas.ops.adavit.keep_decision`` says why). The weights
written to ``out`` hold backbone and decision networks, with the training's settings in the
safetensors metadata (``adavit``).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nas.adaptive_spec import AdaptiveSpec, parse_adaptive, resolve_spec  # noqa: F401 - re-exported
from nas.errors import UserError
from nas.training.loop import StepContext, classification_loss

FORMAT = "vitnas-adavit-finetune/1"
SIDECAR, WEIGHTS, OPTIMIZER = "state.json", "weights.safetensors", "optimizer.safetensors"


# -- the step -------------------------------------------------------------------------------------
class AdaptiveStep:
    """Cross-entropy + usage loss (+ distillation from the model with every decision off)."""

    def __init__(
        self, spec: AdaptiveSpec, label_smoothing: float, seed: int, device: torch.device, epochs: int
    ):
        self.spec, self.label_smoothing, self.seed, self.device = spec, label_smoothing, seed, device
        self.epochs, self.noise_scale = epochs, 1.0
        self.budgets = torch.Generator()
        self.noise = torch.Generator(device=device)
        self.usage: list[dict[str, float]] = []

    def start_epoch(self, epoch: int) -> None:
        from nas.training.seeds import stream_seed

        self.budgets.manual_seed(stream_seed(self.seed, epoch, "adavit-budgets"))
        self.noise.manual_seed(stream_seed(self.seed, epoch, "adavit-noise"))
        torch.manual_seed(stream_seed(self.seed, epoch, "adavit-torch"))  # dropout, drop-path
        if self.spec.anneal and self.epochs > 1:
            self.noise_scale = max(0.0, 1 - epoch / (self.epochs - 1))

    def __call__(self, model: nn.Module, batches, ctx: StepContext) -> float:
        from nas.ops import adavit_patch
        from nas.ops.adavit import usage_loss

        budget = self.spec.draw(self.budgets)
        adavit_patch.set_budget(model, budget)
        adavit_patch.set_generator(model, self.noise)
        adavit_patch.set_noise(model, self.noise_scale)
        losses = []
        for x, target in batches:
            teacher = None
            if self.spec.distill:
                with torch.no_grad(), ctx.forward(), adavit_patch.decisions_off(model):
                    teacher = model(x).float().softmax(dim=-1)
            with ctx.forward():
                logits = model(x)
            used = adavit_patch.usage(model)
            loss = classification_loss(logits, target, self.label_smoothing)
            loss = loss + self.spec.usage_weight * usage_loss(used, budget)
            if teacher is not None:
                loss = (
                    loss + self.spec.distill * -(teacher * logits.float().log_softmax(dim=-1)).sum(-1).mean()
                )
            ctx.backward(loss)
            losses.append(loss.detach())
        return torch.stack(losses).mean().item()


# -- evaluation -----------------------------------------------------------------------------------
@torch.inference_mode()
def evaluate_at(model: nn.Module, data, budget: dict[str, float], device=None, batch_size: int = 256) -> dict:
    """Accuracy, loss, mean GFLOPs per image and mean kept fractions of ``model`` (inference: hard
    decisions, real skipping) on ``data`` at ``budget``; the model's budget is restored after."""
    from torch.utils.data import DataLoader, TensorDataset

    from nas.ops import adavit_patch

    before = adavit_patch.budget(model)
    adavit_patch.set_budget(model, budget)
    was_training = model.training
    model.eval()
    correct = count = 0
    loss = flops = 0.0
    kept: dict[str, float] = {}
    try:
        if isinstance(data, TensorDataset):
            batches = zip(data.tensors[0].split(batch_size), data.tensors[1].split(batch_size))
        else:
            batches = DataLoader(data, batch_size=batch_size, shuffle=False)
        for x, y in batches:
            if device is not None:
                x, y = x.to(device), y.to(device)
            logits = model(x)
            correct += (logits.argmax(-1) == y).sum().item()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            flops += adavit_patch.flops_of_last_forward(model, len(y)).sum().item()
            for k, v in (adavit_patch.usage(model) or {}).items():
                kept[k] = kept.get(k, 0.0) + v.sum().item()
            count += len(y)
    finally:
        adavit_patch.set_budget(model, before)
        model.train(was_training)
    n = max(count, 1)
    return {
        "accuracy": correct / n,
        "loss": loss / n,
        "gflops": flops / n / 1e9,
        **{f"kept_{k}": v / n for k, v in kept.items()},
    }


# -- the run --------------------------------------------------------------------------------------
def checkpoint_dir(out: str | Path) -> Path:
    """Where the training state of ``out`` lives: ``<out>.train/`` beside it."""
    out = Path(out)
    return out.parent / (out.name + ".train")


def adaptive_finetune(
    space,
    out: str | Path,
    spec: AdaptiveSpec,
    *,
    data: str = "digits",
    config=None,
    init: str | Path | None = None,
    device: str = "auto",
    train_backbone: bool = False,
    resume: bool = False,
    force: bool = False,
    tracking_uri: str | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    log: Callable[[str], None] = print,
):
    """Train the decision networks of ``space``'s model (see the module docstring); returns a
    ``nas.finetune.FinetuneOutcome`` (None on processes other than rank 0, and when ``stop_after``
    ends the call before the last epoch: ``resume`` continues)."""
    from nas.data import load_splits
    from nas.families.adaptive import adaptive_model
    from nas.families.timm import weights_file
    from nas.finetune import QUICK, FinetuneOutcome
    from nas.training import distributed
    from nas.training.batches import Batches
    from nas.training.loop import Hooks, fit
    from nas.training.optim import make_optimizer
    from nas.weights import file_hash, save_weights

    config = config or QUICK
    if space.family not in ("timm", "adaptive"):
        raise UserError(
            f"space {space.name!r} is a {space.family} space: vitnas finetune --adaptive needs a timm or adaptive space"
        )
    if config.compile:
        raise UserError("--compile: AdaViT's decisions change the computation per image; it runs eager")
    if not train_backbone and spec.backbone_lr != AdaptiveSpec.backbone_lr:
        raise UserError(
            f"--adaptive backbone_lr={spec.backbone_lr:g} goes with --train-backbone (without it the backbone is frozen)"
        )
    spec = resolve_spec(spec, space)
    folder = checkpoint_dir(out)
    if (folder / SIDECAR).is_file() and not (resume or force):
        epoch = json.loads((folder / SIDECAR).read_text()).get("epoch")
        raise UserError(
            f"{folder}: a training state is there already (epoch {epoch}); pass --resume to continue it or --force to start over"
        )
    if resume and not (folder / SIDECAR).is_file():
        raise UserError(f"{folder}: no training state to resume (run without --resume first)")
    init_path = weights_file(space, init)
    if init_path is not None and not Path(init_path).is_file():
        raise UserError(f"{init_path}: no such weights file")
    torch.manual_seed(config.seed)
    model = adaptive_model(
        space.spec, init_path, start=spec.start, head_mode=spec.head_mode, usage=spec.low()
    )
    for name, p in model.named_parameters():
        p.requires_grad_(train_backbone or _decides(name))
    splits = load_splits(data, space.spec.image_size, aug=config.aug)
    if splits.num_classes != space.spec.num_classes:
        raise UserError(
            f"data {splits.spec.spec} has {splits.num_classes} classes, space {space.name!r} expects {space.spec.num_classes}"
        )
    identity = {
        "space_hash": space.content_hash(), "spec": spec.to_dict(), "train_backbone": train_backbone,
        "data": splits.spec.to_dict(), "init_hash": file_hash(init_path) if init_path else None,
    }  # fmt: skip
    world = distributed.start(device, config.precision)
    try:
        model.to(world.device)
        optimizer = make_optimizer(model, config, lambda name: 1.0 if _decides(name) else spec.backbone_lr)
        start, history = 0, []
        if resume:
            start, history = _restore(folder, model, optimizer, identity, config, world.device)
        world.broadcast_parameters(model)
        end = config.epochs if stop_after is None else min(config.epochs, stop_after)

        def validate(m: nn.Module) -> dict:
            low = evaluate_at(m, splits.val, spec.low(), world.device)
            record = {"val_accuracy": low["accuracy"], "val_loss": low["loss"], "val_gflops": low["gflops"]}
            record.update({f"val_{k}": v for k, v in low.items() if k.startswith("kept_")})
            if spec.high() != spec.low():
                high = evaluate_at(m, splits.val, spec.high(), world.device)
                record.update(val_accuracy_high=high["accuracy"], val_gflops_high=high["gflops"])
            return record

        uri = (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")) if world.main else None
        with _tracking(uri, space, splits, config, spec, train_backbone, out, start) as run:

            def save(history: list[dict]) -> None:
                _save(
                    folder,
                    model,
                    optimizer,
                    {
                        **identity,
                        "epoch": history[-1]["epoch"],
                        "config": config.to_dict(),
                        "history": history,
                    },
                )
                if run is not None:
                    run.log_metrics(
                        {k: v for k, v in history[-1].items() if k != "epoch"}, step=history[-1]["epoch"]
                    )

            hooks = Hooks(
                validate, save, log=log,
                report=lambda r: f"epoch {r['epoch']}/{config.epochs}: loss {r['train_loss']:.4f}  val acc at the lowest "
                f"budgets {r['val_accuracy']:.4f} ({r['val_gflops']:.4g} GFLOPs)  ({r['seconds']:.1f} s)",
            )  # fmt: skip
            step = AdaptiveStep(spec, config.label_smoothing, config.seed, world.device, config.epochs)
            batches = Batches(splits.train, config, world, splits.num_classes)
            t0 = time.perf_counter()
            if start < end:
                history = fit(
                    model, optimizer, step, batches, config, world, hooks, start=start, end=end, history=history,
                    desc=f"adavit {space.name}", progress=progress,
                )  # fmt: skip
            if not world.main or end < config.epochs:
                return None
            metadata = {
                "adavit": json.dumps({**spec.to_dict(), "train_backbone": train_backbone}), "model": space.spec.model,
                "space": space.name, "data": splits.spec.spec, "epochs": str(config.epochs),
            }  # fmt: skip
            path = save_weights(model, out, metadata=metadata)
            if run is not None:
                run.set_tags(
                    {"weights": str(Path(path).resolve()), "seconds": f"{time.perf_counter() - t0:.1f}"}
                )
    finally:
        world.close()
    return FinetuneOutcome(Path(path), history[-1]["val_accuracy"] if history else float("nan"), history)


def _decides(name: str) -> bool:
    """A parameter of the decision networks (the rest is the backbone)."""
    return name.startswith("adavit.")


def _save(folder: Path, model: nn.Module, optimizer, meta: dict) -> None:
    """Weights, optimizer state and the sidecar (last), each written atomically."""
    from safetensors.torch import save_file

    from nas.files import write_atomically
    from nas.supernet.checkpoint import optimizer_groups, optimizer_tensors
    from nas.weights import file_hash, save_weights

    folder.mkdir(parents=True, exist_ok=True)
    tag = {"format": FORMAT, "epoch": str(meta["epoch"])}
    save_weights(model, folder / WEIGHTS, metadata=tag)
    write_atomically(
        folder / OPTIMIZER, lambda tmp: save_file(optimizer_tensors(model, optimizer), tmp, metadata=tag)
    )
    meta = {
        **meta, "format": FORMAT, "param_groups": optimizer_groups(optimizer),
        "weights_hash": file_hash(folder / WEIGHTS), "optimizer_hash": file_hash(folder / OPTIMIZER),
    }  # fmt: skip
    write_atomically(folder / SIDECAR, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))


def _restore(
    folder: Path, model: nn.Module, optimizer, identity: dict, config, device
) -> tuple[int, list[dict]]:
    """The checkpoint's weights, AdamW state, epoch and history, after checking it is this training."""
    from nas.weights import load_weights, read_tensors

    try:
        meta = json.loads((folder / SIDECAR).read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{folder / SIDECAR}: not valid JSON ({err})") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{folder / SIDECAR}: not a {FORMAT} training state")
    changed = [k for k, v in identity.items() if meta.get(k) != v]
    changed += config.changes_on_resume(meta["config"])
    if changed:
        raise UserError(
            f"{folder}: resume continues the same training; these differ: {', '.join(map(str, changed))}"
        )
    load_weights(model, folder / WEIGHTS, expect_hash=meta["weights_hash"], recorded_in=folder / SIDECAR)
    tensors = read_tensors(
        folder / OPTIMIZER, device, expect_hash=meta["optimizer_hash"], recorded_in=folder / SIDECAR
    )
    names = {id(p): n for n, p in model.named_parameters()}
    index = {names[id(p)]: i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        name, what = key.rsplit("/", 1)
        state.setdefault(index[name], {})[what] = value
    groups = meta["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return int(meta["epoch"]), list(meta["history"])


@contextlib.contextmanager
def _tracking(uri, space, splits, config, spec: AdaptiveSpec, train_backbone: bool, out, start: int):
    """The run's MLflow record (``nas.tracking.training_run``), or None without a tracking URI."""
    if not uri:
        yield None
        return
    from nas.names import ROLE
    from nas.tracking import training_run

    params = {
        "space": space.name, "space_file": space.source, "data": splits.spec.spec, **config.to_dict(),
        **{f"adavit.{k}": v for k, v in spec.to_dict().items()}, "train_backbone": train_backbone,
        "out": str(Path(out).resolve()),
    }  # fmt: skip
    tags = {ROLE: "finetune", "space": space.name, "resumed_from_epoch": start}
    with training_run(uri, "vitnas-finetune", f"adavit-{space.name}", params, tags) as run:
        yield run
