"""Token reduction on timm DeiT-S (random weights), CPU, 2 threads: speed against the FLOP limit.

Variants: unpatched timm, ToMe r in {8, 13, 16} and EViT keep 0.7 at blocks 3/6/9, all patched
by `nas.ops.timm_patch`. For batch 1 and 32 it reports images/s, the speedup over unpatched measured
in the same rounds (variants interleaved, the order rotated every round, so that machine noise hits
all alike), GFLOPs (fvcore, attention included), the FLOP ratio that bounds the speedup, and the
share of block time spent in ToMe matching/merging or EViT fusion.

    python benchmarks/token_ops.py            # full run (a few minutes)
    python benchmarks/token_ops.py --quick    # a short smoke run
"""

from __future__ import annotations

import os

# On a shared machine, spinning OpenMP workers (the default ACTIVE policy) steal the cores from the
# main thread between parallel ops; that taxes the variants with more small ops far beyond their
# compute. Passive waiting measures compute instead. Export OMP_WAIT_POLICY=ACTIVE to override.
# (Set before torch is imported: OpenMP reads it once.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import json
import platform
import statistics
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import timm
import torch

from nas.hardware.fingerprint import cpu_model
from nas.hardware.flops import flops
from nas.ops import timm_patch

MODEL = "deit_small_patch16_224"
THREADS = 2
VARIANTS = {
    "unpatched": None,
    "tome r=8": {"kind": "tome", "r": 8},
    "tome r=13": {"kind": "tome", "r": 13},
    "tome r=16": {"kind": "tome", "r": 16},
    "evit 0.7 @3/6/9": {"kind": "evit", "keep_rate": 0.7, "layers": [3, 6, 9]},
}
RESULT = Path(__file__).parent / "results" / "token_ops.json"


def spread(values: list[float]) -> dict[str, float]:
    """Median and the 10th/90th percentiles."""
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    return {"median": statistics.median(values), "p10": deciles[0], "p90": deciles[-1]}


def build() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    base = timm.create_model(MODEL, pretrained=False).eval()
    models = {}
    for name, schedule in VARIANTS.items():
        model = copy.deepcopy(base)
        models[name] = model if schedule is None else timm_patch.apply(model, schedule)
    return models


def time_rounds(
    models: dict, images: torch.Tensor, rounds: int, iters: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds per forward, per variant, per round; the variant order rotates each round."""
    names = list(models)
    with torch.inference_mode():
        for _ in range(warmup):
            for name in names:
                models[name](images)
        times = {name: [] for name in names}
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                start = time.perf_counter()
                for _ in range(iters):
                    models[name](images)
                times[name].append((time.perf_counter() - start) / iters)
    return times


class SpanTimer:
    """Sums wall time inside `with timer(label)` blocks; stands in for timm_patch's `record_function`."""

    def __init__(self) -> None:
        self.total = 0.0

    @contextmanager
    def __call__(self, _label: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.total += time.perf_counter() - start


def reduction_share(model: torch.nn.Module, images: torch.Tensor, forwards: int) -> float:
    """Median over forwards of (time in ToMe matching+merging or EViT fusion) / (time in blocks).

    The reduction regions are the ones timm_patch labels for the profiler; timing them with
    perf_counter instead of torch.profiler avoids its per-op overhead on a busy machine.
    """
    reduce, blocks = SpanTimer(), SpanTimer()  # blocks: timed by hooks, not as a `with` region
    starts = []

    def enter(*_) -> None:
        starts.append(time.perf_counter())

    def leave(*_) -> None:  # must return None, or it would replace the block's output
        blocks.total += time.perf_counter() - starts.pop()

    hooks = [
        h
        for blk in model.blocks
        for h in (blk.register_forward_pre_hook(enter), blk.register_forward_hook(leave))
    ]
    shares = []
    original, timm_patch.record_function = timm_patch.record_function, reduce
    try:
        with torch.inference_mode():
            for _ in range(forwards):
                reduce.total = blocks.total = 0.0
                model(images)
                shares.append(reduce.total / blocks.total)
    finally:
        timm_patch.record_function = original
        for h in hooks:
            h.remove()
    return statistics.median(shares)


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(THREADS)
    models = build()
    probe = torch.zeros(1, 3, 224, 224)
    gflops = {name: flops(model, probe) / 1e9 for name, model in models.items()}
    tokens = {}
    with torch.inference_mode():
        for name, model in models.items():
            tokens[name] = model.forward_features(probe).shape[1]
    result = {
        "benchmark": "token_ops",
        "model": f"{MODEL} (random weights)",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model(),
            "logical_cpus": torch.multiprocessing.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "python": platform.python_version(),
            "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
            "load_average_at_start": os.getloadavg(),
        },
        "method": "variants interleaved in rotating order each round; speedup = per-round ratio to unpatched; "
        "median and p10/p90 over rounds; inference_mode; random 224x224 inputs",
        "batches": {},
    }
    for batch in args.batches:
        rounds, iters = (args.rounds_b1, args.iters_b1) if batch == 1 else (args.rounds, 1)
        images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
        times = time_rounds(models, images, rounds, iters, warmup=2 if batch > 1 else 5)
        rows = {}
        for name, model in models.items():
            ratios = [a / b for a, b in zip(times["unpatched"], times[name])]
            flop_ratio = gflops["unpatched"] / gflops[name]
            speedup = spread(ratios)
            rows[name] = {
                "schedule": VARIANTS[name],
                "gflops_per_image": round(gflops[name], 3),
                "tokens_out": tokens[name],
                "flop_ratio": round(flop_ratio, 3),
                "images_per_s": spread([batch / t for t in times[name]]),
                "speedup": speedup,
                "speedup_over_flop_ratio": round(speedup["median"] / flop_ratio, 3),
                "reduction_share_of_block_time": None
                if VARIANTS[name] is None
                else round(reduction_share(model, images, args.share_forwards if batch == 1 else 3), 4),
            }
        result["batches"][str(batch)] = {"rounds": rounds, "iters_per_round": iters, "variants": rows}
        print_table(batch, rows)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    return result


def print_table(batch: int, rows: dict) -> None:
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"\n{MODEL}, batch {batch}, {THREADS} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, load {load}"
    )
    head = f"{'variant':<18}{'GFLOPs':>8}{'tokens':>8}{'img/s (p10-p90)':>24}{'speedup (p10-p90)':>22}{'FLOP ratio':>12}{'sp/FLOP':>9}{'reduce %':>10}"
    print(head)
    print("-" * len(head))
    for name, r in rows.items():
        ips, sp = r["images_per_s"], r["speedup"]
        share = (
            ""
            if r["reduction_share_of_block_time"] is None
            else f"{100 * r['reduction_share_of_block_time']:.1f}"
        )
        print(
            f"{name:<18}{r['gflops_per_image']:>8.2f}{r['tokens_out']:>8}"
            f"{ips['median']:>9.1f} ({ips['p10']:.1f}-{ips['p90']:.1f}){'':>1}"
            f"{sp['median']:>9.2f}x ({sp['p10']:.2f}-{sp['p90']:.2f})"
            f"{r['flop_ratio']:>11.2f}x{r['speedup_over_flop_ratio']:>9.2f}{share:>10}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds, for a smoke run")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=8, help="rounds at batch > 1 (one forward each)")
    parser.add_argument("--rounds-b1", type=int, default=20, help="rounds at batch 1")
    parser.add_argument("--iters-b1", type=int, default=3, help="forwards per measurement at batch 1")
    parser.add_argument(
        "--share-forwards", type=int, default=9, help="forwards timed for the reduction share"
    )
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.rounds_b1, args.iters_b1, args.share_forwards = 3, 5, 2, 3
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
