"""The viewer's HTTP server: Python's standard ``http.server``, one thread per request, no dependency.

Routes (``sid`` = the page's session id, in the query string; docs/serve.md documents each, and a test holds
its table equal to :data:`ROUTES` and :data:`STATIC`):

    GET  /                         the page (static/index.html, app.js, style.css; nothing from the network)
    POST /api/session              new session -> {sid, model, examples, limits, colours}
    POST /api/close, /api/ping     the page is closed (files deleted) / still open
    POST /api/open                 multipart upload: one image, a NIfTI, a DICOM zip or a folder's files
    POST /api/example              {"id": "p0011_s01"}: a bundled RefLiver-Synth test slice
    GET  /api/image.png            ?slice&window: the slice as shown
    POST /api/predict              {slice, texts, threshold, window, features}: overlays, probability, F1..F4
    GET  /api/mask.png             ?slice&text&threshold: the mask, 0/255 PNG (the bytes lsms predict writes)
    GET  /api/mask.nii.gz          ?text&threshold: the predicted slices in the input's geometry
    GET  /api/settings.json        ?slice&threshold&window&text...: the settings used
    POST /api/volume, GET /api/volume   start / poll the whole-volume prediction

Security: binds 127.0.0.1 by default; while bound to a loopback address it answers only requests whose
``Host`` header names a loopback host (no DNS rebinding); a request that carries an ``Origin`` other than
the viewer's own (another web site's script) is refused; responses forbid framing, sniffing, caching and
any script or style from elsewhere (Content-Security-Policy ``default-src 'self'``).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import sys
import threading
from email import policy
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from lsms.serve.app import Viewer
from lsms.serve.errors import ServeError

log = logging.getLogger("lsms.serve")

STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/static/style.css": ("style.css", "text/css; charset=utf-8")}
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
MAX_JSON_BYTES = 1 << 20
# the browser went away mid-request (tab closed, page reloaded, download cancelled): nobody is left to answer,
# and nothing is wrong with the server; logged at debug level, never as an error with a traceback
DROPPED = (ConnectionError, TimeoutError)  # BrokenPipeError, ConnectionResetError, ConnectionAbortedError, ...


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ViewerServer(ThreadingHTTPServer):
    """A threading HTTP server that owns a :class:`Viewer` and a reaper for closed pages."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, viewer: Viewer, host: str = "127.0.0.1", port: int = 7860):
        self.viewer = viewer
        self.loopback = is_loopback(host)
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), Handler)
        self._stop = threading.Event()
        threading.Thread(target=self._reap, name="reaper", daemon=True).start()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}/"

    def _reap(self) -> None:
        while not self._stop.wait(30.0):
            self.viewer.reap()

    def handle_error(self, request, client_address) -> None:
        err = sys.exc_info()[1]
        if isinstance(err, DROPPED):
            log.debug("connection from %s dropped: %s", client_address[0], err)
        else:
            log.exception("request from %s failed", client_address[0])

    def server_close(self) -> None:
        self._stop.set()
        super().server_close()
        self.viewer.close()


class Handler(BaseHTTPRequestHandler):
    server: ViewerServer
    server_version = "lsms-serve"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    # ------------------------------------------------------------------ dispatch

    def _handle(self, method: str) -> None:
        self._consumed = False  # whether the request body was read (see _refuse)
        url = urlsplit(self.path)
        query = parse_qs(url.query, keep_blank_values=True)
        try:
            self._check_host()
            if method == "GET" and url.path in STATIC:
                name, ctype = STATIC[url.path]
                self._send(200, resources.files("lsms.serve").joinpath("static", name).read_bytes(), ctype)
                return
            route = ROUTES.get((method, url.path))
            if route is None:
                raise ServeError(404, f"no such page: {method} {url.path}")
            route(self, query)
        except ServeError as err:
            log.warning("%s %s -> %d: %s", method, url.path, err.status, err)
            self._refuse(err.status, str(err))
        except DROPPED as err:  # the answer could not be sent: the page is gone
            self.close_connection = True
            log.debug("%s %s: connection from %s dropped: %s", method, url.path, self.client_address[0], err)
        except Exception as err:  # a bug: say so on the page and in the log, keep serving
            log.exception("%s %s failed", method, url.path)
            self._refuse(500, f"internal error ({type(err).__name__}: {err}); the server log has details")

    def _refuse(self, status: int, message: str) -> None:
        if not self._consumed and (self.headers.get("Content-Length") or "0").strip() != "0":
            self.close_connection = True  # an unread body would be taken for the next request on this connection
        self._json(status, {"error": message})

    def _check_host(self) -> None:
        origin = self.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != self.headers.get("Host"):
            raise ServeError(403, f"a request from another site ({origin}) refused: only this viewer's own page may "
                                  "call it")
        if not self.server.loopback:
            return
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
        if host and not is_loopback(host):
            raise ServeError(403, f"Host {host!r} refused: this viewer is bound to a loopback address and answers "
                                  "only http://127.0.0.1 or http://localhost")

    def _body(self) -> bytes:
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise ServeError(400, "bad Content-Length") from None
        limit = self.server.viewer.max_upload_bytes + (1 << 20)
        if n > limit:
            self.close_connection = True
            raise ServeError(413, f"the upload is {n / 2**20:.0f} MB; the limit is "
                                  f"{self.server.viewer.max_upload_bytes / 2**20:.0f} MB (lsms serve --max-upload-mb)")
        self._consumed = True
        return self.rfile.read(n) if n else b""

    def _json_body(self) -> dict[str, Any]:
        body = self._body()
        if len(body) > MAX_JSON_BYTES:
            raise ServeError(413, "request too large")
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            raise ServeError(400, "the request body is not JSON") from None
        if not isinstance(data, dict):
            raise ServeError(400, "the request body must be a JSON object")
        return data

    def _send(self, status: int, body: bytes, ctype: str, filename: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in HEADERS.items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        if filename:
            self.send_header("Content-Disposition", f"attachment; filename*=UTF-8''{quote(filename)}")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, data: Any, filename: str | None = None) -> None:
        self._send(status, json.dumps(data, indent=2 if filename else None).encode(), "application/json", filename)

    # ------------------------------------------------------------------ routes

    def api_session(self, q: dict) -> None:
        self._body()
        self._json(200, self.server.viewer.new_session())

    def api_close(self, q: dict) -> None:
        self._body()
        self.server.viewer.close_session(_one(q, "sid"))
        self._json(200, {"closed": True})

    def api_ping(self, q: dict) -> None:
        self._body()
        self._json(200, self.server.viewer.ping(_one(q, "sid")))

    def api_open(self, q: dict) -> None:
        sid = _one(q, "sid")
        self.server.viewer.session(sid)  # fail before reading a large body for an ended session
        files = _multipart(self.headers.get("Content-Type", ""), self._body())
        self._json(200, self.server.viewer.open_upload(sid, files))

    def api_example(self, q: dict) -> None:
        body = self._json_body()
        self._json(200, self.server.viewer.open_example(_one(q, "sid"), str(body.get("id", ""))))

    def api_image(self, q: dict) -> None:
        png = self.server.viewer.image_png(_one(q, "sid"), _int(q, "slice"), _one(q, "window"))
        self._send(200, png, "image/png")

    def api_predict(self, q: dict) -> None:
        b = self._json_body()
        self._json(200, self.server.viewer.predict(
            _one(q, "sid"), b.get("slice"), b.get("texts"), b.get("threshold", 0.5),
            str(b.get("window", "model input")), bool(b.get("features", False))))

    def api_mask_png(self, q: dict) -> None:
        k = _int(q, "slice")
        png = self.server.viewer.mask_png(_one(q, "sid"), k, _one(q, "text"), _one(q, "threshold"))
        self._send(200, png, "image/png", filename=_one(q, "name", "mask.png"))

    def api_mask_nifti(self, q: dict) -> None:
        data = self.server.viewer.mask_nifti(_one(q, "sid"), _one(q, "text"), _one(q, "threshold"))
        self._send(200, data, "application/gzip", filename=_one(q, "name", "mask.nii.gz"))

    def api_settings(self, q: dict) -> None:
        data = self.server.viewer.settings(_one(q, "sid"), _int(q, "slice"), q.get("text", []),
                                           _one(q, "threshold"), _one(q, "window"))
        self._json(200, data, filename=_one(q, "name", "settings.json"))

    def api_volume_start(self, q: dict) -> None:
        b = self._json_body()
        self._json(200, self.server.viewer.start_volume(_one(q, "sid"), b.get("texts"), b.get("threshold", 0.5)))

    def api_volume_progress(self, q: dict) -> None:
        self._json(200, self.server.viewer.volume_progress(_one(q, "sid")))


ROUTES = {
    ("POST", "/api/session"): Handler.api_session,
    ("POST", "/api/close"): Handler.api_close,
    ("POST", "/api/ping"): Handler.api_ping,
    ("POST", "/api/open"): Handler.api_open,
    ("POST", "/api/example"): Handler.api_example,
    ("GET", "/api/image.png"): Handler.api_image,
    ("POST", "/api/predict"): Handler.api_predict,
    ("GET", "/api/mask.png"): Handler.api_mask_png,
    ("GET", "/api/mask.nii.gz"): Handler.api_mask_nifti,
    ("GET", "/api/settings.json"): Handler.api_settings,
    ("POST", "/api/volume"): Handler.api_volume_start,
    ("GET", "/api/volume"): Handler.api_volume_progress,
}


def _one(q: dict, key: str, default: str | None = None) -> str:
    values = q.get(key)
    if not values:
        if default is not None:
            return default
        raise ServeError(400, f"missing query parameter {key!r}")
    return values[0]


def _int(q: dict, key: str) -> int:
    value = _one(q, key)
    try:
        return int(value)
    except ValueError:
        raise ServeError(400, f"{key} must be an integer, got {value!r}") from None


def _multipart(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """(file name, bytes) of each file in a multipart/form-data body (the name may hold a folder path)."""
    if not content_type.startswith("multipart/form-data"):
        raise ServeError(400, "upload files as multipart/form-data")
    msg = BytesParser(policy=policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\nMIME-Version: 1.0\r\n\r\n" + body)
    if not msg.is_multipart():
        raise ServeError(400, "the upload is not a valid multipart body")
    files = []
    for part in msg.iter_parts():
        name = part.get_filename()
        if name:
            files.append((name, part.get_payload(decode=True) or b""))
    return files
