"""Campaign throughput on this machine: the local Optuna backend against Ray Tune with 1 and 2 workers.

Every campaign is a real one over psvit-digits with the same budget (trials), seed and target
(``cpu:threads=1,batch=1``): Optuna on sqlite, MLflow on sqlite, subnets scored with an untrained
supernet's weights (or ``--supernet``), latency measured. Each campaign has a fresh workspace, hence
a fresh latency cache. Ray runs on one local Ray instance with 2 CPUs, started once before the
rounds (cluster start-up is not counted; Tuner set-up, actor start and the final Pareto pass are).
Rounds interleave the three (order rotated each round); the table gives the median and the spread.

- trials/min: finished trials over the campaign's wall time.
- overhead per trial: Ray with one worker against the local backend, per trial (wall difference).

    python benchmarks/ray_throughput.py            # 3 rounds of 12 trials (about 10 minutes here)
    python benchmarks/ray_throughput.py --quick    # 1 round of 4 trials
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/token_ops.py (before torch loads)

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import ray
import torch

from nas.report import format_table
from nas.search.campaign import CampaignConfig, run_campaign, scorer_for
from nas.search.ray_backend import RayOptions, run_ray_campaign
from nas.space import load_space
from nas.supernet import Supernet
from nas.supernet.checkpoint import save_checkpoint
from nas.training.config import TrainConfig
from nas.training.optim import make_optimizer

RESULT = Path(__file__).parent / "results" / "ray_throughput.json"
TARGET = "cpu:threads=1,batch=1"
BACKENDS = ("local", "ray-1", "ray-2")


def untrained_checkpoint(space, folder: Path) -> Path:
    """A freshly initialised supernet, saved as ``train_supernet`` saves one (epoch 0)."""
    from nas.data import load_splits

    torch.manual_seed(0)
    net = Supernet(space)
    config = TrainConfig(seed=0)
    meta = {"epoch": 0, "config": config.to_dict(), "history": [], "complete": False,
            "data": load_splits("digits", space.spec.image_size).spec.to_dict()}  # fmt: skip
    save_checkpoint(folder, net, make_optimizer(net, config), meta)
    return folder


def one_campaign(backend: str, space, supernet: str, root: Path, trials: int, index: int) -> float:
    """Wall seconds of one fresh campaign of ``trials`` trials on ``backend``."""
    config = CampaignConfig(
        name=f"{backend}-{index}", space=space.source, target=TARGET, trials=trials,
        workspace=str(root / f"{backend}-{index}"), supernet=supernet, seed=index, measure_budget_s=0.2,
    ).resolved()  # fmt: skip
    scorer = scorer_for(config, space)
    start = time.perf_counter()
    if backend == "local":
        result = run_campaign(config, space, scorer, progress=False)
    else:
        options = RayOptions(max_concurrent=int(backend.split("-")[1]))
        result = run_ray_campaign(config, space, scorer, options, progress=False)
    wall = time.perf_counter() - start
    assert result.finished == trials, f"{backend}: {result.finished} of {trials} trials finished"
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--supernet", help="a trained psvit-digits checkpoint (default: an untrained one)")
    parser.add_argument("--quick", action="store_true", help="1 round of 4 trials")
    args = parser.parse_args()
    trials, rounds = (4, 1) if args.quick else (args.trials, args.rounds)
    space = load_space("psvit-digits")
    with tempfile.TemporaryDirectory(prefix="vitnas-ray-bench-") as tmp:
        root = Path(tmp)
        supernet = args.supernet or str(untrained_checkpoint(space, root / "supernet"))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        walls: dict[str, list[float]] = {b: [] for b in BACKENDS}
        try:
            for r in range(rounds):
                order = BACKENDS[r % 3 :] + BACKENDS[: r % 3]
                for backend in order:
                    walls[backend].append(one_campaign(backend, space, supernet, root, trials, r))
                    print(f"round {r}: {backend} {walls[backend][-1]:.1f} s", flush=True)
        finally:
            ray.shutdown()
    rows = []
    for backend in BACKENDS:
        rates = [60 * trials / w for w in walls[backend]]
        rows.append({"backend": backend, "trials/min (median)": round(statistics.median(rates), 2),
                     "min": round(min(rates), 2), "max": round(max(rates), 2),
                     "s/trial (median)": round(statistics.median(walls[backend]) / trials, 2)})  # fmt: skip
    overheads = [(ray1 - local) / trials for ray1, local in zip(walls["ray-1"], walls["local"], strict=True)]
    overhead = {"median_s": round(statistics.median(overheads), 2), "min_s": round(min(overheads), 2),
                "max_s": round(max(overheads), 2)}  # fmt: skip
    print(format_table(rows))
    print(f"Ray's overhead per trial (1 worker vs local): {overhead['median_s']} s "
          f"(range {overhead['min_s']}..{overhead['max_s']})")  # fmt: skip
    RESULT.parent.mkdir(exist_ok=True)
    RESULT.write_text(json.dumps({
        "benchmark": "ray_throughput", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "ray": ray.__version__},
        "space": space.name, "target": TARGET, "trials": trials, "rounds": rounds,
        "supernet": "given" if args.supernet else "untrained", "rows": rows,
        "overhead_per_trial_s": overhead, "walls_s": walls,
    }, indent=2))  # fmt: skip
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
