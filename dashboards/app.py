"""The dashboard's web server: standard-library HTTP, a small read-only JSON API, local assets.

Pages are static HTML; their scripts fetch the API and build the DOM with ``textContent`` (never
markup from data). plotly.js is the file shipped inside the installed ``plotly`` package: nothing
is fetched from a CDN, the dashboard works offline. GET only; bound to 127.0.0.1 by default, where
requests naming another host are refused (a web page elsewhere cannot read the store through a
rebound DNS name).

Routes: ``/``, ``/campaigns/<experiment id>/<name>``, ``/compare?c=<ref>&c=<ref>``, ``/static/*``,
``/api/campaigns[?budgets=1,2.5]``, ``/api/campaigns/<experiment id>/<name>/trials``,
``/api/trials/<run id>``, ``/api/compare?c=<ref>&c=<ref>`` (a ref is ``<experiment id>/<name>``).
"""

from __future__ import annotations

import gzip
import importlib.resources
import ipaddress
import json
import math
import re
import socket
import sys
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

from mlflow.exceptions import MlflowException

from nas.errors import UserError

from . import payloads
from .data import NotFound, Store

HTML_PAGES = {"": "index.html", "campaigns": "campaign.html", "compare": "compare.html"}
TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".png": "image/png",
         ".svg": "image/svg+xml"}  # fmt: skip
#: plotly needs inline styles (it adds <style> elements); scripts only from this server.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")  # fmt: skip
RUN_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
GZIP_OVER = 64_000


class Assets:
    """The package's pages and static files, and plotly.min.js from the plotly package; each
    read once, gzipped once on first demand."""

    def __init__(self):
        root = importlib.resources.files("nas.dashboards")
        self.files = {
            f"/static/{f.name}": f for f in (root / "static").iterdir() if f.suffix in TYPES and f.is_file()
        }
        self.files["/static/plotly.min.js"] = importlib.resources.files("plotly") / "package_data" / "plotly.min.js"
        self.pages = {route: root / "templates" / name for route, name in HTML_PAGES.items()}
        self._bytes: dict[str, tuple[bytes, bytes | None]] = {}

    def get(self, key: str, resource, zipped: bool) -> bytes:
        body, gz = self._bytes.get(key, (None, None))
        if body is None:
            body = resource.read_bytes()
        if zipped and gz is None:
            gz = gzip.compress(body, compresslevel=6)
        self._bytes[key] = (body, gz)
        return gz if zipped else body


class DashboardServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], store: Store):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.store, self.assets = store, Assets()
        super().__init__(address, Handler)
        self.loopback_only = _is_loopback(address[0])

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Handler(BaseHTTPRequestHandler):
    server: DashboardServer
    server_version = "vitnas-dashboard"
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args) -> None:
        """Quiet: a page load is a dozen requests; errors are printed where they happen."""

    def handle_one_request(self) -> None:
        """A client that goes away (reset, closed mid-response) is not an error of the dashboard:
        nothing to answer and no traceback to print; the connection is closed."""
        try:
            super().handle_one_request()
        except ConnectionError:
            self.close_connection = True

    def parse_request(self) -> bool:
        """Only a path (``/...``) or an absolute URL names a resource here: any other request-target
        (``*`` of ``OPTIONS *``, ``?x``, ``host:port``) gets a 400, not a crash in routing. An absolute
        URL (``GET http://host/path``) is served as its path; its authority stands for Host (RFC 9112)."""
        if not super().parse_request():
            return False
        self.target_host = None
        target = urlsplit(self.path)
        if target.scheme in ("http", "https") and target.netloc:
            self.target_host = target.netloc
            self.path = urlunsplit(("", "", target.path or "/", target.query, ""))
        elif not self.path.startswith("/"):
            self.close_connection = True
            error = f"request-target {self.path!r}: ask for a path, e.g. /"
            self._send_json({"error": error}, HTTPStatus.BAD_REQUEST)
            return False
        return True

    def do_GET(self) -> None:
        if self.server.loopback_only and not self._host_is_loopback():
            self._send_json({"error": "this dashboard answers requests for 127.0.0.1/localhost only"}, 403)
            return
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        query = parse_qs(url.query)
        try:
            if parts[0] == "api":
                self._send_json(self._api(parts[1:], query))
            elif url.path in self.server.assets.files:
                self._send_file(url.path, self.server.assets.files[url.path], "public, max-age=3600")
            elif self._is_page(parts):
                if parts[0] == "campaigns":  # a page for a campaign the store does not hold is a 404
                    self.server.store.campaign(f"{parts[1]}/{parts[2]}")
                page = self.server.assets.pages[parts[0]]
                self._send_file(parts[0], page, "no-cache", {"Content-Security-Policy": CSP})
            elif url.path == "/favicon.ico":
                self._send(b"", "image/x-icon", HTTPStatus.NO_CONTENT)
            else:
                raise NotFound(f"no page {url.path}")
        except ConnectionError:
            raise  # the client is gone: nothing to answer (``handle_one_request``)
        except NotFound as err:
            self._send_json({"error": str(err)}, HTTPStatus.NOT_FOUND)
        except UserError as err:
            self._send_json({"error": str(err)}, HTTPStatus.BAD_REQUEST)
        except MlflowException as err:
            self._send_json({"error": f"MLflow: {err.message}"}, HTTPStatus.BAD_GATEWAY)
        except Exception as err:  # the page shows the message; the console gets the traceback
            traceback.print_exc(file=sys.stderr)
            self._send_json({"error": f"{type(err).__name__}: {err}"}, HTTPStatus.INTERNAL_SERVER_ERROR)

    do_HEAD = do_GET

    @staticmethod
    def _is_page(parts: list[str]) -> bool:
        return parts == [""] or parts == ["compare"] or (len(parts) == 3 and parts[0] == "campaigns")

    def _host_is_loopback(self) -> bool:
        host = self.target_host or self.headers.get("Host", "")
        name = host[1:].split("]")[0] if host.startswith("[") else host.rsplit(":", 1)[0]
        return name.lower() in LOOPBACK_NAMES

    # -- the API --
    def _api(self, parts: list[str], query: dict[str, list[str]]) -> dict:
        store = self.server.store
        if parts == ["campaigns"]:
            infos = store.campaigns()
            budgets = payloads.list_budgets(infos, _floats(query.get("budgets", [""])[0]))
            return {
                "tracking_uri": store.tracking_uri,
                "budgets": budgets,
                "campaigns": [payloads.campaign_summary(i, store.trials(i), budgets) for i in infos],
            }
        if len(parts) == 4 and parts[0] == "campaigns" and parts[3] == "trials":
            info = store.campaign(f"{parts[1]}/{parts[2]}")
            return payloads.campaign_points(info, store.trials(info), store.ranking(info))
        if len(parts) == 2 and parts[0] == "trials" and RUN_ID.fullmatch(parts[1]):
            run, arch_text = store.run(parts[1])
            return payloads.trial_detail(store.tracking_uri, run, arch_text)
        if parts == ["compare"]:
            refs = list(dict.fromkeys(query.get("c", [])))
            if len(refs) < 2:
                raise UserError("compare needs two or more campaigns: ?c=<experiment id>/<name>&c=...")
            infos = [store.campaign(r) for r in refs]
            return payloads.compare(infos, [store.trials(i) for i in infos])
        raise NotFound(f"no API route /api/{'/'.join(parts)}")

    # -- responses --
    def _send_json(self, payload: dict, status: int = HTTPStatus.OK) -> None:
        body = json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()
        zipped = len(body) > GZIP_OVER and self._accepts_gzip()
        self._send(gzip.compress(body, compresslevel=1) if zipped else body, "application/json", status,
                   {"Cache-Control": "no-store", **({"Content-Encoding": "gzip"} if zipped else {})})  # fmt: skip

    def _send_file(self, key: str, resource, cache: str, headers: dict | None = None) -> None:
        zipped = self._accepts_gzip()
        body = self.server.assets.get(key, resource, zipped)
        extra = {"Cache-Control": cache, **(headers or {}), **({"Content-Encoding": "gzip"} if zipped else {})}
        ctype = TYPES["." + resource.name.rsplit(".", 1)[-1]]
        self._send(body, f"{ctype}; charset=utf-8" if ctype.startswith("text/") else ctype, HTTPStatus.OK, extra)

    def _accepts_gzip(self) -> bool:
        return "gzip" in self.headers.get("Accept-Encoding", "")

    def _send(self, body: bytes, ctype: str, status: int, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _floats(text: str) -> list[float]:
    """``budgets=1,2.5`` as floats; ``UserError`` on anything else."""
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise UserError(f"budgets={text!r}: give latencies in ms separated by commas, e.g. 1,2.5") from None
    return [v for v in values if math.isfinite(v) and v > 0]


def make_server(tracking_uri: str, host: str = "127.0.0.1", port: int = 8765, ttl_s: float = 30.0) -> DashboardServer:
    """A bound server (port 0: any free port, see ``server.url``); ``serve_forever`` starts it."""
    store = Store(tracking_uri, ttl_s)
    try:
        return DashboardServer((host, port), store)
    except OSError as err:
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror or err}; choose another --host/--port") from None


def serve(tracking_uri: str, host: str = "127.0.0.1", port: int = 8765, ttl_s: float = 30.0) -> None:
    """Serve until Ctrl-C."""
    server = make_server(tracking_uri, host, port, ttl_s)
    print(f"vitnas dashboard: {server.url} (reading {tracking_uri}, read-only; Ctrl-C stops)", flush=True)
    if not server.loopback_only:
        print(f"warning: listening on {host}: anyone who can reach it can read the store", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
