"""Latency as deployed: eager PyTorch, ONNX Runtime and OpenVINO on the same models, interleaved.

Models: 30 seeded members of ``psvit-digits`` (random weights) and every schedule of
``deit-reduction`` (DeiT-S at 224 px patched with ToMe/EViT, random weights). Each model is exported
to ONNX once (``nas.onnx_export``, outputs checked against PyTorch), then timed in rounds: each
round runs the three backends in a rotating order, ``--iters`` forwards each, the same input, one
thread budget. Reported per model and backend: the median over rounds and its p10/p90.

Then, per model set: per-backend median latency over the models, the Kendall tau and Spearman rho
between the backends' latencies, and the share of model pairs that eager orders the other way than
the deployed runtime does (what a search ranking by eager latency gets wrong).

    python benchmarks/runtimes.py            # full run
    python benchmarks/runtimes.py --quick    # 6 psvit subnets, 4 schedules, few rounds

Writes ``benchmarks/results/runtimes.json``.
"""

from __future__ import annotations

import os

# as in token_ops.py: on a shared machine spinning OpenMP workers fight other processes for the
# cores, which taxes eager PyTorch (many small parallel regions) far beyond its compute; passive
# waiting measures compute. Set before torch is imported: OpenMP reads it once.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import itertools
import json
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from scipy import stats

from nas.errors import UserError
from nas.families import family_of
from nas.hardware.fingerprint import cpu_model
from nas.hardware.runtimes import runtime_call, runtime_version
from nas.onnx_export import export_onnx
from nas.space import load_space

BACKENDS = ("eager", "onnxruntime", "openvino")
RESULT = Path(__file__).parent / "results" / "runtimes.json"


def spread(values: list[float]) -> dict[str, float]:
    deciles = statistics.quantiles(values, n=10, method="inclusive") if len(values) > 1 else values * 9
    return {"median": statistics.median(values), "p10": deciles[0], "p90": deciles[-1]}


def members(space_name: str, n: int | None) -> list:
    """``n`` distinct members drawn with seeds 0, 1, ... (every member when ``n`` is None)."""
    space = load_space(space_name)
    want = min(space.count(), n or space.count())
    found, seed = {}, 0
    while len(found) < want and seed < 100_000:
        arch = space.sample(seed)
        found.setdefault(arch.arch_hash(), arch)
        seed += 1
    return list(found.values())


def time_model(arch, threads: int, rounds: int, iters: int, folder: Path) -> dict:
    """Per backend, milliseconds per forward in each round (backends interleaved, order rotated)."""
    family = family_of(arch)
    torch.manual_seed(0)
    model = family.build(arch).eval()
    chw = family.input_chw(arch)
    x = torch.randn(1, *chw, generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    check = export_onnx(model, folder / f"{arch.arch_hash()}.onnx", chw, threads=threads)
    export_s = time.perf_counter() - t0
    inputs = x.numpy()
    calls = {"eager": lambda: model(x)}
    for backend in BACKENDS[1:]:
        calls[backend] = runtime_call(check.path, inputs, backend, threads, torch.device("cpu"))
    times: dict[str, list[float]] = {b: [] for b in BACKENDS}
    with torch.inference_mode():
        for call in calls.values():  # warm-up: first calls allocate and plan
            for _ in range(3):
                call()
        for r in range(rounds):
            for backend in BACKENDS[r % 3 :] + BACKENDS[: r % 3]:
                start = time.perf_counter_ns()
                for _ in range(iters):
                    calls[backend]()
                times[backend].append((time.perf_counter_ns() - start) / iters / 1e6)
    check.path.unlink(missing_ok=True)
    return {
        "arch_hash": arch.arch_hash(),
        "export_s": round(export_s, 2),
        "onnx_max_abs_diff": check.max_abs_diff,
        "ms": {b: spread(v) for b, v in times.items()},
    }


def agreement(rows: list[dict]) -> dict:
    """Rank agreement of the backends' median latencies over the models of one set."""
    med = {b: [r["ms"][b]["median"] for r in rows] for b in BACKENDS}
    out = {"median_ms": {b: statistics.median(v) for b, v in med.items()}}
    for a, b in itertools.combinations(BACKENDS, 2):
        tau = stats.kendalltau(med[a], med[b]).statistic
        rho = stats.spearmanr(med[a], med[b]).statistic
        pairs = list(itertools.combinations(range(len(rows)), 2))
        flipped = sum((med[a][i] - med[a][j]) * (med[b][i] - med[b][j]) < 0 for i, j in pairs)
        out[f"{a}_vs_{b}"] = {"kendall_tau": tau, "spearman": rho, "pairs_ordered_otherwise": flipped / len(pairs)}
    return out


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    result = {
        "benchmark": "runtimes",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
            "cpu": cpu_model(), "logical_cpus": os.cpu_count(), "threads": args.threads,
            "torch": torch.__version__, "onnxruntime": runtime_version("onnxruntime"),
            "openvino": runtime_version("openvino"), "python": platform.python_version(),
            "load_average_at_start": os.getloadavg(),
        },  # fmt: skip
        "method": "one ONNX export per model (outputs checked vs PyTorch, 1e-4); per round the three backends "
        "in rotating order, `iters` forwards each, batch 1, same input; median and p10/p90 over rounds",
        "sets": {},
    }
    sets = {"psvit-digits": members("psvit-digits", args.subnets), "deit-reduction": members("deit-reduction", args.schedules)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, archs in sets.items():
            rows, failed = [], []
            for i, arch in enumerate(archs):
                rounds, iters = (args.rounds, args.iters) if name == "psvit-digits" else (args.rounds_deit, 1)
                try:
                    rows.append(time_model(arch, args.threads, rounds, iters, Path(tmp)))
                except UserError as err:  # the export's check failed: recorded, left out of the comparison
                    failed.append({"arch_hash": arch.arch_hash(), "error": str(err)})
                    print(f"{name} {i + 1}/{len(archs)} {arch.arch_hash()}  not compared: {err}", flush=True)
                    continue
                m = rows[-1]["ms"]
                print(f"{name} {i + 1}/{len(archs)} {arch.arch_hash()}  " + "  ".join(
                    f"{b} {m[b]['median']:.3f} ms" for b in BACKENDS), flush=True)  # fmt: skip
            result["sets"][name] = {"models": rows, "not_compared": failed, "agreement": agreement(rows)}
            print_table(name, result["sets"][name]["agreement"])
    result["machine"]["load_average_at_end"] = os.getloadavg()
    return result


def print_table(name: str, agree: dict) -> None:
    print(f"\n{name}: median latency over models (ms): " + ", ".join(
        f"{b} {v:.3f}" for b, v in agree["median_ms"].items()))  # fmt: skip
    print(f"{'pair':<26}{'kendall tau':>12}{'spearman':>10}{'pairs flipped':>15}")
    for key, v in agree.items():
        if key != "median_ms":
            print(f"{key:<26}{v['kendall_tau']:>12.3f}{v['spearman']:>10.3f}{v['pairs_ordered_otherwise']:>15.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--subnets", type=int, default=30)
    parser.add_argument("--schedules", type=int, default=None, help="deit-reduction members (default: all)")
    parser.add_argument("--rounds", type=int, default=15, help="rounds per psvit subnet")
    parser.add_argument("--iters", type=int, default=5, help="forwards per backend per round (psvit)")
    parser.add_argument("--rounds-deit", type=int, default=7, help="rounds per deit schedule (one forward each)")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    if args.quick:
        args.subnets, args.schedules, args.rounds, args.rounds_deit = 6, 4, 5, 3
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
