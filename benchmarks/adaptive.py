"""AdaViT against ToMe and EViT at matched mean GFLOPs: accuracy, FLOPs, latency at batch 1 and 32.

A DeiT-Tiny-family ViT (DeiT-Tiny's 3 heads and MLP ratio at half its width and 4 of its 12
blocks; 2x2-pixel patches of 16 px digits, so 64 tokens matter) is fine-tuned on digits from
scratch (``vitnas finetune``); its AdaViT decision networks are then trained once over a range of
budgets (``vitnas finetune --adaptive``, backbone included at a tenth of the learning rate, the
default ``backbone_lr``) and evaluated at budgets 1.0 / 0.75 / 0.5 and at the budget whose mean
GFLOPs on the validation split come closest to half the full model's (bisection; the same budget for
patches, heads and sub-layers).
ToMe (r merges per block: constant, or decreasing from 2r to 0) and EViT (a keep rate at blocks
1/2/3, EViT's quarter points, or 0/1/2 to reach lower FLOPs) patch the fine-tuned model with
``nas.ops.timm_patch``, each set to the schedule whose GFLOPs come closest to an AdaViT point's
mean GFLOPs. "per image" runs the half-FLOPs AdaViT one image at a time (what packing a batch
wins); "grouped heads" runs each kept-head set on its images alone instead of the union of heads
(``nas.ops.adavit_patch``, ``batching``).

GFLOPs: fvcore for the fixed-cost models; AdaViT's per-image count (``sample_flops``: fvcore's count
of what runs, checked in ``tests/ops/test_adavit.py``, plus the decision networks, which fvcore's
trace misses) averaged over the validation split. Latency: ``nas.hardware.measure`` through
``nas.hardware.input_cost.measure_over_inputs`` (every model runs through the same fixed sample of
validation images, in turn), in rounds with the models interleaved in a rotating order; speedups
are per-round ratios to the full model, and their share of the FLOP ratio says how much of the
saved compute turns into saved time. Medians and p10/p90 over rounds; the load average
(``uptime``) at start and end.

Latency is measured with one thread by default (``--threads``): on this shared 2-vCPU VM under
other agents' load (~6), every op that OpenMP parallelises waits for the other vCPU, so two-thread
timings count parallel regions more than work (measured here: ``index_add_`` of 1000 x 96 rows,
28 us on one thread, 451 us on two; an earlier two-thread run of this benchmark had ToMe slower
than the full model at batch 1 despite 1.8x fewer FLOPs).

    python benchmarks/adaptive.py                 # the full run (about 10 minutes on 2 quiet cores)
    python benchmarks/adaptive.py --quick         # a smoke run
"""

from __future__ import annotations

import os

# Spinning OpenMP workers steal cores between small ops on a shared machine (see benchmarks/token_ops.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import json
import platform
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import timm
import torch

from nas.adaptive_finetune import adaptive_finetune, evaluate_at, parse_adaptive
from nas.data import load_splits
from nas.evaluation import classification_accuracy
from nas.families.adaptive import adaptive_model
from nas.families.timm import base_model
from nas.finetune import QUICK, finetune
from nas.hardware.fingerprint import cpu_model
from nas.hardware.flops import flops
from nas.hardware.input_cost import fixed_sample, measure_over_inputs
from nas.hardware.target import Target
from nas.ops import adavit_patch, timm_patch
from nas.space import space_from_dict

THREADS = 2  # training; latency: --threads (default 1, see the module docstring)
MODEL = "deit_tiny_patch16_224"
MODEL_ARGS = {
    "patch_size": 2,
    "depth": 4,
    "embed_dim": 96,
}  # DeiT-Tiny's 3 heads, 4 of its 12 blocks, half its width
IMAGE = 16
BUDGETS = (1.0, 0.75, 0.5)  # and the half-FLOPs budget (``half_flops_budget``)
TRAIN_RANGE = "patch=0.4..1,head=0.33..1,block=0.4..1"
EVIT_LAYERS = ([1, 2, 3], [0, 1, 2])
RESULTS = Path(__file__).parent / "results"
SPACE = {"name": "bench-adaptive", "model": MODEL, "depth": MODEL_ARGS["depth"], "image_size": IMAGE,
         "num_classes": 10, "model_args": MODEL_ARGS}  # fmt: skip


def spread(values: list[float]) -> dict[str, float]:
    """Median and the 10th/90th percentiles."""
    if len(values) == 1:
        return {"median": values[0], "p10": values[0], "p90": values[0]}
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    return {"median": statistics.median(values), "p10": deciles[0], "p90": deciles[-1]}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def train(work: Path, args) -> tuple[Path, Path, dict]:
    """The fine-tuned backbone and the AdaViT weights (reused from ``work`` when present, with the
    seconds their training took, kept in ``work/train_seconds.json``)."""
    timm_space = space_from_dict({**SPACE, "family": "timm", "reduction": {"kind": ["none"]}})
    ada_space = space_from_dict({**SPACE, "family": "adaptive"})
    backbone, ada = work / "backbone.safetensors", work / "adavit.safetensors"
    record = work / "train_seconds.json"
    seconds = json.loads(record.read_text()) if record.is_file() else {}
    if not backbone.is_file():
        t0 = time.perf_counter()
        config = QUICK.replace(epochs=args.base_epochs, batch_size=64, lr=args.lr)
        finetune(timm_space, backbone, config=config, progress=False)
        seconds["backbone"] = time.perf_counter() - t0
    if not ada.is_file():
        t0 = time.perf_counter()
        config = QUICK.replace(epochs=args.ada_epochs, batch_size=64, lr=args.ada_lr)
        adaptive_finetune(
            ada_space, ada, parse_adaptive(TRAIN_RANGE), config=config, init=backbone, train_backbone=True,
            force=True, progress=False,
        )  # fmt: skip
        seconds["adavit_once_for_every_budget"] = time.perf_counter() - t0
    record.write_text(json.dumps(seconds))
    return backbone, ada, {"space": ada_space, "timm_space": timm_space, "train_seconds": seconds}


def schedule_costs(base, probe: torch.Tensor) -> list[tuple[float, str, dict]]:
    """(GFLOPs, kind, schedule) of every ToMe and EViT schedule tried for matching."""
    depth = MODEL_ARGS["depth"]
    tome = [{"kind": "tome", "r": [r] * depth} for r in range(0, 33)]
    tome += [
        {"kind": "tome", "r": [round(2 * r * (1 - b / (depth - 1))) for b in range(depth)]}
        for r in range(1, 17)
    ]
    evit = [
        {"kind": "evit", "keep_rate": k / 100, "layers": ls} for ls in EVIT_LAYERS for k in range(5, 100, 5)
    ]
    return [
        (flops(timm_patch.apply(copy.deepcopy(base), schedule), probe) / 1e9, schedule["kind"], schedule)
        for schedule in tome + evit
    ]


def matched(costs: list[tuple[float, str, dict]], target_gflops: float) -> dict:
    """The ToMe and the EViT schedule whose GFLOPs come closest to ``target_gflops``."""
    return {
        kind: min((c for c in costs if c[1] == kind), key=lambda c: abs(c[0] - target_gflops))[2]
        for kind in ("tome", "evit")
    }


def run(args) -> dict:
    torch.set_num_threads(THREADS)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    start_load = uptime()
    backbone, ada_weights, info = train(work, args)
    splits = load_splits("digits", IMAGE)
    val, probe = splits.val, torch.zeros(1, 3, IMAGE, IMAGE)
    base = base_model(info["timm_space"], backbone)
    full_gflops = flops(base, probe) / 1e9
    ada = adaptive_model(info["space"].spec, ada_weights, start=1, head_mode="full", usage={})
    costs = schedule_costs(base, probe)
    models, rows = {"full": base}, {}
    rows["full"] = {"method": "full", "setting": "unpatched", "accuracy": classification_accuracy(base, val)["accuracy"],
                    "gflops": full_gflops}  # fmt: skip
    half = half_flops_budget(ada, val, full_gflops / 2)
    for b in sorted({*BUDGETS, half}, reverse=True):
        decisions = adavit_schedule(b)
        usage = decisions["usage"]
        if b < 1:
            model = adavit_patch.apply(copy.deepcopy(ada), decisions)
            row = evaluate_at(model, val, usage)
        else:  # nothing decided: the unpatched computation
            model = adavit_patch.apply(copy.deepcopy(ada), {**decisions, "usage": {}})
            row = {"accuracy": classification_accuracy(model, val)["accuracy"], "gflops": flops(model, probe) / 1e9}
        per_image = model.sample_flops(val.tensors[0]).double() / 1e9
        name = f"adavit {b:g}"
        models[name] = model
        rows[name] = {"method": "adavit", "setting": usage, **row,
                      "gflops_p90": float(per_image.quantile(0.9))}  # fmt: skip
        if b < 1:
            for kind, schedule in matched(costs, row["gflops"]).items():
                other = timm_patch.apply(copy.deepcopy(base), schedule)
                label = f"{kind} @ adavit {b:g}"
                models[label] = other
                rows[label] = {"method": kind, "setting": schedule, "accuracy": classification_accuracy(other, val)["accuracy"],
                               "gflops": flops(other, probe) / 1e9}  # fmt: skip
    name = f"adavit {half:g}"
    models[f"{name} per image"] = PerImage(models[name])
    rows[f"{name} per image"] = {**rows[name], "method": "adavit-per-image"}
    grouped = copy.deepcopy(models[name])
    models[f"{name} grouped heads"] = adavit_patch.apply(grouped, {**adavit_schedule(half), "batching": "group"})
    rows[f"{name} grouped heads"] = {**rows[name], "method": "adavit-grouped-heads"}
    for row in rows.values():
        row["flop_ratio"] = full_gflops / row["gflops"]
    images = fixed_sample(val, args.images)
    for batch in (1, 32):
        times = latency_rounds(models, images, batch, args.rounds, args.budget_s, args.threads)
        for name, row in rows.items():
            ratios = [a / b for a, b in zip(times["full"], times[name])]
            sp = spread(ratios)
            row[f"batch{batch}"] = {
                "latency_ms": spread(times[name]), "speedup": sp,
                "speedup_over_flop_ratio": sp["median"] / row["flop_ratio"],
            }  # fmt: skip
    return {
        "benchmark": "adaptive",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": f"{MODEL} {MODEL_ARGS} at {IMAGE}px on digits (fine-tuned here from scratch)",
        "adavit_training": f"{TRAIN_RANGE}, backbone trained too at backbone_lr "
        f"{parse_adaptive(TRAIN_RANGE).backbone_lr:g} of lr {args.ada_lr:g}, {args.ada_epochs} epochs, once for every budget",
        "train_seconds": info["train_seconds"],
        "machine": {
            "cpu": cpu_model(),
            "threads_training": THREADS,
            "threads_latency": args.threads,
            "torch": torch.__version__,
            "timm": timm.__version__,
            "python": platform.python_version(),
            "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        },  # fmt: skip
        "uptime_at_start": start_load,
        "uptime_at_end": uptime(),
        "method": "latency: nas.hardware.measure over a fixed sample of validation images (each timed pass runs "
        f"all {args.images} of them), models interleaved in rotating order for {args.rounds} rounds; speedup = "
        "per-round ratio to the full model; median and p10/p90 over rounds",
        "rows": rows,
    }


def half_flops_budget(ada, val, target_gflops: float, steps: int = 8) -> float:
    """The budget (3 decimals) whose mean GFLOPs over ``val`` come closest to ``target_gflops``:
    bisection over [0.4, 1], the training's range (mean GFLOPs grow with the budget)."""
    model = adavit_patch.apply(copy.deepcopy(ada), adavit_schedule(0.5))
    lo, hi, tried = 0.4, 1.0, {}
    for _ in range(steps):
        mid = round((lo + hi) / 2, 3)
        tried[mid] = evaluate_at(model, val, adavit_schedule(mid)["usage"])["gflops"]
        lo, hi = (mid, hi) if tried[mid] < target_gflops else (lo, mid)
    return min(tried, key=lambda b: abs(tried[b] - target_gflops))


def adavit_schedule(budget: float) -> dict:
    return {"kind": "adavit", "usage": {k: budget for k in ("patch", "head", "block")}}


class PerImage(torch.nn.Module):
    """The model run one image at a time (the alternative to packing a batch)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.model(x[i : i + 1]) for i in range(len(x))])


def latency_rounds(
    models: dict, images: torch.Tensor, batch: int, rounds: int, budget_s: float, threads: int
) -> dict:
    """Milliseconds per batch of ``batch`` images, per model, per round (order rotated each round)."""
    target = Target(device="cpu", threads=threads, batch=batch)
    names = list(models)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            result = measure_over_inputs(models[name], images, target, time_budget_s=budget_s, remeasure=0)
            if not result.ok:
                raise RuntimeError(f"{name}: {result.error}")
            times[name].append(result.latency.median_ms)
    return times


def print_table(result: dict) -> None:
    print(f"\n{result['model']}\nstart: {result['uptime_at_start']}\nend:   {result['uptime_at_end']}")
    head = (f"{'model':<18}{'val acc':>8}{'GFLOPs':>9}{'FLOPx':>7}"
            f"{'b1 ms (p10-p90)':>22}{'b1 speedup':>12}{'/FLOPx':>8}{'b32 ms (p10-p90)':>24}{'b32 speedup':>12}{'/FLOPx':>8}")  # fmt: skip
    print(head + "\n" + "-" * len(head))
    for name, r in result["rows"].items():
        cells = []
        for b in ("batch1", "batch32"):
            lat, sp = r[b]["latency_ms"], r[b]["speedup"]
            cells.append(f"{lat['median']:>9.2f} ({lat['p10']:.2f}-{lat['p90']:.2f}){sp['median']:>9.2f}x"
                         f"{r[b]['speedup_over_flop_ratio']:>8.2f}")  # fmt: skip
        print(
            f"{name:<18}{r['accuracy']:>8.4f}{r['gflops']:>9.4f}{r['flop_ratio']:>7.2f}  {cells[0]}   {cells[1]}"
        )
    print("train seconds:", {k: round(v, 1) for k, v in result["train_seconds"].items()})


def plot(result: dict, path: Path) -> None:
    """Accuracy against batch-1 latency, one marker per method (the full model as a star)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    styles = {
        "full": ("*", "black"),
        "adavit": ("o", "tab:blue"),
        "tome": ("s", "tab:orange"),
        "evit": ("^", "tab:green"),
    }
    for method, (marker, color) in styles.items():
        rows = [(n, r) for n, r in result["rows"].items() if r["method"] == method]
        xs = [r["batch1"]["latency_ms"]["median"] for _, r in rows]
        ys = [100 * r["accuracy"] for _, r in rows]
        ax.scatter(xs, ys, marker=marker, color=color, label=method, s=60)
        for (_, r), x, y in zip(rows, xs, ys):
            ax.annotate(
                f"{r['gflops'] * 1e3:.0f} MFLOPs",
                (x, y),
                fontsize=7,
                xytext=(4, 3),
                textcoords="offset points",
            )
    ax.set_xlabel(
        f"latency at batch 1, ms (median over rounds, {result['machine']['threads_latency']} thread(s))"
    )
    ax.set_ylabel("validation accuracy, %")
    ax.set_title("AdaViT vs ToMe vs EViT at matched mean GFLOPs (digits)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few epochs and rounds: a smoke run")
    parser.add_argument(
        "--work", default="vitnas-runs/bench-adaptive", help="where the trained weights go (reused)"
    )
    parser.add_argument("--base-epochs", type=int, default=40)
    parser.add_argument("--ada-epochs", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ada-lr", type=float, default=1e-3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="threads latency is measured with")
    parser.add_argument("--images", type=int, default=64, help="validation images latency is taken over")
    parser.add_argument("--budget-s", type=float, default=1.0, help="time budget of one latency measurement")
    parser.add_argument("--out", type=Path, default=RESULTS / "adaptive.json")
    args = parser.parse_args()
    if args.quick:
        args.base_epochs, args.ada_epochs, args.rounds, args.budget_s = 2, 2, 1, 0.2
        args.out, args.work = args.out.with_name("adaptive-quick.json"), args.work + "-quick"
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print_table(result)
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
