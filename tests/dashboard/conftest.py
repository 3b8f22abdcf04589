"""Dashboard fixtures: real MLflow stores filled by real campaigns, the app (in-process and through
the CLI), and headless Debian Chromium driven by selenium.

The campaigns go through ``nas.tracking.Campaign`` exactly as a search writes them (parent run,
child runs with the flattened arch and ``arch.yaml``, metrics, Pareto tags); the architectures are
real members of ``psvit-digits``. Nothing is trained: accuracy and latency are a deterministic
function of the architecture's size, with a per-target speed profile, so two targets rank the same
architectures differently.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from nas.arch import AdaptiveArch, ArchConfig
from nas.space import load_space
from nas.tracking import Campaign, default_tracking_uri

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# <b> is markup plotly would render (it drops the tags): shown literally only when escaped
XSS = "<script>window.__xss=1</script><b>bold</b>"
XSS_RUN = '<img src=x onerror="window.__xss=2"><b>bold</b>'
TARGETS = {  # campaign -> (target, budget ms, (ms per GFLOP, ms per cell), architectures: space.sample seeds)
    "digits-cpu": ("cpu:threads=2,batch=1", 2.0, (60.0, 0.10), range(14)),
    "digits-gpu": ("cuda:0,batch=1", 0.6, (4.0, 0.08), range(5, 17)),  # 9 architectures in common
}


def _sizes(arch: ArchConfig | AdaptiveArch) -> tuple[float, float, int]:
    """Params, GFLOPs and cells an image runs through: counted from a psvit member's shapes; for an
    adaptive member, DeiT-Tiny's (5.7 M, 1.26 G, 12) scaled by its budgets (unset: all kept)."""
    if isinstance(arch, AdaptiveArch):
        use = {kind: arch.usage.get(kind, 1.0) for kind in ("patch", "head", "block")}
        kept = use["patch"] * use["head"] * use["block"]
        return 5.7e6 * kept, 1.26 * kept, round(12 * use["block"])
    params = gflops = 0.0
    cells = 0
    for st in arch.stages:
        n = st.tokens
        for kind, after in zip(st.cells, st.token_trace()):
            if kind == "identity":
                continue
            weights = (2 + 2 * st.mlp_ratio + (2 if kind == "basic" else 0)) * st.dim**2
            params += weights
            gflops += 2 * (n * weights + 2 * n * n * st.dim) / 1e9
            cells, n = cells + 1, after
    return params, gflops, cells


def synthetic_metrics(arch: ArchConfig | AdaptiveArch, ms_per_gflop: float, ms_per_cell: float) -> dict[str, float]:
    """Latency from the sizes, accuracy growing with them."""
    params, gflops, cells = _sizes(arch)
    noise = int(hashlib.sha256(arch.arch_hash().encode()).hexdigest()[:4], 16) / 0xFFFF
    latency = 0.2 + ms_per_gflop * gflops + ms_per_cell * cells
    return {
        "val_accuracy": round(min(0.99, 0.55 + 0.35 * (params / 1e6) ** 0.3 + 0.04 * noise), 4),
        "latency_ms": round(latency, 4),
        "latency_p90_ms": round(latency * 1.08, 4),
        "latency_noisy": float(noise > 0.85),  # some trials' latencies stayed spread after re-measuring
        "gflops": round(gflops, 5),
        "params_m": round(params / 1e6, 4),
    }


def fill_campaign(uri: str, name: str, target: str, budget: float, profile: tuple[float, float], seeds: range,
                  run_name: str | None = None, failed: bool = True,
                  without: tuple[str, ...] = (), space_name: str = "psvit-digits") -> Campaign:  # fmt: skip
    """A finished campaign, trial i on ``space.sample(seeds[i])`` (plus one failed trial), its front tagged;
    the metrics named in ``without`` are not logged."""
    space = load_space(space_name)
    campaign = Campaign(uri, name)
    campaign.start_or_resume(
        params={"space": space_name, "target": target, "trials": len(seeds), "latency_budget_ms": budget},
        tags={"target": target},
    )
    for n, seed in enumerate(seeds):
        arch = space.sample(seed)
        run_id = campaign.trial_run(n, arch, tags={"target": target})
        metrics = {k: v for k, v in synthetic_metrics(arch, *profile).items() if k not in without}
        campaign.finish_trial(run_id, metrics, tags={"measured": "true"})
        if run_name is not None:
            campaign.client.update_run(run_id, name=run_name)
    if failed:
        run_id = campaign.trial_run(len(seeds), space.sample(100))
        campaign.finish_trial(run_id, {}, "FAILED", {"vitnas.failure": "RuntimeError: out of memory"})
    campaign.tag_pareto(budget_ms=budget)
    campaign.end()
    return campaign


def _new_store(tmp_path_factory, template: Path, name: str) -> str:
    folder = tmp_path_factory.mktemp(name)
    shutil.copy(template, folder / "mlflow.db")
    return default_tracking_uri(folder)


@pytest.fixture(scope="session")
def store_uri(tmp_path_factory, mlflow_db_template) -> str:
    """A sqlite store with two campaigns over the same architectures, measured on two targets."""
    uri = _new_store(tmp_path_factory, mlflow_db_template, "dashboard-store")
    for name, (target, budget, profile, seeds) in TARGETS.items():
        fill_campaign(uri, name, target, budget, profile, seeds)
    return uri


@pytest.fixture(scope="session")
def xss_store_uri(tmp_path_factory, mlflow_db_template) -> str:
    """A store whose campaign name, run name and target are markup: they must show as text; and a
    campaign ``plain`` whose trials have no GFLOPs (as when FLOPs could not be counted)."""
    uri = _new_store(tmp_path_factory, mlflow_db_template, "dashboard-xss")
    _, budget, profile, _ = TARGETS["digits-cpu"]
    fill_campaign(uri, XSS, XSS_RUN, budget, profile, range(6), run_name=XSS_RUN, failed=False)
    fill_campaign(uri, "plain", "cpu", budget, profile, range(6), failed=False, without=("gflops",))
    return uri


@contextlib.contextmanager
def running_app(uri: str):
    """The app in this process on a free port; its URL, then shut down."""
    from nas.dashboards.app import make_server

    server = make_server(uri, "127.0.0.1", 0, ttl_s=30.0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.url.rstrip("/")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture(scope="session")
def app_url(store_uri) -> str:
    with running_app(store_uri) as url:
        yield url


@pytest.fixture(scope="session")
def xss_app_url(xss_store_uri) -> str:
    with running_app(xss_store_uri) as url:
        yield url


@pytest.fixture(scope="session")
def cli_app_url(store_uri, tmp_path_factory) -> str:
    """``vitnas dashboard --tracking-uri URI --port 0`` as a user starts it; the URL it prints."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "nas.cli", "dashboard", "--tracking-uri", store_uri, "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        cwd=tmp_path_factory.mktemp("dashboard-cwd"),
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        first = lines.get(timeout=120)
        assert first.startswith("vitnas dashboard: http://127.0.0.1:"), first
        yield first.split()[2].rstrip("/")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    """Headless Debian Chromium through its own chromedriver: selenium-manager never downloads."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("Debian's chromium and chromium-driver are not installed (tests/dashboard/install_browser.sh)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1500,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


class StoreTruth:
    """What the store holds, read straight from MLflow (not through the dashboard's code)."""

    def __init__(self, uri: str):
        from mlflow import MlflowClient

        self.uri, self.client = uri, MlflowClient(uri)
        self.experiment_id = self.client.get_experiment_by_name("vitnas").experiment_id

    def ref(self, campaign: str) -> str:
        return f"{self.experiment_id}/{campaign}"

    def finished(self, campaign: str) -> list:
        """Finished trial runs, by trial number."""
        runs = self.client.search_runs(
            [self.experiment_id],
            f"tags.`vitnas.campaign` = '{campaign}' and tags.`vitnas.role` = 'trial' and attributes.status = 'FINISHED'",
        )
        return sorted(runs, key=lambda r: int(r.data.tags["trial_number"]))

    def tagged(self, campaign: str, tag: str) -> set[str]:
        return {r.info.run_id for r in self.finished(campaign) if r.data.tags.get(tag) == "true"}

    def arch(self, run_id: str) -> ArchConfig | AdaptiveArch:
        from nas.arch import arch_from_text

        with tempfile.TemporaryDirectory() as tmp:
            return arch_from_text(Path(self.client.download_artifacts(run_id, "arch.yaml", tmp)).read_text())


@pytest.fixture(scope="session")
def app_for():
    """``running_app``: the app on a store of the test's own."""
    return running_app


@pytest.fixture(scope="session")
def fill():
    """``fill_campaign``, for tests that fill a store of their own."""
    return fill_campaign


@pytest.fixture(scope="session")
def markup() -> tuple[str, str]:
    """The campaign name and the run name (also the target) of ``xss_store_uri``."""
    return XSS, XSS_RUN


@pytest.fixture(scope="session")
def targets() -> dict[str, tuple]:
    return TARGETS


@pytest.fixture(scope="session")
def truth(store_uri) -> StoreTruth:
    return StoreTruth(store_uri)


@pytest.fixture(scope="session")
def truth_of():
    """``StoreTruth``, for tests that fill a store of their own."""
    return StoreTruth
