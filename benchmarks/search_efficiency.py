"""Search efficiency on psvit-digits: hypervolume per sampler, and what tracking costs a trial.

NSGA-II, TPE and random search run the same budget of trials (default 40) with the same seeds,
interleaved (seed by seed, the three samplers in turn) so that machine drift hits them alike. Each
campaign is a real one (``run_campaign``: Optuna on sqlite, MLflow on sqlite, subnets evaluated with
the supernet's weights, FLOPs by fvcore, latency measured on the target).

- Hypervolume of (accuracy max, latency min) after n trials, with one reference point for every
  run: accuracy 0 and 1.1 x the largest latency any run observed.
- One latency cache is shared by these runs: each architecture is measured once on this machine,
  the first time any run proposes it, and every run sees the same latency for it. That keeps the
  sampler comparison free of measurement noise.
- The time of each trial (``_run_trial``: asking and claiming it, scoring, handing its records to
  the writer; plus the progress note after it) is split into the
  scorer's own timings (evaluate, cost = FLOPs and params, measure) and the rest: what tracking
  and storage leave on the critical path (in-memory Optuna ask/tell, handing the records to the
  writer process, waiting for it to pause before a measurement). The writer process's own CPU
  time is reported per trial too.

What tracking costs a trial, all effects included (the writer process competing for the CPU,
its final drain), is measured as an A/B pair, repeated and interleaved: the same trials
(random sampler, same seed, so the same architectures) run (A) as a real campaign and (B) as a
bare loop with no store at all (in-memory Optuna, the same scorer), each in a fresh process (as
``vitnas search`` runs one campaign) with a fresh latency cache, so both measure every architecture. Overhead = A's trial loop (first trial to the last record
written) minus B's, both without the time spent inside latency measurements, which varies with
machine noise alone (the writer is paused then); as a share of A's trial loop. The raw difference
is reported too.

    python benchmarks/search_efficiency.py --supernet PATH   # ~6 min on 2 cores
    python benchmarks/search_efficiency.py                   # trains a supernet first (80 epochs: +6-12 min)
    python benchmarks/search_efficiency.py --quick           # a short smoke run
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/token_ops.py (before torch loads)

import argparse
import json
import logging
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import mlflow
import optuna
import torch
from optuna.trial import TrialState

from nas.errors import UserError
from nas.pareto import hypervolume
from nas.search import campaign
from nas.search.campaign import CampaignConfig, run_campaign, scorer_for
from nas.search.samplers import make_sampler
from nas.space import load_space
from nas.supernet import checkpoint as ckpt
from nas.supernet.train import train_supernet
from nas.training.config import TrainConfig

SPACE = "psvit-digits"
SAMPLERS = ("nsga2", "tpe", "random")
RESULT = Path(__file__).parent / "results" / "search_efficiency.json"
PHASES = ("evaluate", "cost", "measure", "tracking")


@dataclass
class TrialTime:
    wall: float
    evaluate: float
    cost: float
    measure: float
    kind: str  # "scored"; "rescored": the run had scored this architecture before; "failed"

    @property
    def tracking(self) -> float:
        """What is left on the critical path: in-memory Optuna, records handed to the writer, waits for it."""
        return self.wall - self.evaluate - self.cost - self.measure


@contextmanager
def clocked(scorer):
    """Record every trial's wall time and its score's timings while a campaign runs; and the
    trial loop's span, from the first trial to the last record written (``_finalise`` begins)."""
    times: list[TrialTime] = []
    loop: dict[str, float] = {}
    now: dict = {}  # the trial under way: its score
    originals = {name: getattr(campaign, name) for name in ("_run_trial", "_progress_note", "_finalise")}

    def timed_score(*args, **kwargs):
        now["score"] = result = type(scorer).score(scorer, *args, **kwargs)
        return result

    def timed_trial(*args, **kwargs):
        now.clear()
        t0 = time.perf_counter()
        loop.setdefault("start", t0)
        if not originals["_run_trial"](*args, **kwargs):
            return False  # the budget is done: no trial ran
        s = now.get("score")
        timings = {} if s is None else s.timings
        kind = "failed" if s is None else "scored" if timings else "rescored"
        phases = [timings.get(p, 0.0) for p in ("evaluate", "cost", "measure")]
        times.append(TrialTime(time.perf_counter() - t0, *phases, kind))
        return True

    def timed_note(*args, **kwargs):
        t0 = time.perf_counter()
        text = originals["_progress_note"](*args, **kwargs)
        times[-1].wall += time.perf_counter() - t0
        return text

    def timed_finalise(*args, **kwargs):
        loop["end"] = time.perf_counter()
        return originals["_finalise"](*args, **kwargs)

    campaign._run_trial, campaign._progress_note, campaign._finalise = timed_trial, timed_note, timed_finalise
    scorer.score = timed_score
    try:
        yield times, loop
    finally:
        for name, original in originals.items():
            setattr(campaign, name, original)
        del scorer.score


def children_cpu_s() -> float:
    """CPU seconds of this process's ended children (the campaigns' writer processes)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def supernet(args, space) -> tuple[Path, dict]:
    """The checkpoint given, or one trained here (kept in the workspace and reused next time)."""
    if args.supernet:
        return Path(args.supernet), ckpt.read_meta(args.supernet)
    folder = ckpt.checkpoint_dir(args.workspace, space)
    resume = (folder / ckpt.SIDECAR).is_file()
    print(f"training a supernet for {args.supernet_epochs} epochs into {folder} (resume={resume})")
    train_supernet(space, "digits", args.workspace, TrainConfig(epochs=args.supernet_epochs),
                   resume=resume, progress=False)  # fmt: skip
    return folder, ckpt.read_meta(folder)


def campaign_config(args, space, checkpoint: Path, workspace: Path, name: str, sampler: str, seed: int,
                    cache: Path) -> CampaignConfig:  # fmt: skip
    return CampaignConfig(
        name=name,
        space=space.source,
        target=args.target,
        trials=args.trials,
        workspace=str(workspace),
        supernet=str(checkpoint),
        sampler=sampler,
        seed=seed,
        cache_url=f"sqlite:///{cache}",
        measure_budget_s=args.measure_budget_s,
    ).resolved()


def run_one(args, space, checkpoint: Path, workspace: Path, sampler: str, seed: int) -> dict:
    config = campaign_config(args, space, checkpoint, workspace, f"{sampler}-seed{seed}", sampler, seed,
                             workspace / "latency-cache.sqlite")  # fmt: skip  (shared by every run)
    t0 = time.perf_counter()
    scorer = scorer_for(config, space)
    writer_cpu = children_cpu_s()
    with clocked(scorer) as (times, _):
        result = run_campaign(config, space, scorer, progress=False)
    wall = time.perf_counter() - t0
    study = optuna.load_study(study_name=config.name, storage=config.storage)
    done = sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.number)
    return {
        "sampler": sampler,
        "seed": seed,
        "points": [list(t.values) for t in done],  # (accuracy, latency ms) in trial order
        "distinct_archs": len({t.user_attrs["arch_hash"] for t in done}),
        "failed": result.failed,
        "front_size": len(result.front),
        "wall_s": wall,
        "outside_trials_s": wall - sum(t.wall for t in times),  # set-up, final tagging and artifacts
        "writer_cpu_s": children_cpu_s() - writer_cpu,
        "trials": [{**vars(t), "tracking": t.tracking} for t in times],
    }


def bare_loop(space, scorer, seed: int, trials: int) -> tuple[float, float, list[str]]:
    """B of the overhead pair: the campaign's trials with no store. (loop s, measuring s, arch hashes)."""
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler("random", seed, trials))
    measuring, archs = 0.0, []
    t0 = time.perf_counter()
    for _ in range(trials):
        trial = study.ask()
        arch = space.from_trial(trial)
        score, failure = campaign.evaluate(scorer, arch, should_measure=lambda *_: True)
        archs.append(arch.arch_hash())
        if failure is None:
            measuring += score.timings.get("measure", 0.0)
            study.tell(trial, [score.accuracy, score.latency_ms])
        else:
            study.tell(trial, state=TrialState.FAIL)
    return time.perf_counter() - t0, measuring, archs


def run_arm(args, space, checkpoint: Path, workspace: Path, arm: str, repeat: int) -> dict:
    """One arm of an overhead pair: (A) the real campaign or (B) the bare loop, with a fresh cache."""
    config = campaign_config(args, space, checkpoint, workspace, f"overhead-{repeat}", "random", repeat,
                             workspace / f"cache-{arm}-{repeat}.sqlite")  # fmt: skip  (fresh: all measured)
    scorer = scorer_for(config, space)
    if arm == "bare":
        loop, measuring, archs = bare_loop(space, scorer, repeat, args.trials)
    else:
        with clocked(scorer) as (times, span):
            run_campaign(config, space, scorer, progress=False)
        loop, measuring = span["end"] - span["start"], sum(t.measure for t in times)
        study = optuna.load_study(study_name=config.name, storage=config.storage)
        archs = [t.user_attrs["arch_hash"] for t in sorted(study.trials, key=lambda t: t.number)]
    return {"loop_s": loop, "measuring_s": measuring, "archs": archs}


def overhead_pair(args, checkpoint: Path, workspace: Path, repeat: int) -> dict:
    """A (real campaign) and B (bare loop) over the same random-sampler trials, in alternating order,
    each in a fresh process as ``vitnas search`` runs a campaign (no state left by earlier runs)."""
    out = {"repeat": repeat}
    for arm in ("campaign", "bare") if repeat % 2 == 0 else ("bare", "campaign"):
        argv = [sys.executable, __file__, "--arm", arm, "--repeat", str(repeat), "--supernet", str(checkpoint),
                "--workspace", str(workspace), "--trials", str(args.trials), "--target", args.target,
                "--measure-budget-s", str(args.measure_budget_s)]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"search_efficiency: the {arm} arm failed:\n{done.stdout}{done.stderr}")
        out[arm] = json.loads(done.stdout.strip().splitlines()[-1])
    a, b = out["campaign"], out["bare"]
    out["same_archs"] = a["archs"] == b["archs"]
    out["overhead_s"] = (a["loop_s"] - a["measuring_s"]) - (b["loop_s"] - b["measuring_s"])
    out["share"] = out["overhead_s"] / a["loop_s"]
    out["raw_share"] = (a["loop_s"] - b["loop_s"]) / a["loop_s"]
    for arm in ("campaign", "bare"):
        del out[arm]["archs"]
    return out


def spread(values: list[float]) -> dict[str, float]:
    """Median, 10th/90th percentiles (inclusive method) and the extremes."""
    deciles = statistics.quantiles(values, n=10, method="inclusive") if len(values) > 1 else values * 9
    return {"median": statistics.median(values), "p10": deciles[0], "p90": deciles[-1],
            "min": min(values), "max": max(values)}  # fmt: skip


def summarise(runs: list[dict], pairs: list[dict], trials: int) -> dict:
    reference = (0.0, 1.1 * max(p[1] for r in runs for p in r["points"]))
    marks = sorted({max(1, trials * k // 4) for k in range(1, 5)})
    for r in runs:
        r["hypervolume"] = {n: hypervolume(r["points"][:n], ("max", "min"), reference) for n in marks}
    by_sampler = {}
    for sampler in dict.fromkeys(r["sampler"] for r in runs):
        mine = [r for r in runs if r["sampler"] == sampler]
        by_sampler[sampler] = {
            "hypervolume": {n: spread([r["hypervolume"][n] for r in mine]) for n in marks},
            "best_accuracy": spread([max(p[0] for p in r["points"]) for r in mine]),
            "distinct_archs": spread([r["distinct_archs"] for r in mine]),
            "front_size": spread([r["front_size"] for r in mine]),
        }
    every = [t for r in runs for t in r["trials"]]
    scored = [t for t in every if t["kind"] == "scored"]
    rescored = [t["wall"] for t in every if t["kind"] == "rescored"]
    measured = [t for t in scored if t["measure"] > 0]
    timing = {
        "trials": len(every),
        "scored": len(scored),
        "rescored": len(rescored),
        "failed": sum(t["kind"] == "failed" for t in every),
        "measured_first_time": len(measured),
        "seconds_per_trial": {p: spread([t[p] for t in scored]) for p in (*PHASES, "wall")},
        "measure_when_measured_s": spread([t["measure"] for t in measured]) if measured else None,
        "critical_path_share": spread([t["tracking"] / t["wall"] for t in scored]),
        "writer_cpu_s_per_trial": spread([r["writer_cpu_s"] / len(r["trials"]) for r in runs]),
        "rescored_trial_wall_s": spread(rescored) if rescored else None,
        "outside_trials_s_per_run": spread([r["outside_trials_s"] for r in runs]),
    }
    if pairs:
        timing["overhead"] = {
            "pairs": len(pairs),
            "same_archs": all(p["same_archs"] for p in pairs),
            "share": spread([p["share"] for p in pairs]),
            "raw_share": spread([p["raw_share"] for p in pairs]),
            "seconds_per_trial": spread([p["overhead_s"] / trials for p in pairs]),
            "campaign_loop_s": spread([p["campaign"]["loop_s"] for p in pairs]),
            "bare_loop_s": spread([p["bare"]["loop_s"] for p in pairs]),
        }
    return {"reference_point": reference, "marks": marks, "by_sampler": by_sampler, "timing": timing}


def machine() -> dict:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "optuna": optuna.__version__,
        "mlflow": mlflow.__version__,
        "python": platform.python_version(),
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "load_average": os.getloadavg(),
    }


def print_tables(summary: dict, seeds: int) -> None:
    marks = summary["marks"]
    print(f"\nhypervolume (reference: accuracy 0, latency {summary['reference_point'][1]:.3f} ms), "
          f"median [min, max] over {seeds} seed(s)")  # fmt: skip
    print(
        f"{'sampler':<8}"
        + "".join(f"{'HV@' + str(n):>22}" for n in marks)
        + f"{'best acc':>10}{'distinct':>10}"
    )
    for sampler, s in summary["by_sampler"].items():
        cells = "".join(
            f"{h['median']:>10.4f} [{h['min']:.3f},{h['max']:.3f}]"
            for h in (s["hypervolume"][n] for n in marks)
        )
        print(
            f"{sampler:<8}{cells}{s['best_accuracy']['median']:>10.4f}{s['distinct_archs']['median']:>10.0f}"
        )
    t = summary["timing"]
    again = t["rescored_trial_wall_s"]
    print(f"\ntime per trial: {t['scored']} trials scored ({t['measured_first_time']} measured, the rest found in "
          f"the cache); {t['rescored']} re-proposed a scored architecture"
          + (f" (median {again['median'] * 1e3:.0f} ms each)" if again else ""))  # fmt: skip
    print(f"{'phase':<18}{'median s':>10}{'p90 s':>10}")
    names = {"cost": "cost (flops)", "tracking": "tracking (path)", "wall": "trial wall"}
    for phase in (*PHASES, "wall"):
        row = t["seconds_per_trial"][phase]
        print(f"{names.get(phase, phase):<18}{row['median']:>10.3f}{row['p90']:>10.3f}")
    if t["measure_when_measured_s"]:
        print(f"measure, when measured: median {t['measure_when_measured_s']['median']:.3f} s")
    share = t["critical_path_share"]
    print(f"tracking left on the critical path: median {share['median']:.1%} of a trial (p90 {share['p90']:.1%}); "
          f"the writer process's CPU: {t['writer_cpu_s_per_trial']['median'] * 1e3:.0f} ms a trial")  # fmt: skip
    o = t.get("overhead")
    if o:
        print(f"\ntracking overhead, campaign vs bare loop ({o['pairs']} interleaved pairs, same architectures: "
              f"{o['same_archs']}): median {o['share']['median']:.1%} of a trial "
              f"[{o['share']['min']:.1%}, {o['share']['max']:.1%}], {o['seconds_per_trial']['median'] * 1e3:.1f} ms a trial; "
              f"raw loop difference {o['raw_share']['median']:.1%} [{o['raw_share']['min']:.1%}, {o['raw_share']['max']:.1%}]")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--supernet", help="psvit-digits supernet checkpoint (default: train one)")
    parser.add_argument(
        "--supernet-epochs",
        type=int,
        default=TrainConfig.epochs,
        help="when training one (default %(default)s)",
    )
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS))
    parser.add_argument("--target", default="cpu:threads=1,batch=1")
    parser.add_argument("--measure-budget-s", type=float, default=0.3)
    parser.add_argument("--workspace", type=Path, default=Path("vitnas-runs/benchmarks"))
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--pairs", type=int, default=5, help="A/B pairs of the overhead measurement")
    parser.add_argument("--quick", action="store_true", help="8 trials, 1 seed, 2 pairs, 1-epoch supernet")
    parser.add_argument("--arm", choices=("campaign", "bare"), help=argparse.SUPPRESS)  # one arm, as JSON
    parser.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.trials, args.seeds, args.pairs, args.supernet_epochs = 8, 1, 2, 1
        args.workspace = args.workspace / "quick"
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    space = load_space(SPACE)
    if args.arm:
        print(json.dumps(run_arm(args, space, Path(args.supernet), args.workspace, args.arm, args.repeat)))
        return
    started = datetime.now(timezone.utc)
    try:
        checkpoint, meta = supernet(args, space)
    except UserError as err:  # e.g. a checkpoint of other settings in the workspace
        raise SystemExit(f"search_efficiency: {err}") from None
    workspace = args.workspace / f"search-efficiency-{started:%Y%m%dT%H%M%S}"  # fresh stores and cache
    runs = []
    for seed in range(args.seeds):
        for sampler in args.samplers:
            runs.append(run_one(args, space, checkpoint, workspace, sampler, seed))
            r = runs[-1]
            print(f"{sampler:<7} seed {seed}: {len(r['points'])} trials in {r['wall_s']:.0f} s, "
                  f"{r['distinct_archs']} distinct, front {r['front_size']}", flush=True)  # fmt: skip
    pairs = []
    for repeat in range(args.pairs):
        pairs.append(overhead_pair(args, checkpoint, workspace / "overhead", repeat))
        p = pairs[-1]
        print(f"overhead pair {repeat}: campaign {p['campaign']['loop_s']:.1f} s, bare {p['bare']['loop_s']:.1f} s, "
              f"share {p['share']:.1%} (raw {p['raw_share']:.1%})", flush=True)  # fmt: skip
    summary = summarise(runs, pairs, args.trials)
    print_tables(summary, args.seeds)
    history = meta.get("history") or [{}]
    result = {
        "benchmark": "search_efficiency",
        "date": started.isoformat(timespec="seconds"),
        "wall_s": (datetime.now(timezone.utc) - started).total_seconds(),
        "machine": machine(),
        "settings": {
            "space": SPACE,
            "trials": args.trials,
            "seeds": args.seeds,
            "samplers": args.samplers,
            "target": args.target,
            "measure_budget_s": args.measure_budget_s,
            "supernet": str(checkpoint),
            "supernet_epochs": meta.get("epoch"),
            "supernet_val_acc_largest": history[-1].get("val_acc_largest"),
            "supernet_val_acc_smallest": history[-1].get("val_acc_smallest"),
            "latency_cache": "sampler runs: one sqlite cache shared by all, each architecture measured once; "
            "overhead pairs: a fresh cache per arm",
            "pairs": args.pairs,
            "order": "seed by seed, samplers in turn (interleaved)",
        },
        "summary": summary,
        "runs": runs,
        "overhead_pairs": pairs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
