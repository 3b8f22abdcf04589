"""Does the supernet rank architectures as training them would? The trust number of the platform.

Picks subnets of ``psvit-digits`` spread evenly over FLOPs (fvcore counts through
``nas.hardware.flops``, on the extracted stand-alone subnet), scores each by its validation accuracy
with weights inherited from a trained supernet, trains each from scratch with one equal budget
(same epochs, recipe and seed), and reports Kendall's tau and Spearman's rho between the two
accuracies, with the table. Stand-alone trainings run two at a time, one thread each.

    python benchmarks/supernet_ranking.py                          # trains the supernet first if needed
    python benchmarks/supernet_ranking.py --checkpoint vitnas-runs/supernet/psvit-digits/supernet.safetensors
    python benchmarks/supernet_ranking.py --quick                  # smoke run: 8 subnets, 3 epochs each

Stand-alone training is the expensive half (about 10 minutes); to try a supernet change, reuse the
subnets and stand-alone accuracies of an earlier run and train only the supernet:

    python benchmarks/supernet_ranking.py --standalone-from benchmarks/results/supernet_ranking.json \
        --workspace /tmp/try --train random_subnets=4 --out /tmp/try/ranking.json

Results go to ``benchmarks/results/supernet_ranking.json`` (``--quick`` writes ``..._quick.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import torch
from scipy import stats

from nas.arch import ArchConfig, arch_from_dict
from nas.data import load_splits
from nas.evaluation import classification_accuracy
from nas.hardware.flops import flops
from nas.space import load_space
from nas.supernet import TrainConfig, VitnasSubnet, evaluate, load_checkpoint, train_supernet
from nas.supernet.checkpoint import SIDECAR, checkpoint_dir, read_meta
from nas.training.classifier import train_classifier
from nas.training.distributed import World

RESULTS = Path(__file__).parent / "results"
SPACE = "psvit-digits"


def subnet_flops(arch: ArchConfig) -> int:
    """fvcore FLOPs of the extracted stand-alone subnet at batch 1."""
    return flops(VitnasSubnet(arch).eval(), torch.randn(1, arch.in_chans, arch.image_size, arch.image_size))


def pick_spread(space, n: int, pool: int, seed: int) -> list[tuple[ArchConfig, int]]:
    """``n`` members at evenly spaced FLOPs quantiles of a random pool (largest and smallest included)."""
    rng = random.Random(seed)
    candidates = {
        a.arch_hash(): a
        for a in [space.largest(), space.smallest()] + [space.sample(rng) for _ in range(pool)]
    }
    scored = sorted(((subnet_flops(a), a) for a in candidates.values()), key=lambda t: t[0])
    picks = sorted({round(i * (len(scored) - 1) / (n - 1)) for i in range(n)})
    return [(scored[i][1], scored[i][0]) for i in picks]


def train_standalone(arch_dict: dict, epochs: int, seed: int) -> dict:
    """Train one subnet from scratch with the one training loop (no sandwich); val accuracy."""
    torch.set_num_threads(1)
    arch = arch_from_dict(arch_dict)
    splits = load_splits("digits", arch.image_size)
    config = TrainConfig(epochs=epochs, seed=seed, random_subnets=0)
    torch.manual_seed(seed)
    model = VitnasSubnet(arch)
    t0 = time.perf_counter()
    train_classifier(model, splits, config, World(), progress=False, log=lambda _: None)
    result = classification_accuracy(model, splits.val)
    return {"standalone_acc": result["accuracy"], "standalone_s": time.perf_counter() - t0}


def ensure_supernet(checkpoint: str | None, workspace: Path, config: TrainConfig) -> Path:
    if checkpoint:
        return Path(checkpoint)
    space = load_space(SPACE)
    folder = checkpoint_dir(workspace, space)
    if (folder / SIDECAR).is_file():
        meta = read_meta(folder)
        if meta["config"] != config.to_dict():
            raise SystemExit(
                f"{folder} holds a supernet trained with {meta['config']}, not {config.to_dict()}: "
                "pass another --workspace"
            )
        if meta["complete"]:
            print(f"using the supernet in {folder}")
            return folder
        print(f"resuming the supernet in {folder} at epoch {meta['epoch']}/{config.epochs}")
        return train_supernet(space, "digits", workspace, config, resume=True, progress=True).checkpoint
    print(f"training the supernet of {SPACE} ({config.epochs} epochs) into {folder}")
    return train_supernet(space, "digits", workspace, config, progress=True).checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", help="a trained psvit-digits supernet (default: train one in --workspace)"
    )
    parser.add_argument(
        "--workspace", default="vitnas-runs/bench-ranking", help="where a supernet is trained if needed"
    )
    parser.add_argument(
        "--supernet-epochs", type=int, help="when training the supernet here (default: TrainConfig's)"
    )
    parser.add_argument(
        "--train",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a TrainConfig override for the supernet trained here, e.g. random_subnets=4 (repeatable)",
    )
    parser.add_argument(
        "--standalone-from",
        metavar="JSON",
        help="reuse the subnets and stand-alone accuracies of an earlier results file (no stand-alone training)",
    )
    parser.add_argument(
        "--retrain",
        action="append",
        default=[],
        metavar="ARCH_HASH",
        help="with --standalone-from: train this subnet from scratch again (its network changed); repeatable",
    )
    parser.add_argument(
        "--out", help="results file (default: benchmarks/results/supernet_ranking[_quick].json)"
    )
    parser.add_argument("--subnets", type=int, default=10, help="subnets compared (default %(default)s)")
    parser.add_argument(
        "--epochs",
        type=int,
        default=25,
        help="stand-alone training epochs, equal for all (default %(default)s)",
    )
    parser.add_argument("--pool", type=int, default=60, help="random members to pick the FLOPs spread from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workers", type=int, default=2, help="parallel stand-alone trainings (one thread each)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 subnets, 3 epochs, small pool")
    args = parser.parse_args()
    if args.quick:
        args.subnets, args.epochs, args.pool = 8, 3, 16
    t_start = time.perf_counter()
    config = train_config(args.train, args.supernet_epochs)
    path = ensure_supernet(args.checkpoint, Path(args.workspace), config)
    net, meta = load_checkpoint(path)
    net.eval()
    space = net.space
    splits = load_splits("digits", space.spec.image_size)
    earlier = json.loads(Path(args.standalone_from).read_text()) if args.standalone_from else None
    if earlier:
        picked = [(a, subnet_flops(a)) for a in (arch_from_dict(r["arch"]) for r in earlier["rows"])]
        unknown = set(args.retrain) - {a.arch_hash() for a, _ in picked}
        if unknown:
            raise SystemExit(f"--retrain {sorted(unknown)}: not among the subnets of {args.standalone_from}")
    else:
        picked = pick_spread(space, args.subnets, args.pool, args.seed)
    rows = []
    for arch, fl in picked:
        got = evaluate(net, arch, splits.val)
        rows.append(
            {
                "arch_hash": arch.arch_hash(),
                "mflops": fl / 1e6,
                "params_k": sum(p.numel() for p in VitnasSubnet(arch, device="meta").parameters()) / 1e3,
                "inherited_acc": got.accuracy,
                "arch": arch.to_dict(),
            }
        )
    if earlier:
        for row, old in zip(rows, earlier["rows"]):
            if row["arch_hash"] not in args.retrain:
                row.update({k: old[k] for k in ("standalone_acc", "standalone_s")})
                row["standalone_from"] = old.get("standalone_from", earlier["when"])
        selection, standalone = earlier["selection"], reused_standalone(earlier, args.standalone_from)
        standalone["retrained"] = sorted(set(args.retrain) | set(standalone.get("retrained", [])))
        standalone["note"] = (
            f"stand-alone accuracies reused from {standalone['reused_from']['file']} of "
            f"{standalone['reused_from']['when']}, except the subnets in 'retrained' (trained again with "
            "the same recipe because their network changed; each row's standalone_from gives the date)"
        )
        args.epochs = standalone["epochs"]
    todo = [row for row in rows if "standalone_acc" not in row]
    if todo:
        print(
            f"training {len(todo)} subnets from scratch, {args.epochs} epochs each, {args.workers} at a time ..."
        )
        with ProcessPoolExecutor(args.workers) as pool:
            futures = [pool.submit(train_standalone, row["arch"], args.epochs, args.seed) for row in todo]
            for row, future in zip(todo, futures):
                row.update(
                    future.result(), standalone_from=datetime.now(timezone.utc).isoformat(timespec="seconds")
                )
    if not earlier:
        selection = {
            "by": "fvcore FLOPs (nas.hardware.flops) of the extracted subnet, batch 1",
            "pool": args.pool,
            "subnets": len(rows),
            "seed": args.seed,
        }
        standalone = {
            "epochs": args.epochs,
            "recipe": TrainConfig(epochs=args.epochs, random_subnets=0).to_dict(),
            "split": "val",
        }
    inherited = [r["inherited_acc"] for r in rows]
    scratch = [r["standalone_acc"] for r in rows]
    tau, rho = stats.kendalltau(inherited, scratch), stats.spearmanr(inherited, scratch)
    print(table(rows))
    print(
        f"Kendall tau {tau.statistic:.3f} (p {tau.pvalue:.3g})   Spearman rho {rho.statistic:.3f} (p {rho.pvalue:.3g})"
    )
    default_out = RESULTS / ("supernet_ranking_quick.json" if args.quick else "supernet_ranking.json")
    out = Path(args.out) if args.out else default_out
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "supernet_ranking",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "space": space.name,
        "supernet": {
            "checkpoint": str(path),
            "epoch": meta["epoch"],
            "config": meta["config"],
            "final": meta["history"][-1] if meta["history"] else None,
        },
        "selection": selection,
        "standalone": standalone,
        "kendall_tau": tau.statistic,
        "kendall_p": tau.pvalue,
        "spearman_rho": rho.statistic,
        "spearman_p": rho.pvalue,
        "rows": rows,
        "wall_s": time.perf_counter() - t_start,
    }
    out.write_text(json.dumps(report, indent=2, default=_json_default))
    print(f"wrote {out} ({report['wall_s']:.0f} s)")


def train_config(overrides: list[str], epochs: int | None) -> TrainConfig:
    """TrainConfig with ``FIELD=VALUE`` overrides, each value cast to the field's default type."""
    base, values = TrainConfig(), {} if epochs is None else {"epochs": epochs}
    for item in overrides:
        name, sep, value = item.partition("=")
        if not sep or not hasattr(base, name):
            raise SystemExit(
                f"--train {item!r}: expected FIELD=VALUE with FIELD one of {list(base.to_dict())}"
            )
        values[name] = type(getattr(base, name))(value)
    return TrainConfig(**values)


def reused_standalone(earlier: dict, source: str) -> dict:
    """The earlier run's stand-alone section, saying where and when its numbers were measured
    (the first measurement's file and date when that run reused them too)."""
    first = earlier["standalone"].get("reused_from") or {"file": source, "when": earlier["when"]}
    return {**earlier["standalone"], "reused_from": first}


def table(rows: list[dict]) -> str:
    lines = [f"{'arch':<17}{'MFLOPs':>8}{'params k':>10}{'inherited':>11}{'stand-alone':>13}"]
    for r in sorted(rows, key=lambda r: r["mflops"]):
        lines.append(
            f"{r['arch_hash']:<17}{r['mflops']:>8.2f}{r['params_k']:>10.1f}"
            f"{r['inherited_acc']:>11.4f}{r['standalone_acc']:>13.4f}"
        )
    return "\n".join(lines)


def _json_default(value):
    return None if isinstance(value, float) and math.isnan(value) else str(value)


if __name__ == "__main__":
    main()
