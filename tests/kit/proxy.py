"""One fault-injecting HTTP proxy between boto3 (in the test process or in real `pfx` subprocesses) and
the S3 server, in threads of the test process. Per request it can:

  500 / 503          answer InternalError / SlowDown without forwarding
  reset              close the connection (RST) without forwarding
  drop               forward (the server applies the write), then RST: the client never sees the reply
  truncate           forward, send the headers and half the body, then RST
  corrupt            flip one byte in the middle of the body (wrong bytes, right length): of the reply,
                     or, for a PUT, of the request on its way to the server
  stall              forward, then send nothing for `stall_s` seconds and close
  stall-body         forward, send headers and half the body, stall `stall_s`, close
  strip-conditional  forward without If-None-Match / If-Match (a store that ignores conditional writes)
  tear               a GET answered with the first half of the object and a matching Content-Length, no
                     checksum: a torn read of a store without atomic PUT (`state.tear(match, times)`)

Faults come from rules (`Rule(match, action, times)`: the first rule that matches and has times left)
and/or a seeded random mode (`state.chaos`). `state.strip_conditional` strips the conditional headers
of every request; `state.delay_s` adds latency to every request (widens the windows a kill -9 can land
in). Every request is logged as (method, path, action), and its headers as sent (`state.requests`,
`state.conditional()`), so tests can count requests and faults and see which conditional headers a client
sent. Headers are forwarded untouched unless stripped, so SigV4 signatures stay valid in front of Ceph RGW too.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ACTIONS = ("500", "503", "reset", "drop", "truncate", "corrupt", "stall", "stall-body", "strip-conditional", "tear")


@dataclass
class Rule:
    """Apply `action` to the next `times` requests for which `match(method, path)` is true."""

    match: Callable[[str, str], bool]
    action: str
    times: int = 1


@dataclass
class ProxyState:
    upstream: str
    rules: list[Rule] = field(default_factory=list)
    chaos: tuple[random.Random, float, tuple[str, ...]] | None = None  # (rng, rate, actions)
    chaos_match: Callable[[str, str], bool] = lambda m, p: True
    strip_conditional: bool = False
    delay_s: float = 0.0
    stall_s: float = 2.0
    log: list[tuple[str, str, str | None]] = field(default_factory=list)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)  # (method, path, headers sent)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, method: str, path: str) -> str | None:
        with self.lock:
            action = None
            for r in self.rules:
                if r.times > 0 and r.match(method, path):
                    r.times -= 1
                    action = r.action
                    break
            if action is None and self.chaos is not None and self.chaos_match(method, path):
                rng, rate, actions = self.chaos
                if rng.random() < rate:
                    action = rng.choice(actions)
            self.log.append((method, path, action))
            return action

    def count(self, method: str | None = None, contains: str = "") -> int:
        """Requests seen so far (of `method`, or all; whose path contains `contains`)."""
        with self.lock:
            return sum(1 for m, p, _ in self.log if (method is None or m == method) and contains in p)

    def tear(self, match: Callable[[str], bool], times: int = 1) -> None:
        """The next `times` GETs whose path `match`es get the first half of the object's body with a matching
        Content-Length and no checksum header: what a store without atomic PUT returns when read during a write
        (a torn read). Unlike a connection cut mid-body, the client cannot tell from the framing; only parsing
        finds it."""
        with self.lock:
            self.rules.append(Rule(lambda m, p: m == "GET" and match(p), "tear", times))

    @property
    def torn(self) -> int:
        return self.injected().get("tear", 0)

    def conditional(self, method: str = "PUT", since: int = 0) -> list[tuple[str, str, str]]:
        """(path, header, value) of every If-None-Match / If-Match the client sent with `method`, from request
        number `since` on."""
        with self.lock:
            return [(p, k.lower(), v) for m, p, h in self.requests[since:] if m == method for k, v in h.items()
                    if k.lower() in ("if-none-match", "if-match")]

    def injected(self) -> dict[str, int]:
        """Faults injected so far, by action."""
        with self.lock:
            out: dict[str, int] = {}
            for _, _, a in self.log:
                if a:
                    out[a] = out.get(a, 0) + 1
            return out


def _error_body(code: str, msg: str) -> bytes:
    return f"<Error><Code>{code}</Code><Message>{msg}</Message></Error>".encode()


def read_request_body(h: BaseHTTPRequestHandler) -> bytes:
    """The request body a handler received, Content-Length or chunked."""
    if "chunked" in (h.headers.get("Transfer-Encoding") or ""):
        out = bytearray()
        while True:
            size = int(h.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return bytes(out)
            out += h.rfile.read(size)
            h.rfile.readline()
    n = int(h.headers.get("Content-Length") or 0)
    return h.rfile.read(n) if n else b""


def reset_connection(h: BaseHTTPRequestHandler) -> None:
    """Make the handler's connection close with a RST (SO_LINGER 0) instead of a FIN."""
    h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    h.close_connection = True


def _flip_middle(data: bytes) -> bytes:
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1:]


def _handler(state: ProxyState):
    host, port = state.upstream.removeprefix("http://").split(":")

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _reply(self, status: int, body: bytes, headers=()) -> None:
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _serve(self) -> None:
            body = read_request_body(self)
            action = state.take(self.command, self.path)
            if state.delay_s:
                time.sleep(state.delay_s)
            if action == "reset":
                return reset_connection(self)
            if action == "500":
                return self._reply(500, _error_body("InternalError", "We encountered an internal error."),
                                   [("Content-Type", "application/xml")])
            if action == "503":
                return self._reply(503, _error_body("SlowDown", "Please reduce your request rate."),
                                   [("Content-Type", "application/xml")])
            if action == "corrupt" and self.command == "PUT" and body:
                body = _flip_middle(body)  # wrong bytes on the way in: the request body is altered
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "connection")}
            with state.lock:
                state.requests.append((self.command, self.path, {k: v for k, v in headers.items()
                                                                 if k.lower() != "content-length"}))
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            if action == "strip-conditional" or state.strip_conditional:
                headers = {k: v for k, v in headers.items() if k.lower() not in ("if-none-match", "if-match")}
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            try:
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                resp_headers = resp.getheaders()
            finally:
                conn.close()
            if action == "tear" and resp.status == 200 and data:
                data = data[: len(data) // 2]  # a half-written object has no checksum to send either
                resp_headers = [(k, v) for k, v in resp_headers if not k.lower().startswith("x-amz-checksum")]
            if action == "drop":
                return reset_connection(self)
            if action == "stall":
                time.sleep(state.stall_s)
                return reset_connection(self)
            self.send_response(resp.status, resp.reason)
            for k, v in resp_headers:
                if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                    self.send_header(k, v)
            if self.command == "HEAD":  # no body: pass the object's length through
                length = {k.lower(): v for k, v in resp_headers}.get("content-length", "0")
                self.send_header("Content-Length", length)
                self.end_headers()
                return
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if action in ("truncate", "stall-body") and len(data) > 1:
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                if action == "stall-body":
                    time.sleep(state.stall_s)
                return reset_connection(self)
            if action == "corrupt" and self.command != "PUT" and data:
                data = _flip_middle(data)
            self.wfile.write(data)

        def _safe(self) -> None:
            try:
                self._serve()
            except (BrokenPipeError, ConnectionResetError):  # the client went away (killed, timed out)
                self.close_connection = True

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _safe

    return H


@contextmanager
def fault_proxy(upstream: str) -> Iterator[tuple[str, ProxyState]]:
    """A proxy in front of `upstream`; yields (its URL, its state for rules, chaos and request counts)."""
    state = ProxyState(upstream)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    srv.daemon_threads = True
    srv.request_queue_size = 64
    srv.handle_error = lambda request, client_address: None  # clients killed mid-request are expected
    t = threading.Thread(target=srv.serve_forever, name="fault-proxy", daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_port}", state
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(timeout=5)


# --------------------------------------------------------------------------------------------------
# Matchers


def key_kind(path: str) -> str:
    """The object family a request path addresses: blob, manifest, claim, package, journal, config..."""
    for kind, marker in (("blob", "/blobs/sha256/"), ("manifest", "/manifests/sha256/"), ("claim", "/claims/"),
                         ("package", "/packages/"), ("journal", "/journal/"), ("config", "/pfx-registry.json"),
                         ("probe", "/probe/")):
        if marker in path:
            return kind
    return "other"


def on(method: str, kind: str) -> Callable[[str, str], bool]:
    """Match `method` requests on objects of `kind` (see key_kind)."""
    return lambda m, p: m == method and key_kind(p.split("?")[0]) == kind
