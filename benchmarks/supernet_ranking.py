"""Does the supernet rank architectures as training them would? The trust number of the platform, and
which supernet training levers raise it.

Method (all of it through ``vitnas rank-check``, the command users run on their own supernet):

- supernets: psvit-digits trained with each lever below (every other setting as before this benchmark:
  80 epochs, 2 random subnets a step, uniform sampling, in-place distillation from the largest), for
  supernet seeds 0 and 1; trained two at a time, one thread each, resumable;
- subnets: 20 members spread evenly over FLOPs and covering every attention, pooling and reduction kind
  (``nas.ranking.picking``, seed 0), the same for every supernet;
- stand-alone accuracy: each subnet trained from scratch with the one training loop, 25 epochs, the
  supernet's hyperparameters, 2 seeds; seed r trains on 4 of 5 stratified folds of digits' train+val pool
  and is tested on fold r (611 held-out images per subnet instead of the 269 validation images; the
  test split is never used). Cached by (arch, data, fold, recipe, seed): every lever reuses them;
- inherited accuracy: on the validation split, as search scores candidates;
- Kendall tau, Spearman rho, top-5 overlap, with 90 % percentile-bootstrap intervals over subnets,
  stand-alone seeds and test images (``nas.ranking.stats``).

    python benchmarks/supernet_ranking.py                              # every lever, supernet seeds 0 and 1
    python benchmarks/supernet_ranking.py --levers baseline,fair --supernet-seeds 0
    python benchmarks/supernet_ranking.py --quick                      # smoke run, ..._quick.json

Run it under ``nice``; each supernet and rank-check resumes where an interrupted run stopped.
Results go to ``benchmarks/results/supernet_ranking.json`` (``--quick``: ``..._quick.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SPACE = "psvit-digits"
#: the sandwich settings before this benchmark: every lever changes one thing from here (its winner,
#: ``more-subnets``, has since become ``TrainConfig``'s default)
BASE = dict(
    epochs=80, random_subnets=2, sampling="uniform", distill="largest", progressive_epochs=0.0,
    smallest_kinds="random", subnet_label_weight=1.0,
)  # fmt: skip
FEW_SHOT_CHOICE = "s1.pool"  # the sub-supernets of a few-shot split: one per stage-1 pooling kind


def levers(epochs: int) -> dict[str, tuple[dict, str]]:
    """name -> (TrainConfig changes from BASE, what it tries); ``epochs``: BASE's epochs here."""
    return {
        "baseline": ({}, "BASE: uniform sampling, 2 random subnets a step, distillation from the largest"),
        "fair": (
            {"sampling": "fair"},
            "fair sampling: each choice's options dealt from a shuffled deck (FairNAS)",
        ),
        "more-subnets": ({"random_subnets": 4}, "4 random subnets a step instead of 2"),
        "six-subnets": ({"random_subnets": 6}, "6 random subnets a step instead of 2"),
        "longer": ({"epochs": 2 * epochs}, f"{2 * epochs} epochs instead of {epochs}"),
        "no-distill": ({"distill": "none"}, "no in-place distillation: every subnet learns from labels"),
        "progressive": (
            {"progressive_epochs": epochs / 4},
            f"progressive shrinking: sizes open from the largest down over the first {epochs // 4} epochs (OFA)",
        ),
        "few-shot": (
            {"few_shot": FEW_SHOT_CHOICE},
            f"few-shot split by {FEW_SHOT_CHOICE}: the whole space for {epochs // 2} epochs, then one sub-supernet "
            f"per kind for the other {epochs - epochs // 2} (Zhao et al. 2021)",
        ),
        "few-shot+more-subnets": (
            {"few_shot": FEW_SHOT_CHOICE, "random_subnets": 4},
            f"few-shot split by {FEW_SHOT_CHOICE} and 4 random subnets a step",
        ),
        "fair+more-subnets": (
            {"sampling": "fair", "random_subnets": 4},
            "fair sampling and 4 random subnets",
        ),
        "fair+longer": ({"sampling": "fair", "epochs": 2 * epochs}, f"fair sampling and {2 * epochs} epochs"),
    }


# -- supernets ------------------------------------------------------------------------------------
def train_lever(name: str, changes: dict, seed: int, epochs: int, ws: str) -> dict:
    """Train (or resume, or reuse) one lever's supernet; returns its checkpoints and cost."""
    import torch

    from nas.space import load_space
    from nas.supernet import TrainConfig, train_supernet
    from nas.supernet.checkpoint import SIDECAR, checkpoint_dir, fork_checkpoint, read_meta
    from nas.supernet.sampling import parse_pin

    torch.set_num_threads(1)
    space = load_space(SPACE)
    changes = dict(changes)
    few_shot = changes.pop("few_shot", None)
    config = TrainConfig(**{**BASE, "epochs": epochs, **changes, "seed": seed})
    root = Path(ws) / "supernets" / f"{name}-s{seed}"

    def run(workspace: Path, cfg, stop_after=None) -> Path:
        folder = checkpoint_dir(workspace, space)
        done = (folder / SIDECAR).is_file() and read_meta(folder)["epoch"] >= (stop_after or cfg.epochs)
        if not done:
            resume = (folder / SIDECAR).is_file()
            train_supernet(space, "digits", workspace, cfg, resume=resume, progress=False,
                           stop_after=stop_after, log=lambda *_: None)  # fmt: skip
        return folder

    if few_shot is None:
        folders = [run(root, config)]
    else:
        shared = run(root / "shared", config, stop_after=config.epochs // 2)
        stage = int(few_shot[1])
        folders = []
        for kind in getattr(space.spec.stages[stage], few_shot.split(".")[1]):
            pin = f"{few_shot}={kind}"
            parse_pin(pin, space)
            sub = root / f"pin-{kind}"
            if not (checkpoint_dir(sub, space) / SIDECAR).is_file():
                fork_checkpoint(shared, checkpoint_dir(sub, space), pin=pin)
            folders.append(run(sub, config.replace(pin=pin)))
    metas = [read_meta(f) for f in folders]
    shared_epochs = config.epochs // 2 if few_shot else 0
    per_step = 2 + config.random_subnets
    passes = sum((m["epoch"] - shared_epochs) * per_step for m in metas) + shared_epochs * per_step
    seconds = sum(r["seconds"] for m in metas for r in m["history"][shared_epochs:])
    if few_shot:
        seconds += sum(r["seconds"] for r in metas[0]["history"][:shared_epochs])
    return {
        "lever": name, "seed": seed, "checkpoints": [str(f) for f in folders], "config": metas[0]["config"],
        "subnet_passes_per_image": passes, "train_s": seconds,
        "final": [{k: m["history"][-1][k] for k in ("val_acc_largest", "val_acc_smallest")} for m in metas],
    }  # fmt: skip


def rank_check(checkpoints: list[str], args, ws: Path) -> dict:
    """``vitnas rank-check ... --json`` on a supernet (or a few-shot split's sub-supernets)."""
    cmd = [sys.executable, "-m", "nas", "rank-check"]
    for c in checkpoints:
        cmd += ["--supernet", c]
    cmd += ["--subnets", str(args.subnets), "--epochs", str(args.epochs), "--seeds", str(args.seeds),
            "--workers", str(args.parallel), "--workspace", str(ws), "--cache", str(ws / "standalone"),
            "--json", "--quiet"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


# -- the report -----------------------------------------------------------------------------------
def interval(d: dict) -> str:
    return f"{d['value']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}]"


def table(entries: list[dict], base_passes: int) -> str:
    head = (f"{'lever':<18}{'seed':>5}  {'Kendall tau [90 %]':<22}{'Spearman rho':<22}{'top-5 overlap':<22}"
            f"{'hit':>4}{'seeds tau':>10}{'largest':>9}{'smallest':>9}{'cost':>6}{'train min':>10}")  # fmt: skip
    lines = [head]
    for e in entries:
        r = e["ranking"]
        final = e["final"][0]
        lines.append(
            f"{e['lever']:<18}{e['seed']:>5}  {interval(r['kendall_tau']):<22}{interval(r['spearman_rho']):<22}"
            f"{interval(r['top_k']['overlap']):<22}{'yes' if r['top_k']['hit'] else 'no':>4}"
            f"{r['seed_agreement_tau']:>10.3f}{final['val_acc_largest']:>9.3f}{final['val_acc_smallest']:>9.3f}"
            f"{e['subnet_passes_per_image'] / base_passes:>5.1f}x{e['train_s'] / 60:>10.1f}"
        )
    return "\n".join(lines)


def summary(entries: list[dict], names: list[str]) -> list[dict]:
    """Per lever: mean tau (and rho) over its supernet seeds, with each seed's interval."""
    out = []
    for name in names:
        mine = [e for e in entries if e["lever"] == name]
        if not mine:
            continue
        taus = [e["ranking"]["kendall_tau"] for e in mine]
        out.append({
            "lever": name, "supernet_seeds": [e["seed"] for e in mine],
            "kendall_tau_mean": sum(t["value"] for t in taus) / len(taus),
            "kendall_tau_lo_min": min(t["lo"] for t in taus),
            "spearman_rho_mean": sum(e["ranking"]["spearman_rho"]["value"] for e in mine) / len(mine),
            "top5_overlap_mean": sum(e["ranking"]["top_k"]["overlap"]["value"] for e in mine) / len(mine),
            "cost": mine[0]["subnet_passes_per_image"], "train_s_mean": sum(e["train_s"] for e in mine) / len(mine),
        })  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workspace", default="vitnas-runs/bench-ranking", help="supernets, cache, MLflow")
    parser.add_argument("--levers", help="comma-separated lever names (default: all)")
    parser.add_argument("--supernet-seeds", default="0,1", help="default %(default)s")
    parser.add_argument(
        "--supernet-epochs", type=int, default=BASE["epochs"], help="BASE epochs (default %(default)s)"
    )
    parser.add_argument("--subnets", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=25, help="stand-alone epochs (default %(default)s)")
    parser.add_argument("--seeds", type=int, default=2, help="stand-alone seeds (default %(default)s)")
    parser.add_argument(
        "--parallel", type=int, default=2, help="processes side by side (default %(default)s)"
    )
    parser.add_argument(
        "--out", help="results file (default benchmarks/results/supernet_ranking[_quick].json)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke: 2 levers, 1 seed, 10-epoch supernets, 6 subnets"
    )
    args = parser.parse_args()
    if args.quick:
        args.levers, args.supernet_seeds, args.supernet_epochs = "baseline,fair", "0", 10
        args.subnets, args.epochs, args.workspace = 6, 3, args.workspace + "-quick"
    t0, load_start = time.perf_counter(), os.getloadavg()
    ws = Path(args.workspace).resolve()
    all_levers = levers(args.supernet_epochs)
    names = args.levers.split(",") if args.levers else list(all_levers)
    unknown = set(names) - set(all_levers)
    if unknown:
        raise SystemExit(f"--levers: unknown {sorted(unknown)}; known: {', '.join(all_levers)}")
    seeds = [int(s) for s in args.supernet_seeds.split(",")]
    todo = [(n, s) for n in names for s in seeds]
    print(f"training {len(todo)} supernets ({args.parallel} at a time) in {ws / 'supernets'} ...", flush=True)
    trained = {}
    with ProcessPoolExecutor(args.parallel) as pool:
        futures = {
            pool.submit(train_lever, n, all_levers[n][0], s, args.supernet_epochs, str(ws)): (n, s)
            for n, s in todo
        }
        for future, key in futures.items():
            trained[key] = future.result()
            print(f"  supernet {key[0]} seed {key[1]}: {trained[key]['train_s'] / 60:.1f} min", flush=True)
    entries = []
    for key in todo:
        entry = trained[key]
        print(f"rank-check {key[0]} seed {key[1]} ...", flush=True)
        ranking = rank_check(entry["checkpoints"], args, ws)
        entry["ranking"] = {k: v for k, v in ranking.items() if k != "subnets"}
        entry["subnets"] = [{k: v for k, v in s.items() if k != "arch"} for s in ranking["subnets"]]
        entries.append(entry)
    base_passes = (2 + BASE["random_subnets"]) * args.supernet_epochs
    print(table(entries, base_passes))
    lever_summary = summary(entries, names)
    for s in lever_summary:
        print(f"{s['lever']:<18} mean tau {s['kendall_tau_mean']:.3f} (lowest interval end {s['kendall_tau_lo_min']:.3f}), "
              f"rho {s['spearman_rho_mean']:.3f}, top-5 overlap {s['top5_overlap_mean']:.2f}")  # fmt: skip
    import torch

    from nas.training.config import TrainConfig

    default = TrainConfig()
    report = {
        "benchmark": "supernet_ranking",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "load_average_start": load_start,
            "load_average_end": os.getloadavg(),
            "note": "shared 2-core VM: other jobs ran alongside, so train minutes are noisy; "
            "subnet_passes_per_image is the machine-independent cost",
        },  # fmt: skip
        "space": SPACE,
        "method": {
            "supernets": {"base": BASE, "epochs": args.supernet_epochs, "seeds": seeds},
            "subnets": args.subnets,
            "standalone_epochs": args.epochs,
            "standalone_seeds": args.seeds,
            "holdout": "5-fold CV over digits' train+val pool, fold r for seed r (never the test split)",
            "bootstrap": "percentile, 90 %, 2000 replicates over subnets, stand-alone seeds and test images",
            "command": "vitnas rank-check --subnets N --epochs E --seeds S --json (per supernet)",
        },  # fmt: skip
        "levers": {n: {"changes": all_levers[n][0], "what": all_levers[n][1]} for n in names},
        "default": {k: getattr(default, k) for k in BASE},
        "summary": lever_summary,
        "runs": entries,
        "wall_s": time.perf_counter() - t0,
    }
    out = Path(args.out) if args.out else RESULTS / f"supernet_ranking{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out} ({report['wall_s'] / 60:.0f} min)")


if __name__ == "__main__":
    main()
