"""What the dashboard takes to load a 5,000-trial campaign from a sqlite MLflow store, on this machine.

Fills a store the way a search does (``nas.tracking.Campaign``: parent run, one child run per trial
with the flattened ``psvit-digits`` architecture as params, ``arch.yaml``, metrics, then the Pareto
tags; nothing is trained, metrics are synthetic), then times, in interleaved rounds:

- ``cold``: ``/api/campaigns/<ref>/trials`` with an empty cache (MLflow ``search_runs`` page by page,
  the front, the JSON);
- ``warm``: the same request again, served from the TTL cache;
- ``list``: ``/api/campaigns`` with an empty cache (the list loads every campaign's trials);
- ``trial``: ``/api/trials/<run id>`` (``get_run`` + the ``arch.yaml`` download);
- ``page``: headless Chromium opening the campaign page until the plot is drawn (warm API), when
  Debian's chromium and chromedriver are installed.

Median and spread over the rounds go to ``benchmarks/results/dashboard_load.json``.

    python benchmarks/dashboard_load.py                 # 5,000 trials (filling takes ~5-10 minutes)
    python benchmarks/dashboard_load.py --trials 300    # a short smoke run
The filled store is kept in --workspace and reused when it already holds the campaign.
"""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # before mlflow is imported

import argparse
import json
import platform
import random
import statistics
import tempfile
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

from nas.dashboards.app import make_server
from tqdm import tqdm

from nas.space import load_space
from nas.tracking import Campaign, default_tracking_uri

RESULT = Path(__file__).parent / "results" / "dashboard_load.json"
NAME = "bench-5k"
BUDGET_MS = 2.0


def fill(uri: str, trials: int, sidecar: Path) -> float | None:
    """The campaign with ``trials`` finished trials; seconds per trial it took to write them (kept
    in ``sidecar`` beside a reused store; None if unknown)."""
    campaign = Campaign(uri, NAME)
    campaign.start_or_resume(
        params={"space": "psvit-digits", "target": "cpu:threads=2,batch=1", "trials": trials, "latency_budget_ms": BUDGET_MS},
        tags={"target": "cpu:threads=2,batch=1"},
    )
    done = {t.trial_number for t in campaign.trial_runs()}
    todo = [n for n in range(trials) if n not in done]
    space, rng = load_space("psvit-digits"), random.Random(0)
    start = time.perf_counter()
    for n in tqdm(todo, desc="filling the store", unit="trial", disable=not todo):
        arch = space.sample(n)
        gflops = rng.uniform(0.002, 0.03)
        run_id = campaign.trial_run(n, arch, tags={"target": "cpu:threads=2,batch=1"})
        campaign.finish_trial(run_id, {
            "val_accuracy": min(0.99, 0.7 + 4 * gflops + rng.gauss(0, 0.02)),
            "latency_ms": 0.3 + 60 * gflops + abs(rng.gauss(0, 0.2)),
            "latency_p90_ms": 0.35 + 65 * gflops,
            "gflops": gflops,
            "params_m": gflops * 30,
        })  # fmt: skip
    if todo:
        sidecar.write_text(json.dumps({"fill_s_per_trial": (time.perf_counter() - start) / len(todo)}))
        campaign.tag_pareto(budget_ms=BUDGET_MS)
    campaign.end()
    return json.loads(sidecar.read_text())["fill_s_per_trial"] if sidecar.is_file() else None


def timed_get(url: str) -> tuple[float, int]:
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=600) as response:
        size = len(response.read())
    return time.perf_counter() - start, size


def browser():
    """Headless Debian Chromium, or None when it is not installed."""
    if not (Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists()):
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1500,1000", f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}"):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=options)


def page_load(driver, url: str) -> float:
    from selenium.webdriver.support.ui import WebDriverWait

    start = time.perf_counter()
    driver.get(url)
    WebDriverWait(driver, 600).until(lambda d: d.execute_script("return document.body.dataset.ready"))
    return time.perf_counter() - start


def spread(values: list[float]) -> dict:
    return {"median_s": round(statistics.median(values), 4), "min_s": round(min(values), 4),
            "max_s": round(max(values), 4), "rounds": len(values)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workspace", default=str(Path(tempfile.gettempdir()) / "vitnas-dashboard-bench"))
    args = parser.parse_args()

    workspace = Path(args.workspace) / f"{args.trials}"
    uri = default_tracking_uri(workspace)
    fill_s = fill(uri, args.trials, workspace / "fill.json")
    server = make_server(uri, "127.0.0.1", 0, ttl_s=3600)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    experiment = next(c.experiment_id for c in server.store.campaigns() if c.name == NAME)
    base = server.url.rstrip("/")
    page = f"{base}/campaigns/{experiment}/{quote(NAME)}"
    api = f"{base}/api/campaigns/{experiment}/{quote(NAME)}/trials"
    driver = browser()
    times: dict[str, list[float]] = {"cold": [], "warm": [], "list": [], "trial": [], "page": []}
    try:
        points = json.loads(urllib.request.urlopen(api).read())
        run_ids = [p["run_id"] for p in points["points"]]
        size = 0
        for i in range(args.rounds):
            server.store.cache.clear()
            t, size = timed_get(api)
            times["cold"].append(t)
            times["warm"].append(timed_get(api)[0])
            if driver is not None:
                times["page"].append(page_load(driver, page))
            server.store.cache.clear()
            times["list"].append(timed_get(f"{base}/api/campaigns")[0])
            times["trial"].append(timed_get(f"{base}/api/trials/{run_ids[i * 97 % len(run_ids)]}")[0])
    finally:
        if driver is not None:
            driver.quit()
        server.shutdown()
        server.server_close()

    result = {
        "benchmark": "dashboard_load",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {platform.processor() or platform.system()}, shared 2-core VM",
        "store": "sqlite (WAL), MLflow 3.17, psvit-digits architectures (41 params, ~10 tags, 5 metrics per trial)",
        "trials": len(points["points"]),
        "front": len(points["front"]),
        "fill_s_per_trial": round(fill_s, 4) if fill_s else None,
        "trials_json_bytes": size,
        "timings": {k: spread(v) for k, v in times.items() if v},
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['trials']} trials, {result['front']} on the front, trials JSON {size / 1e6:.2f} MB")
    print(f"{'what':<8}{'median s':>10}{'min s':>9}{'max s':>9}")
    for key, row in result["timings"].items():
        print(f"{key:<8}{row['median_s']:>10.3f}{row['min_s']:>9.3f}{row['max_s']:>9.3f}")
    print(f"written to {RESULT}")


if __name__ == "__main__":
    main()
