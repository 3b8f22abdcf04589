"""Training throughput of the one training loop: what weight slicing costs, 1 vs N processes, 224 px.

Three measurements. Each one runs its variants in rounds, changing the order every round, and
reports the median with the spread [min, max] over rounds:

1. Cost of weight slicing. The supernet of a space with one choice per field (one stage: dim 192,
   3 heads, depth 6, MLP ratio 4, 4 px patches, 32 px, softmax attention, basic cells) runs its
   only subnet, ``net(x, arch)``, against timm's ``VisionTransformer`` of the same shape. Both have
   the same parameter count, and both are trained by ``nas.training.loop.fit`` with
   ``SupervisedStep`` on the same digits batches (``Batches``, ``TrainConfig``, ``World()``), so
   each step does exactly one forward and one backward. Goal: supernet / timm images/s >= 0.85.
   For reference only: the full sandwich step (``SandwichStep``) on psvit-digits, as images/s and
   as images/s per subnet forward (largest + smallest + random ones).
2. 1 vs N processes. The real CLI, ``python -m nas train-supernet --space psvit-digits`` with a fixed
   global batch, runs as one process and under ``torch.distributed.run`` with N processes. On a CPU
   every process gets one thread (OMP_NUM_THREADS=1), and one process with N threads is the fair
   baseline for using all N cores. images/s and data-wait share come from the last epoch in the
   checkpoint sidecar's ``history``. Scaling efficiency = images/s(N) / (N x images/s(1)).
3. psvit-tiny at 224 px, where data comes from disk. The script writes a temporary ImageFolder of
   random-noise PNGs (256 px, one colour per class) and a copy of psvit-tiny with its
   ``num_classes`` set to match. It then runs one short ``train-supernet`` epoch with --aug light
   and 2 loader workers in a subprocess, and reports s/step, images/s, the loader's share of step
   time, and peak memory (max RSS of that process, or ``torch.cuda.max_memory_allocated`` on CUDA).

    python benchmarks/training_throughput.py            # CPU: about 5 minutes on 2 cores (82 s --quick)
    python benchmarks/training_throughput.py --quick    # smoke run; writes training_throughput_quick.json

On a CUDA machine, which compares fp32 with bf16 in parts 1 and 3 and 1 GPU with 8 in part 2:

    python benchmarks/training_throughput.py --device cuda --precision fp32,bf16 --nproc 1,8

Results go to benchmarks/results/training_throughput.json (the --quick run goes to
training_throughput_quick.json). A CPU run never touches CUDA.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/token_ops.py (before torch loads)

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import timm
import torch
import yaml
from PIL import Image
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.data import Subset

from nas.data import load_splits
from nas.errors import UserError
from nas.hardware.fingerprint import cpu_model
from nas.report import format_table
from nas.space import load_space, shipped_space_path, space_from_dict
from nas.supernet import Supernet
from nas.supernet.checkpoint import SIDECAR
from nas.supernet.train import SandwichStep
from nas.training.batches import Batches
from nas.training.config import PRECISIONS, TrainConfig
from nas.training.devices import resolve_device
from nas.training.distributed import World
from nas.training.loop import Hooks, SupervisedStep, fit
from nas.training.optim import make_optimizer
from nas.training.precision import check_precision

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
# the plain ViT of part 1, as a psvit space with one choice per field and as timm's model
VIT = {"dim": 192, "heads": 3, "depth": 6, "mlp_ratio": 4.0, "patch_size": 4, "image_size": 32, "classes": 10}
# part 3's generated data: classes, image side in pixels, validation images per class
FOLDER_CLASSES, FOLDER_PIXELS, FOLDER_VAL_PER_CLASS = 10, 256, 2
# runs the CLI in a child process, then prints that process's peak memory as one JSON line
PEAK_RUNNER = """
import gc, json, resource, sys
from nas.cli import main
from nas.hardware.fingerprint import cpu_model
code = main(sys.argv[1:])
gc.collect()  # let the loader's workers be reaped, so RUSAGE_CHILDREN counts them
unit = 2**20 if sys.platform == "darwin" else 2**10  # ru_maxrss: bytes on macOS, KiB on Linux
peak = {"rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / unit,
        "largest_child_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / unit}
import torch
if torch.cuda.is_initialized():
    peak["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
print("PEAK " + json.dumps(peak))
sys.exit(code)
"""


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def rotated(items: list, r: int) -> list:
    """``items`` starting at position r (mod len): each round starts with another variant."""
    k = r % len(items)
    return items[k:] + items[:k]


def fmt(s: dict, digits: int = 1) -> str:
    """'median [min, max]'."""
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def pct(s: dict) -> str:
    return f"{100 * s['median']:.1f}% [{100 * s['min']:.1f}, {100 * s['max']:.1f}]"


def machine(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(), "cpu": cpu_model(), "logical_cpus": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"], "device": str(device),
    }  # fmt: skip
    if device.type == "cuda":  # only here: a CPU run never initialises CUDA
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpus"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
    return info


# -- part 1: the supernet's slicing against a plain timm ViT -----------------------------------------
class OnlySubnet(nn.Module):
    """A supernet that always runs the same subnet, so ``SupervisedStep`` can train it like any model."""

    def __init__(self, net: Supernet, arch):
        super().__init__()
        self.net, self.arch = net, arch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, self.arch)


def plain_vit_space():
    stage = {
        "dim": [VIT["dim"]], "heads": [VIT["heads"]], "mlp_ratio": [VIT["mlp_ratio"]],
        "depth": [VIT["depth"]], "attention": ["softmax"], "cells": ["basic"],
    }  # fmt: skip
    spec = {
        "name": "plain-vit", "family": "psvit", "image_size": VIT["image_size"],
        "patch_size": VIT["patch_size"], "num_classes": VIT["classes"], "stages": [stage],
    }  # fmt: skip
    return space_from_dict(spec, "<training_throughput: plain ViT>")


def timm_vit() -> VisionTransformer:
    return VisionTransformer(
        img_size=VIT["image_size"], patch_size=VIT["patch_size"], embed_dim=VIT["dim"], depth=VIT["depth"],
        num_heads=VIT["heads"], mlp_ratio=VIT["mlp_ratio"], num_classes=VIT["classes"],
    )  # fmt: skip


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def slicing_cost(args, device: torch.device, precision: str) -> dict:
    """Images/s of the one-subnet supernet, timm's ViT and the psvit-digits sandwich, trained by ``fit``."""
    world = World(device=device)
    config = TrainConfig(epochs=1, batch_size=args.batch_size, precision=precision)
    digits = load_splits("digits", VIT["image_size"])
    # CPU: a few steps per epoch; CUDA: the whole split, as its steps take milliseconds
    steps = args.steps or (6 if device.type == "cpu" else len(digits.train) // args.batch_size)
    images = steps * args.batch_size
    if not 0 < images <= len(digits.train):
        raise UserError(
            f"--steps {steps} x --batch-size {args.batch_size}: digits has {len(digits.train)} training "
            "images"
        )
    batches = Batches(Subset(digits.train, range(images)), config, world, digits.num_classes)
    torch.manual_seed(0)
    space = plain_vit_space()
    supernet, timm_model = OnlySubnet(Supernet(space), space.largest()), timm_vit()
    counts = {"supernet": parameters(supernet), "timm": parameters(timm_model)}
    print(
        f"part 1: parameters of the one-subnet supernet {counts['supernet']:,}, timm ViT {counts['timm']:,}"
    )
    if abs(counts["supernet"] - counts["timm"]) > 0.01 * counts["timm"]:
        raise RuntimeError(f"the two models differ in size by more than 1%: {counts}")
    digits_space = load_space("psvit-digits")
    sandwich_net = Supernet(digits_space)
    supervised = SupervisedStep(config.label_smoothing)
    variants = {
        "supernet, 1 subnet": (supernet, supervised),
        "timm ViT": (timm_model, supervised),
        "sandwich psvit-digits": (sandwich_net, SandwichStep(digits_space, config)),
    }
    runs = {}
    for name, (model, step) in variants.items():
        model.to(device)
        runs[name] = (model, make_optimizer(model, config), step)
    hooks = Hooks(validate=lambda model: {}, log=lambda line: None)

    def images_per_s(name: str) -> float:
        model, optimizer, step = runs[name]
        history = fit(model, optimizer, step, batches, config, world, hooks, progress=False)
        return history[-1]["images_per_s"]

    names = list(variants)
    for name in names:  # warm-up round: allocator, optimizer state, kernels (not recorded)
        images_per_s(name)
    samples = {name: [] for name in names}
    for r in range(args.rounds):
        for name in rotated(names, r):
            samples[name].append(images_per_s(name))
        print(
            f"  round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {samples[n][-1]:.0f}" for n in names),
            flush=True,
        )
    forwards = 2 + config.random_subnets
    ratios = [s / t for s, t in zip(samples["supernet, 1 subnet"], samples["timm ViT"])]
    per_forward = [v * forwards for v in samples["sandwich psvit-digits"]]
    return {
        "precision": precision, "parameters": counts, "steps_per_round": steps, "batch_size": args.batch_size,
        "sandwich_forwards_per_step": forwards, "images_per_s": samples,
        "summary": {
            **{f"{name} images/s": spread(samples[name]) for name in names},
            "sandwich images/s per subnet forward": spread(per_forward),
            "supernet / timm": spread(ratios),
        },
    }  # fmt: skip


# -- the CLI in child processes ----------------------------------------------------------------------
def child_env(threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("MLFLOW_TRACKING_URI", None)  # these runs are not tracked
    return env


def train_supernet_cli(
    launcher: list[str], options: list[str], workspace: Path, space_name: str, threads: int
) -> tuple[dict, str, float]:
    """Run ``train-supernet`` to completion; its sidecar's last epoch record, its stdout, the wall time."""
    command = [*launcher, "train-supernet", "--workspace", str(workspace), "--quiet", "--force", *options]
    start = time.perf_counter()
    done = subprocess.run(
        command, cwd=ROOT, env=child_env(threads), capture_output=True, text=True, timeout=1800
    )
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    meta = json.loads((workspace / "supernet" / space_name / SIDECAR).read_text())
    return meta["history"][-1], done.stdout, wall


def launcher_for(procs: int) -> list[str]:
    if procs == 1:
        return [sys.executable, "-m", "nas"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    return [*torchrun, "-m", "nas"]


# -- part 2: 1 vs N processes --------------------------------------------------------------------------
def process_configs(args, device: torch.device) -> list[tuple[int, int]]:
    """(processes, threads per process). CPU: one thread per process, plus 1 process x N threads;
    CUDA: one GPU per process, the CPU's cores shared out."""
    if device.type == "cuda":
        gpus = torch.cuda.device_count()
        if max(args.nproc) > gpus:
            print(f"  (skipping --nproc above the {gpus} GPU(s) here)")
        return [(n, max(1, (os.cpu_count() or 1) // n)) for n in args.nproc if n <= gpus]
    configs = [(n, 1) for n in args.nproc]
    if max(args.nproc) > 1:
        configs.append((1, max(args.nproc)))
    return configs


def label(procs: int, threads: int) -> str:
    return f"{procs} proc{'s' if procs > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}"


def process_scaling(args, device: torch.device, precision: str, tmp: Path) -> dict:
    configs = process_configs(args, device)
    options = [
        "--space", "psvit-digits", "--data", "digits", "--epochs", str(args.scaling_epochs),
        "--batch-size", str(args.batch_size), "--device", device.type, "--precision", precision,
    ]  # fmt: skip
    records = {label(*c): [] for c in configs}
    walls = {label(*c): [] for c in configs}
    for r in range(args.process_rounds):
        for procs, threads in rotated(configs, r):
            name = label(procs, threads)
            record, _, wall = train_supernet_cli(
                launcher_for(procs), options, tmp / f"scaling-{r}", "psvit-digits", threads
            )
            records[name].append({k: record[k] for k in ("images_per_s", "data_wait_share", "seconds")})
            walls[name].append(wall)
            print(
                f"  round {r + 1}/{args.process_rounds}: {name} {record['images_per_s']:.0f} images/s",
                flush=True,
            )
    rate = {name: [x["images_per_s"] for x in recs] for name, recs in records.items()}
    summary = {
        name: {
            "images_per_s": spread(rate[name]),
            "data_wait_share": spread([x["data_wait_share"] for x in recs]),
            "wall_s": spread(walls[name]),
        }
        for name, recs in records.items()
    }
    single = rate[label(*configs[0])]  # one process (one thread on a CPU)
    efficiency = {}
    for procs, threads in configs:
        if procs > 1:  # paired by round: the 1-process run of the same round is the reference
            many = rate[label(procs, threads)]
            efficiency[label(procs, threads)] = spread([n / (procs * one) for n, one in zip(many, single)])
    result = {
        "precision": precision, "global_batch": args.batch_size, "epochs": args.scaling_epochs,
        "configs": [label(*c) for c in configs], "runs": records, "walls_s": walls, "summary": summary,
        "scaling_efficiency": efficiency,
    }  # fmt: skip
    if device.type == "cpu" and max(args.nproc) > 1:  # N processes against one process using N threads
        n = max(args.nproc)
        procs_name, threads_name = label(n, 1), label(1, n)
        ratios = [a / b for a, b in zip(rate[procs_name], rate[threads_name])]
        result["processes_vs_threads"] = {
            "compared": f"{procs_name} / {threads_name}",
            "ratio": spread(ratios),
        }
    return result


# -- part 3: psvit-tiny at 224 px from disk -----------------------------------------------------------
def write_image_folder(root: Path, train_per_class: int) -> None:
    """train/ and val/ with one folder per class of noise PNGs around the class's own colour."""
    rng = np.random.default_rng(0)
    colours = rng.integers(30, 226, size=(FOLDER_CLASSES, 3))
    for split, count in (("train", train_per_class), ("val", FOLDER_VAL_PER_CLASS)):
        for c in range(FOLDER_CLASSES):
            folder = root / split / f"class{c:02d}"
            folder.mkdir(parents=True)
            for i in range(count):
                noise = rng.normal(0.0, 40.0, size=(FOLDER_PIXELS, FOLDER_PIXELS, 3))
                pixels = np.clip(colours[c] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")


def psvit_tiny_copy(tmp: Path) -> Path:
    """psvit-tiny with ``num_classes`` set to the generated folder's classes (it ships with 1000)."""
    data = yaml.safe_load(shipped_space_path("psvit-tiny").read_text())
    data.update(name="psvit-tiny-bench", num_classes=FOLDER_CLASSES)
    path = tmp / "psvit-tiny-bench.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    space_from_dict(data, str(path))  # refuse here, not in the child, if the copy is not a valid space
    return path


def imagefolder_224(args, device: torch.device, precisions: list[str], tmp: Path) -> dict:
    train_per_class = math.ceil(args.folder_steps * args.folder_batch / FOLDER_CLASSES)
    folder = tmp / "images"
    start = time.perf_counter()
    write_image_folder(folder, train_per_class)
    print(
        f"  wrote {FOLDER_CLASSES} classes x ({train_per_class} train + {FOLDER_VAL_PER_CLASS} val) "
        f"PNGs of {FOLDER_PIXELS} px in {time.perf_counter() - start:.1f} s",
        flush=True,
    )
    space = psvit_tiny_copy(tmp)
    launcher = [sys.executable, "-c", PEAK_RUNNER]
    runs = {p: [] for p in precisions}
    for r in range(args.folder_runs):
        for precision in rotated(precisions, r):
            options = [
                "--space", str(space), "--data", f"imagefolder:{folder}", "--epochs", "1", "--aug", "light",
                "--loader-workers", "2", "--batch-size", str(args.folder_batch), "--device", device.type,
                "--precision", precision,
            ]  # fmt: skip
            record, stdout, wall = train_supernet_cli(
                launcher, options, tmp / "folder-ws", "psvit-tiny-bench", args.threads
            )
            peak = json.loads(next(line for line in stdout.splitlines() if line.startswith("PEAK "))[5:])
            rate = record["images_per_s"]
            runs[precision].append({
                "images_per_s": rate, "s_per_step": args.folder_batch / rate,
                "data_wait_share": record["data_wait_share"], "wall_s": wall, **peak,
            })  # fmt: skip
            print(
                f"  run {r + 1}/{args.folder_runs} {precision}: {args.folder_batch / rate:.2f} s/step",
                flush=True,
            )
    summary = {p: {k: spread([run[k] for run in rs]) for k in rs[0]} for p, rs in runs.items()}
    return {
        "space": f"psvit-tiny with num_classes {FOLDER_CLASSES}", "image_size": 224, "aug": "light",
        "loader_workers": 2, "batch_size": args.folder_batch, "steps": args.folder_steps,
        "train_images": FOLDER_CLASSES * train_per_class, "source_png_px": FOLDER_PIXELS,
        "threads": args.threads, "runs": runs, "summary": summary,
    }  # fmt: skip


# -- the report ---------------------------------------------------------------------------------------
def print_slicing(part: dict) -> None:
    s = part["summary"]
    rows = [
        {
            "model": name,
            "precision": part["precision"],
            "images/s median [min, max]": fmt(s[f"{name} images/s"]),
        }
        for name in part["images_per_s"]
    ]
    rows.append({"model": "sandwich, per subnet forward", "precision": part["precision"],
                 "images/s median [min, max]": fmt(s["sandwich images/s per subnet forward"])})  # fmt: skip
    print(format_table(rows))
    ratio = s["supernet / timm"]
    verdict = "meets" if ratio["median"] >= 0.85 else "misses"
    print(f"supernet / timm ({part['precision']}): {fmt(ratio, 3)}; {verdict} the goal >= 0.85\n")


def print_scaling(part: dict) -> None:
    rows = [
        {"run": name, "images/s median [min, max]": fmt(s["images_per_s"]),
         "data wait": pct(s["data_wait_share"]), "wall s": round(s["wall_s"]["median"], 1)}
        for name, s in part["summary"].items()
    ]  # fmt: skip
    print(format_table(rows))
    for name, eff in part["scaling_efficiency"].items():
        print(f"scaling efficiency of {name}: {fmt(eff, 3)}")
    if "processes_vs_threads" in part:
        compared, ratio = part["processes_vs_threads"]["compared"], part["processes_vs_threads"]["ratio"]
        better = compared.split(" / ")[0 if ratio["median"] > 1 else 1]
        print(f"images/s of {compared}: {fmt(ratio, 3)}; better here: {better}")
    print()


def print_folder(part: dict) -> None:
    rows = []
    for precision, s in part["summary"].items():
        row = {"precision": precision, "s/step median [min, max]": fmt(s["s_per_step"], 2),
               "images/s": round(s["images_per_s"]["median"], 1), "loader wait": pct(s["data_wait_share"]),
               "peak RSS MiB": round(s["rss_mib"]["median"])}  # fmt: skip
        if "cuda_max_allocated_mib" in s:
            row["peak CUDA MiB"] = round(s["cuda_max_allocated_mib"]["median"])
        rows.append(row)
    print(format_table(rows))
    print()


def parse_list(text: str, kind, flag: str, allowed=None) -> list:
    """'a,b,c' as a list of ``kind``, each in ``allowed`` when given."""
    expected = ", ".join(map(str, allowed)) if allowed else kind.__name__
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or (allowed is not None and any(v not in allowed for v in values)):
        raise UserError(f"{flag} {text!r}: expected a comma-separated list of {expected}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds of few steps, for a smoke run")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument(
        "--precision", default="fp32", help="comma-separated: fp32, bf16, fp16 (default fp32)"
    )
    parser.add_argument("--nproc", help="process counts of part 2 (default: 1,2 on CPU; 1,<GPUs> on CUDA)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads, parts 1 and 3"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="global batch, parts 1 and 2 (default 64)")
    parser.add_argument("--steps", type=int, help="part 1: steps per timed epoch (default: 6 CPU, all CUDA)")
    parser.add_argument("--rounds", type=int, default=6, help="part 1: rounds (default 6)")
    parser.add_argument("--process-rounds", type=int, default=3, help="part 2: rounds (default 3)")
    parser.add_argument(
        "--scaling-epochs", type=int, help="part 2: epochs, the last one timed (default: 1 CPU, 3 CUDA)"
    )
    parser.add_argument("--folder-steps", type=int, default=6, help="part 3: steps of the epoch (default 6)")
    parser.add_argument("--folder-batch", type=int, default=16, help="part 3: batch (default 16)")
    parser.add_argument("--folder-runs", type=int, default=2, help="part 3: runs per precision (default 2)")
    parser.add_argument("--parts", default="1,2,3", help="which parts to run (default 1,2,3)")
    parser.add_argument(
        "--out", type=Path, help="default: benchmarks/results/training_throughput[_quick].json"
    )
    args = parser.parse_args()
    try:
        run(args)
    except UserError as err:
        parser.error(str(err))


def run(args) -> None:
    device = resolve_device(args.device)
    precisions = parse_list(args.precision, str, "--precision", PRECISIONS)
    for precision in precisions:
        check_precision(precision, device)
    parts = parse_list(args.parts, int, "--parts", (1, 2, 3))
    if args.nproc is None:
        args.nproc = "1,2" if device.type == "cpu" else f"1,{torch.cuda.device_count()}"
    args.nproc = sorted(set(parse_list(args.nproc, int, "--nproc")))
    if args.nproc[0] != 1:
        raise UserError(f"--nproc {args.nproc}: include 1, the reference of the scaling efficiency")
    if args.scaling_epochs is None:
        args.scaling_epochs = 1 if device.type == "cpu" else 3
    if args.quick:
        args.steps, args.rounds, args.process_rounds, args.folder_steps, args.folder_runs = 2, 2, 1, 2, 1
    out = args.out or RESULTS / (
        "training_throughput_quick.json" if args.quick else "training_throughput.json"
    )
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result = {
        "benchmark": "training_throughput", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick, "machine": machine(device), "load_average_before": os.getloadavg(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "method": "variants interleaved, the order rotated each round; median and [min, max] over rounds; "
        "ratios paired by round",
    }  # fmt: skip
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"{cpu_model()}, {os.cpu_count()} logical CPUs, device {device}, torch {torch.__version__}, "
        f"{args.threads} threads; load {load}\n",
        flush=True,
    )
    if 1 in parts:
        result["slicing"] = {}
        for precision in precisions:
            print(
                f"part 1: one-subnet supernet vs timm ViT, {precision}, batch {args.batch_size}", flush=True
            )
            result["slicing"][precision] = slicing_cost(args, device, precision)
            print_slicing(result["slicing"][precision])
    with tempfile.TemporaryDirectory(prefix="vitnas-train-bench-") as name:
        tmp = Path(name)
        if 2 in parts:
            print(
                f"part 2: train-supernet psvit-digits, global batch {args.batch_size}, {precisions[0]}",
                flush=True,
            )
            result["processes"] = process_scaling(args, device, precisions[0], tmp)
            print_scaling(result["processes"])
        if 3 in parts:
            print(f"part 3: psvit-tiny supernet, 224 px, batch {args.folder_batch}, --aug light, 2 workers")
            result["imagefolder_224"] = imagefolder_224(args, device, precisions, tmp)
            print_folder(result["imagefolder_224"])
    result["load_average_after"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['wall_s']:.0f} s in all; wrote {out}")


if __name__ == "__main__":
    main()
