"""The same reduction-schedule search on an eager target and on an ONNX Runtime target: do the fronts differ?

A DeiT-Tiny-family model at digits scale (32 px in 4 px patches: 64 tokens + class, 6 blocks) is
fine-tuned on digits (``vitnas finetune``), then ``vitnas search`` scores nearly every ToMe/EViT
schedule of the space (random draws, 4 per member) twice, once with ``--target cpu:threads=2,batch=1,backend=eager`` and once with
``backend=onnxruntime``: the same accuracies, latencies measured as each runtime runs the
schedule. The script prints both Pareto fronts, the schedules on one front only, and the
dashboard's compare URL; with ``--screenshot`` (Debian's chromium) it saves the compare page.

    python benchmarks/runtime_fronts.py --workspace /tmp/fronts            # ~10 minutes on 2 cores (20 fine-tune epochs)
    python benchmarks/runtime_fronts.py --workspace /tmp/fronts --screenshot

Writes ``benchmarks/results/runtime_fronts.json`` (and ``runtime_fronts.png``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see token_ops.py: measure compute, not spinning

import argparse
import json
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml
from mlflow import MlflowClient
from nas.dashboards.app import make_server

from nas.cli import main as vitnas
from nas.tracking import Campaign

RESULTS = Path(__file__).parent / "results"
SPACE = {
    "name": "deit-tiny-digits-reduction",
    "family": "timm",
    "description": "ToMe / EViT schedules for a DeiT-Tiny-family model on 32 px digits (64 tokens, 6 blocks)",
    "model": "deit_tiny_patch16_224",
    "depth": 6,
    "image_size": 32,
    "num_classes": 10,
    "model_args": {"patch_size": 4, "depth": 6, "embed_dim": 96, "num_heads": 3},
    "reduction": {
        "kind": ["none", "tome", "evit"],
        "tome": {"r": [2, 4, 6, 8], "rule": ["constant", "decreasing"]},
        "evit": {"keep_rate": [0.5, 0.6, 0.7, 0.8], "layers": [[1, 3], [2, 4], [1, 2, 4]]},
    },
}
BACKENDS = ("eager", "onnxruntime")


def run(args) -> dict:
    ws = Path(args.workspace).resolve()
    ws.mkdir(parents=True, exist_ok=True)
    space_file = ws / "space.yaml"
    space_file.write_text(yaml.safe_dump(SPACE, sort_keys=False))
    weights = ws / "weights.safetensors"
    if not weights.is_file():
        assert vitnas(["finetune", "--space", str(space_file), "--out", str(weights), "--epochs", str(args.epochs),
                       "--batch-size", "64", "--lr", "2e-3", "--quiet"]) == 0  # fmt: skip
    from nas.space import load_space

    members = load_space(space_file).count()
    uri = f"sqlite:///{ws / 'mlflow.db'}"
    fronts = {}
    for backend in BACKENDS:
        name = f"fronts-{backend}"
        # random draws, 4 per member: nearly every schedule is drawn; repeats are scored once (cached)
        argv = ["search", "--space", str(space_file), "--weights", str(weights), "--trials", str(4 * members),
                "--target", f"cpu:threads=2,batch=1,backend={backend}", "--campaign", name, "--sampler", "random",
                "--workspace", str(ws), "--measure-budget-s", str(args.budget_s), "--quiet"]  # fmt: skip
        assert vitnas(argv) == 0
        runs = Campaign(uri, name, read_only=True).trial_runs()
        fronts[backend] = {
            "trials": len(runs),
            "schedules": len({r.arch_hash for r in runs}),
            "front": _front(uri, [r for r in runs if r.tags.get("pareto") == "true"]),
        }
    keys = {b: {json.dumps(p["schedule"], sort_keys=True) for p in fronts[b]["front"]} for b in BACKENDS}
    only = {b: sorted(keys[b] - keys[other]) for b, other in zip(BACKENDS, reversed(BACKENDS))}
    result = {
        "benchmark": "runtime_fronts",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average": os.getloadavg(),
        "space": SPACE,
        "members": members,
        "fronts": fronts,
        "on_one_front_only": only,
    }
    if args.screenshot:
        result["screenshot"] = str(screenshot(uri, RESULTS / "runtime_fronts.png"))
    return result


def _front(uri: str, runs: list) -> list[dict]:
    """One point per schedule on the front (a schedule drawn again is one cached point, several trials)."""
    points: dict[str, dict] = {}
    for r in runs:
        point = points.setdefault(r.arch_hash, {"schedule": _schedule(uri, r.run_id), "trials": 0,
                                                "val_accuracy": r.metrics["val_accuracy"],
                                                "latency_ms": r.metrics["latency_ms"]})  # fmt: skip
        point["trials"] += 1
    return sorted(points.values(), key=lambda p: p["latency_ms"])


def _schedule(uri: str, run_id: str) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return yaml.safe_load(Path(MlflowClient(uri).download_artifacts(run_id, "arch.yaml", tmp)).read_text())[
            "schedule"
        ]


def screenshot(uri: str, out: Path) -> Path:
    """The dashboard's compare page of the two campaigns, rendered by headless chromium."""
    server = make_server(uri, "127.0.0.1", 0, 30.0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        experiment = MlflowClient(uri).get_experiment_by_name("vitnas").experiment_id
        query = "&".join(f"c={experiment}/fronts-{b}" for b in BACKENDS)
        url = f"{server.url}/compare?{query}"
        subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000",
             "--virtual-time-budget=8000", f"--screenshot={out}", url],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        return out
    finally:
        server.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", required=True)
    parser.add_argument("--epochs", type=int, default=20, help="fine-tune epochs")
    parser.add_argument("--budget-s", type=float, default=1.0, help="measurement time budget per schedule")
    parser.add_argument("--screenshot", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "runtime_fronts.json")
    args = parser.parse_args()
    t0 = time.time()
    result = run(args)
    result["seconds"] = round(time.time() - t0)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for backend in BACKENDS:
        print(f"\n{backend} front (of {result['fronts'][backend]['schedules']} schedules):")
        for p in result["fronts"][backend]["front"]:
            print(f"  {p['latency_ms']:8.3f} ms  acc {p['val_accuracy']:.4f}  {p['schedule']}")
    print(f"\non one front only: {json.dumps(result['on_one_front_only'], indent=1)}")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
