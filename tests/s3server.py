"""Test helpers: a real S3 server (moto's WSGI app) on 127.0.0.1 and a fault-injecting HTTP proxy.

The server is single-threaded (werkzeug `make_server(..., threaded=False)`): one request at a time,
so its conditional writes are atomic as on real S3, which the race tests rely on.

The proxy sits between boto3 and the server and can, per request, answer 503 SlowDown, reset the
connection, truncate the body, flip bytes, or strip the conditional headers (a store that ignores
If-None-Match / If-Match). It counts requests, so tests can assert request budgets.
"""

from __future__ import annotations

import http.client
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

import pytest

from tests.faultproxy import read_request_body, reset_connection

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextmanager
def moto_server() -> Iterator[str]:
    """Start moto's S3 app single-threaded on a free port; yield its URL; stop it afterwards."""
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import WSGIRequestHandler, make_server

    class Quiet(WSGIRequestHandler):
        def log_request(self, *a, **k):
            pass

    app = DomainDispatcherApplication(create_backend_app)
    srv = make_server("127.0.0.1", 0, app, threaded=False, request_handler=Quiet)
    t = threading.Thread(target=srv.serve_forever, name="moto-s3", daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_port}"
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(timeout=5)


def make_bucket(endpoint: str, bucket: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                      region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    s3.close()


def new_bucket(endpoint: str, prefix: str = "pfx") -> str:
    """Create a bucket with a fresh random name starting with `prefix`; return its name."""
    bucket = f"{prefix}-{uuid.uuid4().hex[:12]}"
    make_bucket(endpoint, bucket)
    return bucket


def isolate_aws_env(monkeypatch, config_file, credentials_file=None) -> None:
    """Point boto3 at the test credentials only: no endpoint, profile or offline setting from outside."""
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "PFX_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config_file))
    if credentials_file is not None:
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials_file))


# Fixtures. tests/conftest.py offers `s3_url` and `bucket` to every module (a module's own fixture of
# the same name wins); `aws_env` is autouse in the modules that import it.


class Endpoint(str):
    """An S3 endpoint URL that also says which server it is (`kind`: "moto" or "rgw")."""

    kind: str

    def __new__(cls, url: str, kind: str) -> Self:
        e = super().__new__(cls, url)
        e.kind = kind
        return e

    def __reduce__(self):  # picklable (multiprocessing passes endpoints to child processes)
        return (Endpoint, (str(self), self.kind))


def pytest_generate_tests(metafunc):
    """A module that sets `S3_SERVERS = ("moto", "rgw")` runs each test using `s3_url` on every server
    named (tests/conftest.py imports this hook); other modules get moto alone, unparametrized."""
    servers = getattr(metafunc.module, "S3_SERVERS", None)
    if servers and "s3_url" in metafunc.fixturenames:
        metafunc.parametrize("s3_url", list(servers), indirect=True, scope="module")


@pytest.fixture(scope="module")
def s3_url(request):
    """An S3 endpoint for the module: a moto server, or (param "rgw") the session's Ceph RGW
    (tests/kit/servers.py; skipped with the reason where the Ceph packages are not installed)."""
    kind = getattr(request, "param", "moto")
    if kind == "rgw":
        from tests.kit.servers import rgw_skip_reason, shared_rgw

        if (why := rgw_skip_reason()) is not None:
            pytest.skip(why)
        yield Endpoint(shared_rgw().endpoint, "rgw")
        return
    with moto_server() as url:
        yield Endpoint(url, "moto")


@pytest.fixture(autouse=True)
def aws_env(monkeypatch, tmp_path):
    """Autouse in every module that imports it: test credentials, no AWS config or credentials file."""
    isolate_aws_env(monkeypatch, tmp_path / "no-aws-config", tmp_path / "no-aws-creds")


@pytest.fixture
def bucket(s3_url):
    """A fresh, empty bucket on the module's server."""
    return new_bucket(s3_url)


@dataclass
class Fault:
    """Apply `action` to the next `times` requests for which `match(method, path)` is true."""

    match: Callable[[str, str], bool]
    action: str  # "503" | "reset" | "truncate" | "corrupt" | "strip-conditional"
    times: int = 1


@dataclass
class ProxyState:
    upstream: str
    faults: list[Fault] = field(default_factory=list)
    log: list[tuple[str, str]] = field(default_factory=list)
    strip_conditional: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, method: str, path: str) -> str | None:
        with self.lock:
            self.log.append((method, path))
            for f in self.faults:
                if f.times > 0 and f.match(method, path):
                    f.times -= 1
                    return f.action
        return None

    def count(self, method: str | None = None) -> int:
        with self.lock:
            return sum(1 for m, _ in self.log if method is None or m == method)


def _handler(state: ProxyState):
    host, port = state.upstream.removeprefix("http://").split(":")

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _serve(self) -> None:
            body = read_request_body(self)
            action = state.take(self.command, self.path)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "connection")}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            if action == "strip-conditional" or state.strip_conditional:
                headers = {k: v for k, v in headers.items() if k.lower() not in ("if-none-match", "if-match")}
            if action == "reset":
                reset_connection(self)
                return
            if action == "503":
                msg = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                self.send_response(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(msg)))
                self.end_headers()
                self.wfile.write(msg)
                return
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            try:
                conn.request(self.command, self.path, body=body if body else None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            finally:
                conn.close()
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if action == "truncate" and len(data) > 1:
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                reset_connection(self)
                return
            if action == "corrupt" and data:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve

    return H


@contextmanager
def fault_proxy(upstream: str) -> Iterator[tuple[str, ProxyState]]:
    """A proxy in front of `upstream`; yields (its URL, its state for faults and request counts)."""
    state = ProxyState(upstream)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, name="fault-proxy", daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_port}", state
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(timeout=5)
