"""The dashboard in headless Chromium: started by ``vitnas dashboard`` on a real store, the plot and
front checked against MLflow, a point clicked, the budget slider moved, a screenshot saved; names
holding markup shown as text; and an adaptive (AdaViT budgets) campaign's front and members."""

from __future__ import annotations

import json
import shlex
from urllib.parse import quote

import pytest

from nas.pareto import best_under_budget

By = pytest.importorskip("selenium.webdriver.common.by", reason="selenium is not installed").By
from selenium.webdriver import ActionChains  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

TRIALS, FRONT, BEST = 0, 1, 2  # the campaign plot's traces


def open_page(driver, url: str) -> None:
    """Load a page and wait until its script says it has drawn (or failed)."""
    driver.get(url)
    WebDriverWait(driver, 60).until(lambda d: d.execute_script("return document.body.dataset.ready"))
    assert driver.execute_script("return document.body.dataset.ready") == "1", driver.find_element(By.ID, "error").text


def page_problems(driver, base: str) -> list:
    """Console errors (a script error, a CSP refusal) and anything loaded from another origin."""
    errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    foreign = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    return errors + [u for u in foreign if not u.startswith(base)]


def trace(driver, plot: str, index: int) -> dict:
    return driver.execute_script(
        "const t = document.getElementById(arguments[0]).data[arguments[1]];"
        "return {x: t.x, y: t.y, ids: t.customdata, text: t.text};",
        plot,
        index,
    )


def click_point(driver, plot: str, index: int, i: int) -> None:
    """Click the i-th drawn marker of a trace (plotly picks the nearest point under the mouse)."""
    points = driver.find_elements(By.CSS_SELECTOR, f"#{plot} .scatterlayer .trace:nth-of-type({index + 1}) path.point")
    ActionChains(driver).move_to_element(points[i]).click().perform()
    WebDriverWait(driver, 30).until(
        lambda d: d.find_element(By.ID, "panel").get_attribute("data-state") in ("ready", "error")
    )
    assert driver.find_element(By.ID, "panel").get_attribute("data-state") == "ready"


def test_campaign_page_in_chromium(browser, cli_app_url, truth, store_uri, targets, tmp_path):
    name = "digits-cpu"
    runs = {r.info.run_id: r for r in truth.finished(name)}
    browser.get_log("browser")  # start with an empty console

    # the list: every campaign with its trials and front size
    open_page(browser, cli_app_url + "/")
    rows = browser.find_elements(By.CSS_SELECTOR, "#campaigns tbody tr")
    assert [r.find_element(By.CSS_SELECTOR, ".campaign-link").text for r in rows] == sorted(targets)
    for row in rows:
        campaign = row.find_element(By.CSS_SELECTOR, ".campaign-link").text
        assert row.find_element(By.CSS_SELECTOR, ".trials").text.startswith(str(len(truth.finished(campaign))))
        assert row.find_element(By.CSS_SELECTOR, ".front").text == str(len(truth.tagged(campaign, "pareto")))

    # the campaign page: one point per finished trial at its (latency, accuracy), the front as tagged
    open_page(browser, rows[0].find_element(By.CSS_SELECTOR, ".campaign-link").get_attribute("href"))
    assert browser.find_element(By.ID, "title").text == name
    trials = trace(browser, "plot", TRIALS)
    assert trials["ids"] == list(runs)
    for run_id, x, y in zip(trials["ids"], trials["x"], trials["y"], strict=True):
        metrics = runs[run_id].data.metrics
        assert (x, y) == (metrics["latency_ms"], metrics["val_accuracy"])
    assert len(browser.find_elements(By.CSS_SELECTOR, "#plot .scatterlayer .trace:nth-of-type(1) path.point")) == len(runs)
    front = trace(browser, "plot", FRONT)
    assert set(front["ids"]) == truth.tagged(name, "pareto") and front["x"] == sorted(front["x"])
    # the colour bar spans the trials' GFLOPs
    flops = [r.data.metrics["gflops"] for r in runs.values()]
    scale = browser.execute_script(
        "const m = document.getElementById('plot').data[0].marker; return [m.cmin, m.cmax];"
    )
    assert scale == [min(flops), max(flops)] and browser.find_elements(By.CSS_SELECTOR, "#plot .colorbar")

    # the slider starts at the campaign's budget, on the trial the campaign tagged best under it
    assert trace(browser, "plot", BEST)["ids"] == list(truth.tagged(name, "best_under_budget"))
    slider = browser.find_element(By.ID, "budget")
    acc = [r.data.metrics["val_accuracy"] for r in runs.values()]
    lat = [r.data.metrics["latency_ms"] for r in runs.values()]

    def star_matches_store() -> str | None:
        budget = float(browser.find_element(By.ID, "best").get_attribute("data-budget"))
        i = best_under_budget(acc, lat, budget)
        expected = [] if i is None else [list(runs)[i]]
        assert trace(browser, "plot", BEST)["ids"] == expected, budget
        assert browser.find_element(By.ID, "best").get_attribute("data-run-id") == (expected or [""])[0]
        return expected[0] if expected else None

    slider.send_keys(Keys.HOME)  # the fastest trial's latency: only it fits
    assert runs[star_matches_store()].data.metrics["latency_ms"] == min(lat)
    for _ in range(3):
        slider.send_keys(Keys.PAGE_UP)
        star_matches_store()
    slider.send_keys(Keys.END)
    assert runs[star_matches_store()].data.metrics["val_accuracy"] == max(acc)

    # click a point on the front: the panel shows that run, its architecture and export command
    click_point(browser, "plot", FRONT, 0)
    panel = browser.find_element(By.ID, "panel")
    run_id = panel.get_attribute("data-run-id")
    run = runs[run_id]
    assert run_id in truth.tagged(name, "pareto")
    number = run.data.tags["trial_number"]
    assert run.info.run_name == f"trial-{number}"  # the name vitnas gives a trial's run: not repeated
    assert browser.find_element(By.ID, "trial-title").text == f"trial {number}"
    assert not browser.find_elements(By.ID, "trial-name")
    shown = {r.get_attribute("data-metric"): r.find_element(By.TAG_NAME, "td").text
             for r in browser.find_elements(By.CSS_SELECTOR, "#trial-metrics tr")}  # fmt: skip
    assert shown == {k: f"{v:.4f}" for k, v in run.data.metrics.items()}
    arch = truth.arch(run_id)
    stages = browser.find_elements(By.CSS_SELECTOR, "#arch .arch-stage")
    assert len(stages) == len(arch.stages)
    for stage, st, tokens in zip(stages, arch.stages, arch.token_trace(), strict=True):
        cells = stage.find_elements(By.CSS_SELECTOR, ".cell")
        assert [c.get_attribute("data-kind") for c in cells] == list(st.cells)
        assert [int(c.get_attribute("data-tokens")) for c in cells] == tokens
        assert f"dim {st.dim} · {st.heads} heads" in stage.text
    export = ["vitnas", "export", "--run-id", run_id, "--out", f"exported/trial-{run.data.tags['trial_number']}",
              "--tracking-uri", store_uri]  # fmt: skip
    assert browser.find_element(By.ID, "export-command").text == shlex.join(export)
    assert browser.find_element(By.ID, "mlflow-command").text == shlex.join(["mlflow", "ui", "--backend-store-uri", store_uri])
    assert run_id in browser.find_element(By.ID, "mlflow-path").text

    shot = tmp_path / "campaign.png"
    assert browser.save_screenshot(str(shot)) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert page_problems(browser, cli_app_url) == []

    # side by side: both fronts over one plot, the shared architectures with both latencies
    refs = "&".join(f"c={quote(truth.ref(n), safe='')}" for n in sorted(targets))
    open_page(browser, f"{cli_app_url}/compare?{refs}")
    for k, campaign in enumerate(sorted(targets)):
        assert set(trace(browser, "fronts", 2 * k + 1)["ids"]) == truth.tagged(campaign, "pareto")
    hashes = [{r.data.tags["arch_hash"] for r in truth.finished(n)} for n in sorted(targets)]
    shared = browser.find_elements(By.CSS_SELECTOR, "#shared tbody tr")
    assert sorted(r.get_attribute("data-arch") for r in shared) == sorted(hashes[0] & hashes[1])
    shared[0].find_element(By.CSS_SELECTOR, "button.link").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "panel").get_attribute("data-state") == "ready")
    browser.save_screenshot(str(tmp_path / "compare.png"))
    assert page_problems(browser, cli_app_url) == []


def test_markup_in_names_is_shown_as_text(browser, xss_app_url, xss_store_uri, markup, tmp_path):
    """Campaign name, run names and target hold markup: every page shows it literally.

    (The pages' CSP would also stop inline scripts; the text checks are what prove the escaping.)
    """
    from nas.tracking import Campaign

    XSS, XSS_RUN = markup
    experiment = Campaign(xss_store_uri, "plain").experiment_id
    browser.get_log("browser")
    open_page(browser, xss_app_url + "/")
    links = [a.text for a in browser.find_elements(By.CSS_SELECTOR, ".campaign-link")]
    assert XSS in links
    assert XSS_RUN in browser.find_element(By.ID, "campaigns").text  # the target column

    open_page(browser, f"{xss_app_url}/campaigns/{experiment}/{quote(XSS, safe='')}")
    assert browser.find_element(By.ID, "title").text == XSS
    assert browser.title.startswith(XSS)
    points = browser.find_elements(By.CSS_SELECTOR, "#plot .scatterlayer .trace:nth-of-type(1) path.point")
    ActionChains(browser).move_to_element(points[0]).perform()
    WebDriverWait(browser, 10).until(lambda d: XSS_RUN in d.find_element(By.CSS_SELECTOR, "#plot .hoverlayer").text)
    click_point(browser, "plot", TRIALS, 0)
    assert browser.find_element(By.ID, "trial-name").text == XSS_RUN
    assert browser.find_element(By.ID, "trial-title").text == f"trial 0 · {XSS_RUN}"  # a name of its own
    browser.save_screenshot(str(tmp_path / "markup.png"))

    open_page(browser, f"{xss_app_url}/compare?c={quote(f'{experiment}/{XSS}', safe='')}&c={experiment}/plain")
    assert XSS in browser.find_element(By.ID, "legend").text
    legend = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#fronts .legendtext")]
    assert sum(XSS in text for text in legend) == 2, legend  # its trials and its front
    assert browser.execute_script("return typeof window.__xss") == "undefined"
    assert page_problems(browser, xss_app_url) == []


def test_no_colour_bar_without_gflops(browser, xss_app_url, xss_store_uri):
    """Trials without a ``gflops`` metric: one colour and no colour bar (it ran from -0.4 to 0.4)."""
    from nas.tracking import Campaign

    experiment = Campaign(xss_store_uri, "plain").experiment_id
    browser.get_log("browser")
    open_page(browser, f"{xss_app_url}/campaigns/{experiment}/plain")
    points = browser.find_elements(By.CSS_SELECTOR, "#plot .scatterlayer .trace:nth-of-type(1) path.point")
    assert len(points) == 6
    assert browser.execute_script("return document.getElementById('plot').data[0].marker.showscale") is False
    assert not browser.find_elements(By.CSS_SELECTOR, "#plot .colorbar")
    assert page_problems(browser, xss_app_url) == []


def test_an_adaptive_campaign_shows_its_front_and_budgets(browser, sqlite_tracking_uri, fill, app_for, truth_of):
    """Members of ``adavit-deit`` (a timm model and its usage budgets) plot and draw like any other."""
    campaign = fill(sqlite_tracking_uri, "budgets", "cpu:threads=1,batch=1", 1.0, (0.8, 0.02), range(10),
                    space_name="adavit-deit")  # fmt: skip
    truth = truth_of(sqlite_tracking_uri)
    runs = {r.info.run_id: r for r in truth.finished("budgets")}
    front = truth.tagged("budgets", "pareto")
    assert 0 < len(front) < len(runs)
    browser.get_log("browser")
    with app_for(sqlite_tracking_uri) as url:
        open_page(browser, f"{url}/campaigns/{campaign.experiment_id}/budgets")
        assert trace(browser, "plot", TRIALS)["ids"] == list(runs)
        shown = trace(browser, "plot", FRONT)
        assert set(shown["ids"]) == front and shown["x"] == sorted(shown["x"])
        for i in range(len(front)):
            click_point(browser, "plot", FRONT, i)
            run_id = browser.find_element(By.ID, "panel").get_attribute("data-run-id")
            arch = truth.arch(run_id)
            drawn = browser.find_element(By.ID, "arch")
            assert f"timm {arch.model} · {arch.image_size} px" in drawn.text
            assert json.loads(drawn.find_element(By.TAG_NAME, "pre").text) == arch.schedule
        assert page_problems(browser, url) == []
