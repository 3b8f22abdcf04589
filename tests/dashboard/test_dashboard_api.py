"""The dashboard's JSON API, pages and assets against a real MLflow store, without a browser."""

from __future__ import annotations

import gc
import gzip
import importlib.resources
import json
import shlex
import socket
import sqlite3
import struct
import threading
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser
from urllib.parse import quote, urlsplit

import pytest
from nas.dashboards.data import TTLCache, collector_paused, open_client
from sqlalchemy.engine import make_url

from nas.cli import build_parser
from nas.errors import UserError
from nas.names import CAMPAIGN
from nas.pareto import best_under_budget
from nas.tracking import run_url


def fetch(url: str, method: str = "GET", headers: dict | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def get_json(url: str, status: int = 200) -> dict:
    code, headers, body = fetch(url)
    assert code == status and headers["Content-Type"] == "application/json", body[:300]
    return json.loads(body)


def trials_url(app_url: str, truth, name: str) -> str:
    return f"{app_url}/api/campaigns/{truth.experiment_id}/{quote(name, safe='')}/trials"


def test_campaign_list_matches_the_store(app_url, truth, targets):
    data = get_json(f"{app_url}/api/campaigns?budgets=1.5")
    assert data["budgets"] == sorted({1.5, *(t[1] for t in targets.values())})
    assert [c["name"] for c in data["campaigns"]] == sorted(targets)
    for row in data["campaigns"]:
        runs = truth.finished(row["name"])
        target, budget, *_ = targets[row["name"]]
        assert (row["target"], row["space"], row["budget_ms"]) == (target, "psvit-digits", budget)
        assert (row["trials"], row["failed"], row["running"]) == (len(runs), 1, 0)
        assert row["front"] == len(truth.tagged(row["name"], "pareto"))
        assert {row["best_own"]["run_id"]} == truth.tagged(row["name"], "best_under_budget")
        acc = [r.data.metrics["val_accuracy"] for r in runs]
        lat = [r.data.metrics["latency_ms"] for r in runs]
        for b, pick in zip(data["budgets"], row["best"], strict=True):
            i = best_under_budget(acc, lat, b)
            assert (pick and pick["run_id"]) == (None if i is None else runs[i].info.run_id)
        assert row["best_any"]["accuracy"] == max(acc)


def test_points_and_front_match_the_store(app_url, truth, targets):
    for name in targets:
        data = get_json(trials_url(app_url, truth, name))
        runs = {r.info.run_id: r for r in truth.finished(name)}
        assert [p["run_id"] for p in data["points"]] == list(runs)  # by trial number
        for p in data["points"]:
            metrics = runs[p["run_id"]].data.metrics
            assert {k: p[k] for k in metrics} == metrics
            assert p["run_name"] == runs[p["run_id"]].info.run_name
        assert set(data["front"]) == truth.tagged(name, "pareto")
        lats = [runs[r].data.metrics["latency_ms"] for r in data["front"]]
        assert lats == sorted(lats)
        assert {data["best_under_budget"]} == truth.tagged(name, "best_under_budget")
        assert data["not_plotted"] == 1  # the failed trial


def test_trial_detail_draws_the_architecture(app_url, truth, store_uri):
    run = truth.finished("digits-cpu")[3]
    run_id = run.info.run_id
    detail = get_json(f"{app_url}/api/trials/{run_id}")
    arch = truth.arch(run_id)
    drawn = detail["arch"]
    assert (drawn["grid"], drawn["num_classes"]) == (arch.grid, arch.num_classes)
    assert [[c["kind"] for c in s["cells"]] for s in drawn["stages"]] == [list(s.cells) for s in arch.stages]
    assert [[c["tokens"] for c in s["cells"]] for s in drawn["stages"]] == arch.token_trace()
    assert [(s["dim"], s["heads"], s["pool"], s["attention"]) for s in drawn["stages"]] == [
        (s.dim, s.heads, s.pool, s.attention) for s in arch.stages
    ]
    assert [s["tokens_before"] for s in drawn["stages"]] == [arch.grid**2 + 1] + [s.exit_tokens for s in arch.stages[:-1]]
    assert detail["metrics"] == run.data.metrics
    assert detail["arch_yaml"] == arch.to_yaml()
    number = run.data.tags["trial_number"]
    assert detail["export_command"] == shlex.join(
        ["vitnas", "export", "--run-id", run_id, "--out", f"exported/trial-{number}", "--tracking-uri", store_uri]
    )
    assert detail["mlflow"] == {
        "command": f"mlflow ui --backend-store-uri {shlex.quote(store_uri)}",
        "path": f"#/experiments/{truth.experiment_id}/runs/{run_id}",
    }


def test_a_server_store_links_every_run_to_its_page(mlflow_server, fill, app_for):
    """Through a real ``mlflow server``: arch.yaml comes through its artifact proxy, the link is the run page."""
    campaign = fill(mlflow_server, "dashboard-on-server", "cpu", 2.0, (60.0, 0.1), range(3), failed=False)
    with app_for(mlflow_server) as url:
        listed = get_json(f"{url}/api/campaigns")["campaigns"]
        assert "dashboard-on-server" in [c["name"] for c in listed]
        run = campaign.trial_runs()[0]
        detail = get_json(f"{url}/api/trials/{run.run_id}")
    assert detail["mlflow"] == {"url": run_url(mlflow_server, campaign.experiment_id, run.run_id)}
    assert detail["arch"]["family"] == "psvit" and detail["arch_hash"] == run.arch_hash


def test_compare_lists_the_architectures_both_targets_measured(app_url, truth, targets):
    names = sorted(targets)
    query = "&".join(f"c={quote(truth.ref(n), safe='')}" for n in names)
    data = get_json(f"{app_url}/api/compare?{query}")
    assert [c["campaign"]["name"] for c in data["campaigns"]] == names and data["same_space"]
    first = [{} for _ in names]
    for by_hash, name in zip(first, names):
        for r in truth.finished(name):
            by_hash.setdefault(r.data.tags["arch_hash"], r)
    assert [s["arch_hash"] for s in data["shared"]] == sorted(set(first[0]) & set(first[1]))
    for row in data["shared"]:
        for point, by_hash in zip(row["runs"], first, strict=True):
            run = by_hash[row["arch_hash"]]
            assert (point["run_id"], point["latency_ms"]) == (run.info.run_id, run.data.metrics["latency_ms"])


class _Assets(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script":
            self.urls.append(attrs.get("src") or "")
        if tag == "link":
            self.urls.append(attrs.get("href") or "")


def test_pages_load_everything_from_the_dashboard_itself(app_url, truth):
    for page in ("/", f"/campaigns/{truth.experiment_id}/digits-cpu", "/compare?c=a&c=b"):
        code, headers, body = fetch(app_url + page)
        assert code == 200 and headers["Content-Type"].startswith("text/html")
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        parser = _Assets()
        parser.feed(body.decode())
        assert parser.urls and all(u.startswith("/static/") and "http" not in u for u in parser.urls), parser.urls
        for url in parser.urls:
            assert fetch(app_url + url)[0] == 200, url
    shipped = (importlib.resources.files("plotly") / "package_data" / "plotly.min.js").read_bytes()
    code, headers, body = fetch(f"{app_url}/static/plotly.min.js", headers={"Accept-Encoding": "gzip"})
    assert headers["Content-Encoding"] == "gzip" and gzip.decompress(body) == shipped


def _dump(store_uri: str) -> list[str]:
    with sqlite3.connect(make_url(store_uri).database) as con:
        return list(con.iterdump())


def test_reading_writes_nothing(app_url, truth, store_uri):
    before = _dump(store_uri)
    run_id = truth.finished("digits-gpu")[0].info.run_id
    for path in ("/api/campaigns", f"/api/trials/{run_id}", f"/api/compare?c={truth.ref('digits-cpu')}&c={truth.ref('digits-gpu')}"):
        assert fetch(app_url + path)[0] == 200
    assert fetch(f"{app_url}/api/campaigns", method="POST")[0] == 501
    assert fetch(f"{app_url}/api/trials/{run_id}", method="DELETE")[0] == 501
    assert _dump(store_uri) == before


@pytest.mark.parametrize(
    ("path", "status"),
    [("/api/campaigns/0/no-such-campaign/trials", 404), ("/api/trials/" + "0" * 32, 404), ("/nothing", 404),
     ("/api/compare?c=0/one", 400), ("/api/campaigns?budgets=fast", 400), ("/api/trials/..%2F..", 404),
     ("/campaigns/0/no-such-campaign", 404), ("/campaigns/1/nope", 404)],
)  # fmt: skip
def test_bad_requests_get_a_json_error(app_url, path, status):
    assert "error" in get_json(app_url + path, status)


def test_requests_for_other_host_names_are_refused(app_url):
    code, _, body = fetch(f"{app_url}/api/campaigns", headers={"Host": "attacker.example"})
    assert code == 403 and b"127.0.0.1" in body


def test_missing_or_file_stores_are_refused_without_creating_one(tmp_path):
    db = tmp_path / "nothing" / "mlflow.db"
    with pytest.raises(UserError, match="no MLflow database"):
        open_client(f"sqlite:///{db}")
    assert not db.parent.exists()
    with pytest.raises(UserError, match="sqlite:///"):
        open_client(str(tmp_path / "mlruns"))


def test_cache_reloads_only_after_its_ttl():
    now, loads = [0.0], []
    cache = TTLCache(30.0, clock=lambda: now[0])
    load = lambda: loads.append(1) or len(loads)  # noqa: E731
    assert cache.get("k", load) == 1
    now[0] = 29.0
    assert cache.get("k", load) == 1
    now[0] = 31.0
    assert cache.get("k", load) == 2 and len(loads) == 2


def test_collection_resumes_when_the_last_load_ends():
    assert gc.isenabled()
    with collector_paused():
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_cli_binds_this_machine_by_default():
    args = build_parser().parse_args(["dashboard", "--tracking-uri", "sqlite:///x.db"])
    assert (args.host, args.port, args.tracking_uri) == ("127.0.0.1", 8765, "sqlite:///x.db")


# -- hostile names and requests (issue 13, item 10) -----------------------------------------------
#: Campaign names a store may hold though ``Campaign`` refuses them now (an older vitnas, another
#: tool): each is pasted into an MLflow filter. The last two match one LIKE pattern (``both _ and _``).
ODD_NAMES = {"it's": 2, 'say "hi"': 3, "100%_ \\done": 1, "both ' and \"": 2, "both x and y": 3}


def test_campaign_names_with_quotes_are_listed_and_read(sqlite_tracking_uri, fill, app_for):
    from mlflow import MlflowClient

    client = MlflowClient(sqlite_tracking_uri)
    for i, (name, trials) in enumerate(ODD_NAMES.items()):
        campaign = fill(sqlite_tracking_uri, f"odd-{i}", "cpu", 2.0, (60.0, 0.1), range(trials), failed=False)
        for run in client.search_runs([campaign.experiment_id], f"tags.`{CAMPAIGN}` = 'odd-{i}'"):
            client.set_tag(run.info.run_id, CAMPAIGN, name)
    with app_for(sqlite_tracking_uri) as url:
        listed = get_json(f"{url}/api/campaigns")["campaigns"]
        assert {c["name"]: c["trials"] for c in listed} == ODD_NAMES
        for c in listed:
            path = f"campaigns/{c['experiment_id']}/{quote(c['name'], safe='')}"
            assert len(get_json(f"{url}/api/{path}/trials")["points"]) == ODD_NAMES[c["name"]], c["name"]
            assert fetch(f"{url}/{path}")[0] == 200, c["name"]


def raw_request(app_url: str, request: bytes) -> tuple[bytes, bytes]:
    """Send bytes as they are (urllib cannot send ``OPTIONS *``); the response's head and body."""
    split = urlsplit(app_url)
    with socket.create_connection((split.hostname, split.port), timeout=60) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return head, body


@pytest.mark.parametrize("target", [b"*", b"?x", b"127.0.0.1:80"])
@pytest.mark.parametrize("method", [b"OPTIONS", b"GET"])
def test_a_request_target_that_is_no_path_is_a_bad_request(app_url, method, target, capfd):
    head, body = raw_request(app_url, method + b" " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert "request-target" in json.loads(body)["error"]
    assert "Traceback" not in capfd.readouterr().err


def test_an_absolute_url_is_served_as_its_path(app_url):
    def get(target: str) -> bytes:
        request = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        return raw_request(app_url, request.encode())[0]

    port = urlsplit(app_url).port
    for target in (f"http://127.0.0.1:{port}/api/campaigns", f"http://127.0.0.1:{port}"):
        assert get(target).startswith(b"HTTP/1.1 200 "), target
    assert get("http://attacker.example/api/campaigns").startswith(b"HTTP/1.1 403 ")  # its authority counts


def test_a_client_that_resets_mid_response_prints_no_traceback(app_url, capfd):
    def handlers() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if "process_request_thread" in t.name}

    before = handlers()
    split = urlsplit(app_url)
    with socket.create_connection((split.hostname, split.port), timeout=60) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close() resets
        sock.sendall(b"GET /static/plotly.min.js HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # megabytes
        assert sock.recv(12).startswith(b"HTTP/1.1 200")
    deadline = time.monotonic() + 60
    while handlers() - before and time.monotonic() < deadline:  # the handler meets the reset and ends
        time.sleep(0.05)
    assert not handlers() - before
    assert fetch(f"{app_url}/api/campaigns")[0] == 200
    assert "Traceback" not in capfd.readouterr().err
