"""Token reduction on timm DeiT-S (random weights), CPU, 2 threads: speed against the FLOP limit, per runtime.

Variants: unpatched timm, ToMe r in {8, 13, 16} and EViT keep 0.7 at blocks 3/6/9, all patched by
`nas.ops.timm_patch`, and, with `--reference-tome PATH` (a checkout of facebookresearch/ToMe,
CC-BY-NC, added to `sys.path`, never copied here), the reference ToMe at the same r. Each variant
runs as deployed on each runtime: eager PyTorch, ONNX Runtime (CPU provider) and OpenVINO (CPU),
the last two from one ONNX export (`nas.onnx_export.export_onnx`, checked against PyTorch) through
`nas.hardware.runtimes.runtime_call`, all with the same thread count. For each batch (1, 8, 32) it
reports images/s, the speedup over unpatched on the same runtime measured in the same rounds (every
variant and runtime interleaved in each round, the order rotated every round, so that machine noise
hits all alike), GFLOPs (fvcore, attention included), the FLOP ratio that bounds the speedup, our
ToMe against the reference's on the same runtime, and (eager) the share of block time spent in
matching/merging or EViT fusion.

Each reduction also gets its token-count bound (`bound <variant>`): the unpatched model whose blocks
keep their first tokens after attention, as many as the variant leaves there, with no matching,
merging, fusion or size bookkeeping. Its speedup is the most any implementation of that schedule can
reach with this runtime and machine, and `vs_bound` (bound time / variant time, 1.0: no overhead
left) separates the cost of the reduction itself from that of running smaller matmuls.

    python benchmarks/token_ops.py                                   # full run (15-25 minutes)
    python benchmarks/token_ops.py --quick                           # a short smoke run
    python benchmarks/token_ops.py --reference-tome /tmp/ToMe        # with the reference ToMe
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
import importlib
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import timm
import torch

from nas.errors import UserError, one_line
from nas.hardware.fingerprint import cpu_model
from nas.hardware.flops import flops
from nas.ops import timm_patch

MODEL = "deit_small_patch16_224"
THREADS = 2
RUNTIMES = ("eager", "onnxruntime", "openvino")
VARIANTS = {
    "unpatched": None,
    "tome r=8": {"kind": "tome", "r": 8},
    "tome r=13": {"kind": "tome", "r": 13},
    "tome r=16": {"kind": "tome", "r": 16},
    "evit 0.7 @3/6/9": {"kind": "evit", "keep_rate": 0.7, "layers": [3, 6, 9]},
}
REFERENCE_R = (8, 13, 16)
ATOL = 1e-4  # runtime outputs against PyTorch's, as nas.hardware.runtimes accepts them
RESULTS = Path(__file__).parent / "results"


def spread(values: list[float]) -> dict[str, float]:
    """Median and the 10th/90th percentiles."""
    if len(values) == 1:
        return {"median": values[0], "p10": values[0], "p90": values[0]}
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    return {"median": statistics.median(values), "p10": deciles[0], "p90": deciles[-1]}


def load_reference(path: Path | None):
    """The reference ToMe package from a checkout at `path` (None when not asked for)."""
    if path is None:
        return None
    sys.path.insert(0, str(path))
    try:
        return importlib.import_module("tome")
    except ImportError as err:
        raise SystemExit(f"--reference-tome {path}: cannot import tome ({one_line(err)})") from None


class _SlicedBlock(torch.nn.Module):
    """A timm block that keeps its first `keep` tokens between attention and MLP, where ToMe merges
    and EViT fuses: the same token counts and matmuls as the reduction, without the reduction."""

    def __init__(self, block: torch.nn.Module, keep: int) -> None:
        super().__init__()
        self.block, self.keep = block, keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        x = x + b.drop_path1(b.ls1(b.attn(b.norm1(x))))
        x = x[:, : self.keep]
        return x + b.drop_path2(b.ls2(b.mlp(b.norm2(x))))


def block_token_counts(model: torch.nn.Module, probe: torch.Tensor) -> list[int]:
    """Tokens each block of `model` hands on, for `probe`."""
    counts = []
    hooks = [
        blk.register_forward_hook(lambda _m, _i, out: counts.append(out.shape[1])) for blk in model.blocks
    ]
    try:
        with torch.inference_mode():
            model(probe)
    finally:
        for h in hooks:
            h.remove()
    return counts


def token_count_bound(base: torch.nn.Module, counts: list[int]) -> torch.nn.Module:
    """A copy of `base` whose blocks hand on `counts` tokens by slicing (see `_SlicedBlock`)."""
    model = copy.deepcopy(base)
    model.blocks = torch.nn.Sequential(*(_SlicedBlock(b, k) for b, k in zip(model.blocks, counts)))
    return model


def build(tome) -> tuple[dict[str, torch.nn.Module], dict[str, object]]:
    """The models and their schedules (`{"reference_tome_r": r}` for the reference's, `{"bound_of":
    variant, "tokens": [...]}` for a token-count bound)."""
    torch.manual_seed(0)
    base = timm.create_model(MODEL, pretrained=False).eval()
    probe = torch.zeros(1, 3, 224, 224)
    models, schedules = {}, {}
    for name, schedule in VARIANTS.items():
        model = copy.deepcopy(base)
        models[name] = model if schedule is None else timm_patch.apply(model, schedule)
        schedules[name] = schedule
    for name, schedule in VARIANTS.items():
        if schedule is not None:
            counts = block_token_counts(models[name], probe)
            models[f"bound {name}"] = token_count_bound(base, counts)
            schedules[f"bound {name}"] = {"bound_of": name, "tokens": counts}
    if tome is not None:
        for r in REFERENCE_R:
            model = copy.deepcopy(base)
            tome.patch.timm(model)
            model.r = r
            models[f"reference tome r={r}"] = model
            schedules[f"reference tome r={r}"] = {"reference_tome_r": r}
    return models, schedules


def tokens_out(model: torch.nn.Module, probe: torch.Tensor) -> int:
    with torch.inference_mode():
        if hasattr(model, "_tome_info"):  # the reference: its forward_features alone cannot run
            model(probe)
            size = model._tome_info["size"]
            return probe.shape[1] if size is None else size.shape[1]
        return model.forward_features(probe).shape[1]


def export_all(models: dict, folder: Path, runtimes: list[str]) -> dict[str, dict]:
    """ONNX file (or the one-line reason it failed) per variant, when an exported runtime is asked for."""
    if not any(rt != "eager" for rt in runtimes):
        return {}
    from nas.onnx_export import export_onnx

    exported = {}
    for name, model in models.items():
        start = time.perf_counter()
        try:
            check = export_onnx(
                model,
                folder / f"{name.replace(' ', '_').replace('/', '-')}.onnx",
                (3, 224, 224),
                threads=THREADS,
            )
            exported[name] = {"path": check.path, "max_abs_diff_onnxruntime": check.max_abs_diff}
        except UserError as err:
            exported[name] = {"error": one_line(err)}
        exported[name]["export_s"] = round(time.perf_counter() - start, 1)
        print(
            f"  export {name}: {exported[name].get('error', 'ok')} ({exported[name]['export_s']} s)",
            flush=True,
        )
    return exported


def prepare_calls(models, exported, runtimes, images) -> tuple[dict, dict]:
    """`{(variant, runtime): call}` for one batch, and `{(variant, runtime): note}` for those that
    cannot run (export failed, runtime missing, outputs off)."""
    from nas.hardware.runtimes import runtime_call

    calls, notes = {}, {}
    with torch.inference_mode():
        expected = {name: model(images).float().numpy() for name, model in models.items()}
    inputs = images.numpy()
    for name, model in models.items():
        for rt in runtimes:
            if rt == "eager":
                calls[name, rt] = lambda model=model: model(images)
                continue
            info = exported.get(name, {})
            if "path" not in info:
                notes[name, rt] = info.get("error", "not exported")
                continue
            try:
                call = runtime_call(info["path"], inputs, rt, THREADS, torch.device("cpu"))
                diff = float(np.abs(np.asarray(call()[0]) - expected[name]).max())
            except Exception as err:  # a runtime that is not installed or cannot compile the graph
                notes[name, rt] = f"{rt}: {one_line(err)}"[:300]
                continue
            if not diff <= ATOL:
                notes[name, rt] = f"{rt}: outputs differ from PyTorch's by {diff:.3g} (> {ATOL:g})"
                continue
            calls[name, rt] = call
    return calls, notes


def time_rounds(calls: dict, rounds: int, iters: int, warmup: int) -> dict[tuple, list[float]]:
    """Seconds per forward, per (variant, runtime), per round; the order rotates each round."""
    keys = list(calls)
    with torch.inference_mode():
        for _ in range(warmup):
            for key in keys:
                calls[key]()
        times = {key: [] for key in keys}
        for r in range(rounds):
            for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
                start = time.perf_counter()
                for _ in range(iters):
                    calls[key]()
                times[key].append((time.perf_counter() - start) / iters)
    return times


class _Timed:
    """Wraps a function and sums the wall time spent in it."""

    def __init__(self, fn) -> None:
        self.fn, self.total = fn, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.total += time.perf_counter() - start


def reduction_share(model: torch.nn.Module, images: torch.Tensor, forwards: int, tome) -> float:
    """Median over forwards of (time in ToMe matching+merging or EViT fusion) / (time in blocks).

    Ours: timm_patch's `_tome_step`/`_evit_step` (keys mean, matching, merge, sizes). The reference:
    its `bipartite_soft_matching`, `merge_wavg` and `merge_source` as its block calls them (its keys
    mean is inside its attention, so its share is slightly understated). Timed with perf_counter
    rather than torch.profiler, whose per-op overhead distorts small ops on a busy machine.
    """
    if hasattr(model, "_tome_info"):
        # the module: the attribute `tome.patch.timm` is its apply function
        module = importlib.import_module("tome.patch.timm")
        names = ("bipartite_soft_matching", "merge_wavg", "merge_source")
    else:
        module, names = timm_patch, ("_tome_step", "_evit_step")
    originals = {name: getattr(module, name) for name in names}
    timers = {name: _Timed(fn) for name, fn in originals.items()}
    block_time, starts = [0.0], []

    def enter(*_) -> None:
        starts.append(time.perf_counter())

    def leave(*_) -> None:  # must return None, or it would replace the block's output
        block_time[0] += time.perf_counter() - starts.pop()

    hooks = [
        h
        for blk in model.blocks
        for h in (blk.register_forward_pre_hook(enter), blk.register_forward_hook(leave))
    ]
    shares = []
    try:
        for name, timer in timers.items():
            setattr(module, name, timer)
        with torch.inference_mode():
            for _ in range(forwards):
                for timer in timers.values():
                    timer.total = 0.0
                block_time[0] = 0.0
                model(images)
                shares.append(sum(t.total for t in timers.values()) / block_time[0])
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)
        for h in hooks:
            h.remove()
    return statistics.median(shares)


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(THREADS)
    load_start = os.getloadavg()
    tome = load_reference(args.reference_tome)
    models, schedules = build(tome)
    probe = torch.zeros(1, 3, 224, 224)
    gflops = {name: flops(model, probe) / 1e9 for name, model in models.items()}
    tokens = {name: tokens_out(model, probe) for name, model in models.items()}
    versions = {"torch": torch.__version__, "timm": timm.__version__}
    for rt, module in (("onnxruntime", "onnxruntime"), ("openvino", "openvino")):
        try:
            versions[rt] = importlib.import_module(module).__version__
        except ImportError:
            versions[rt] = None
    result = {
        "benchmark": "token_ops",
        "model": f"{MODEL} (random weights)",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model(),
            "logical_cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            **versions,
            "python": platform.python_version(),
            "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
            "load_average_at_start": load_start,
        },
        "method": "every (variant, runtime) interleaved in rotating order each round; speedup = per-round ratio "
        "to unpatched on the same runtime; vs_reference = per-round ratio reference/ours (>1: ours faster); "
        "vs_bound = per-round ratio bound/variant (1: no reduction overhead); "
        "median and p10/p90 over rounds; eager under inference_mode; ONNX Runtime CPU provider and OpenVINO CPU "
        f"({THREADS} threads each) run one ONNX export per variant; random 224x224 inputs",
        "reference_tome": None if tome is None else str(args.reference_tome),
        "variants": {
            name: {
                "schedule": schedules[name],
                "gflops_per_image": round(gflops[name], 3),
                "tokens_out": tokens[name],
                "flop_ratio": round(gflops["unpatched"] / gflops[name], 3),
            }
            for name in models
        },
        "batches": {},
    }
    with tempfile.TemporaryDirectory(prefix="vitnas-token-ops-") as folder:
        print(f"exporting {len(models)} variants to ONNX ...", flush=True)
        exported = export_all(models, Path(folder), args.runtimes)
        result["exports"] = {
            name: {k: v for k, v in info.items() if k != "path"} for name, info in exported.items()
        }
        for batch in args.batches:
            rounds, iters = (args.rounds_b1, args.iters_b1) if batch == 1 else (args.rounds, 1)
            images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
            calls, notes = prepare_calls(models, exported, args.runtimes, images)
            times = time_rounds(calls, rounds, iters, warmup=2 if batch > 1 else 5)
            rows = {}
            for rt in args.runtimes:
                base = times.get(("unpatched", rt))
                rows[rt] = {}
                for name in models:
                    if (name, rt) not in times:
                        rows[rt][name] = {"error": notes.get((name, rt), "not run")}
                        continue
                    own = times[name, rt]
                    row = {"images_per_s": spread([batch / t for t in own])}
                    if base is not None:
                        speedup = spread([a / b for a, b in zip(base, own)])
                        row["speedup"] = speedup
                        row["speedup_over_flop_ratio"] = round(
                            speedup["median"] / result["variants"][name]["flop_ratio"], 3
                        )
                    reference = _reference_of(name, tome)
                    if reference is not None and (reference, rt) in times:
                        row["vs_reference"] = spread([a / b for a, b in zip(times[reference, rt], own)])
                    bound = _bound_of(name, models)
                    if bound is not None and (bound, rt) in times:
                        row["vs_bound"] = spread([a / b for a, b in zip(times[bound, rt], own)])
                    if rt == "eager" and _reduces(schedules[name]):
                        row["reduction_share_of_block_time"] = round(
                            reduction_share(
                                models[name], images, args.share_forwards if batch == 1 else 3, tome
                            ),
                            4,
                        )
                    rows[rt][name] = row
            result["batches"][str(batch)] = {"rounds": rounds, "iters_per_round": iters, "runtimes": rows}
            print_table(batch, rows, result["variants"])
            del calls
    result["machine"]["load_average_at_end"] = os.getloadavg()
    return result


def _reference_of(name: str, tome) -> str | None:
    if tome is None or not name.startswith("tome r="):
        return None
    return f"reference {name}"


def _bound_of(name: str, models: dict) -> str | None:
    """The token-count bound of a variant (the reference ToMe's is ours at the same r)."""
    bound = f"bound {name.removeprefix('reference ')}"
    return bound if bound in models and bound != name else None


def _reduces(schedule: object) -> bool:
    """Whether a variant runs a token reduction whose share of block time can be measured."""
    return isinstance(schedule, dict) and "bound_of" not in schedule


def print_table(batch: int, rows: dict, variants: dict) -> None:
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"\n{MODEL}, batch {batch}, {THREADS} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, load {load}"
    )
    head = (
        f"{'variant':<22}{'runtime':<13}{'GFLOPs':>7}{'tokens':>7}{'img/s (p10-p90)':>23}"
        f"{'speedup (p10-p90)':>22}{'FLOP ratio':>11}{'sp/FLOP':>8}{'vs ref (p10-p90)':>21}{'vs bound':>9}"
        f"{'reduce %':>9}"
    )
    print(head)
    print("-" * len(head))
    for name, info in variants.items():
        for rt, by_name in rows.items():
            r = by_name[name]
            lead = f"{name:<22}{rt:<13}{info['gflops_per_image']:>7.2f}{info['tokens_out']:>7}"
            if "error" in r:
                print(f"{lead}  {r['error'][:110]}")
                continue
            ips, sp, vs, vb = r["images_per_s"], r.get("speedup"), r.get("vs_reference"), r.get("vs_bound")
            share = r.get("reduction_share_of_block_time")
            cells = [
                f"{ips['median']:.1f} ({ips['p10']:.1f}-{ips['p90']:.1f})".rjust(23),
                (f"{sp['median']:.2f}x ({sp['p10']:.2f}-{sp['p90']:.2f})" if sp else "").rjust(22),
                f"{info['flop_ratio']:.2f}x".rjust(11),
                (f"{r['speedup_over_flop_ratio']:.2f}" if sp else "").rjust(8),
                (f"{vs['median']:.2f}x ({vs['p10']:.2f}-{vs['p90']:.2f})" if vs else "").rjust(21),
                (f"{vb['median']:.2f}" if vb else "").rjust(9),
                ("" if share is None else f"{100 * share:.1f}").rjust(9),
            ]
            print(lead + "".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="few rounds, for a smoke run (writes token_ops_quick.json)"
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    parser.add_argument("--rounds", type=int, default=8, help="rounds at batch > 1 (one forward each)")
    parser.add_argument("--rounds-b1", type=int, default=20, help="rounds at batch 1")
    parser.add_argument("--iters-b1", type=int, default=3, help="forwards per measurement at batch 1")
    parser.add_argument(
        "--share-forwards", type=int, default=9, help="forwards timed for the reduction share"
    )
    parser.add_argument(
        "--reference-tome",
        type=Path,
        default=None,
        metavar="PATH",
        help="a checkout of facebookresearch/ToMe (CC-BY-NC: not part of vitnas) to add as variants",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="default: results/token_ops.json (quick: token_ops_quick.json)"
    )
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.rounds_b1, args.iters_b1, args.share_forwards = 2, 3, 1, 3
    out = args.out or RESULTS / ("token_ops_quick.json" if args.quick else "token_ops.json")
    result = run(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
