"""An HTTP proxy that records every request's headers and can rewrite answers, for tests on real servers.

* `state.requests`: (method, path, headers) of every request, so a test can assert which conditional
  headers (If-None-Match / If-Match) a client sent, e.g. none at all in --single-writer mode.
* `state.tear(match, times)`: the next `times` GETs whose path `match`es get the first half of the
  object's body with a matching Content-Length - what a store without atomic PUT returns when read
  during a write (a torn read). Unlike a connection cut mid-body, the client cannot tell from the
  framing (and no checksum header comes with it): only parsing finds it.

Headers are forwarded untouched (SigV4 signatures stay valid, so it works in front of Ceph RGW too).
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.kit.proxy import read_request_body

HOP = ("transfer-encoding", "connection", "content-length", "keep-alive")


@dataclass
class SpyState:
    upstream: str
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    tears: list[list] = field(default_factory=list)  # [match, times left]
    torn: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def tear(self, match: Callable[[str], bool], times: int = 1) -> None:
        with self.lock:
            self.tears.append([match, times])

    def _take_tear(self, method: str, path: str) -> bool:
        with self.lock:
            for t in self.tears:
                if method == "GET" and t[1] > 0 and t[0](path):
                    t[1] -= 1
                    self.torn += 1
                    return True
        return False

    def conditional(self, method: str = "PUT", since: int = 0) -> list[tuple[str, str, str]]:
        """(path, header, value) of every If-None-Match / If-Match sent with `method`, from request
        number `since` on."""
        with self.lock:
            return [(p, k.lower(), v) for m, p, h in self.requests[since:] if m == method for k, v in h.items()
                    if k.lower() in ("if-none-match", "if-match")]

    def count(self, method: str | None = None, contains: str = "") -> int:
        with self.lock:
            return sum(1 for m, p, _ in self.requests if (method is None or m == method) and contains in p)


def _handler(state: SpyState):
    host, port = state.upstream.removeprefix("http://").split(":")

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _serve(self) -> None:
            body = read_request_body(self)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
            with state.lock:
                state.requests.append((self.command, self.path, dict(headers)))
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            try:
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                resp_headers = resp.getheaders()
            finally:
                conn.close()
            if resp.status == 200 and data and state._take_tear(self.command, self.path):
                data = data[: len(data) // 2]
                # a store that serves a half-written object has no checksum of it to send either
                resp_headers = [(k, v) for k, v in resp_headers if not k.lower().startswith("x-amz-checksum")]
            self.send_response(resp.status, resp.reason)
            for k, v in resp_headers:
                if k.lower() not in HOP:
                    self.send_header(k, v)
            if self.command == "HEAD":
                self.send_header("Content-Length", {k.lower(): v for k, v in resp_headers}.get("content-length", "0"))
                self.end_headers()
                return
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _safe(self) -> None:
            try:
                self._serve()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _safe

    return H


@contextmanager
def spy_proxy(upstream: str) -> Iterator[tuple[str, SpyState]]:
    """A recording proxy in front of `upstream` (http://host:port); yields (its URL, its state)."""
    state = SpyState(upstream)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    srv.daemon_threads = True
    srv.handle_error = lambda request, client_address: None
    t = threading.Thread(target=srv.serve_forever, name="spy-proxy", daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_port}", state
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(timeout=5)
