"""Fault injection and consistency checks shared by the hardening tests and bench/hardening.py.

`chaos_proxy(upstream)` is an HTTP proxy (threads, in the test process) between boto3 - in the test
process or in real `pfx` subprocesses - and the moto S3 server. Per request it can:

  500 / 503      answer InternalError / SlowDown without forwarding
  reset          close the connection (RST) without forwarding
  drop           forward (the server applies the write), then RST: the client never sees the reply
  truncate       forward, send the headers and half the body, then RST
  corrupt        flip one byte in the middle of the body (wrong bytes, right length): of the reply,
                 or, for a PUT, of the request on its way to the server
  stall          forward, then send nothing for `stall_s` seconds and close
  stall-body     forward, send headers and half the body, stall `stall_s`, close

Faults come from rules (`Rule(match, action, times)`) and/or a seeded random mode (`state.chaos`).
`state.delay_s` adds latency to every request (widens the windows a kill -9 can land in).

The checkers are the properties every hardening test asserts afterwards:
  * `remote_problems(endpoint, bucket, prefix)`: every version listed in a package document has a
    claim naming the same manifest, the manifest object hashes to its key and names that version,
    and every blob it names exists with the right size and digest;
  * `home_problems(home_dir)`: `pfx verify` is clean, every file in the blob store hashes to its
    name (no half-written file is visible, referenced or not), the SQLite file passes
    integrity_check, and every installed version has all of its blobs.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import re
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ACTIONS = ("500", "503", "reset", "drop", "truncate", "corrupt", "stall", "stall-body")
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Rule:
    """Apply `action` to the next `times` requests for which `match(method, path)` is true."""

    match: Callable[[str, str], bool]
    action: str
    times: int = 1


@dataclass
class ChaosState:
    upstream: str
    rules: list[Rule] = field(default_factory=list)
    chaos: tuple[random.Random, float, tuple[str, ...]] | None = None  # (rng, rate, actions)
    chaos_match: Callable[[str, str], bool] = lambda m, p: True
    delay_s: float = 0.0
    stall_s: float = 2.0
    log: list[tuple[str, str, str | None]] = field(default_factory=list)
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

    def injected(self) -> dict[str, int]:
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


def _handler(state: ChaosState):
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
                i = len(body) // 2  # wrong bytes on the way in: the request body is altered
                body = body[:i] + bytes([body[i] ^ 0x5A]) + body[i + 1:]
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "connection")}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            try:
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            finally:
                conn.close()
            if action == "drop":
                return reset_connection(self)
            if action == "stall":
                time.sleep(state.stall_s)
                return reset_connection(self)
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                    self.send_header(k, v)
            if self.command == "HEAD":  # no body: pass the object's length through
                self.send_header("Content-Length", resp.getheader("Content-Length") or "0")
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
                i = len(data) // 2
                data = data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1:]
            self.wfile.write(data)

        def _safe(self) -> None:
            try:
                self._serve()
            except (BrokenPipeError, ConnectionResetError):  # the client went away (killed, timed out)
                self.close_connection = True

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _safe

    return H


@contextmanager
def chaos_proxy(upstream: str) -> Iterator[tuple[str, ChaosState]]:
    """A proxy in front of `upstream`; yields (its URL, its state)."""
    state = ChaosState(upstream)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    srv.daemon_threads = True
    srv.request_queue_size = 64
    srv.handle_error = lambda request, client_address: None  # clients killed mid-request are expected
    t = threading.Thread(target=srv.serve_forever, name="chaos-proxy", daemon=True)
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
    return lambda m, p: m == method and key_kind(p.split("?")[0]) == kind


# --------------------------------------------------------------------------------------------------
# Subprocess helpers: the real installed `pfx`


def pfx_env(home: str | os.PathLike, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "PFX_OFFLINE", "PFX_DEBUG")}
    env.update({"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_CONFIG_FILE": "/nonexistent-pfx-test", "PFX_HOME": str(home), "PYTHONPATH": str(ROOT),
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"})
    env.update(extra)
    return env


def pfx(home, *args: str, timeout: float = 120, check: bool = False, **kw) -> subprocess.CompletedProcess:
    """Run the installed `pfx` (the console script) on `home`."""
    p = subprocess.run(["pfx", *args], check=False, env=kw.pop("env", None) or pfx_env(home), capture_output=True, text=True,
                       timeout=timeout, cwd=kw.pop("cwd", ROOT), **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"pfx {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def start_pfx(home, *args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen(["pfx", *args], env=env or pfx_env(home), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=kw.pop("cwd", ROOT), **kw)


def kill9_after(proc: subprocess.Popen, delay: float) -> bool:
    """SIGKILL `proc` after `delay` seconds unless it exited first; True if it was killed."""
    try:
        proc.wait(timeout=delay)
        killed = False
    except subprocess.TimeoutExpired:
        proc.kill()  # SIGKILL
        proc.wait()
        killed = True
    proc.communicate()
    return killed


def clean_error(p: subprocess.CompletedProcess) -> bool:
    """A failure a user can read: non-zero exit, a message on stderr, no Python traceback."""
    return p.returncode != 0 and "Traceback" not in p.stderr and p.stderr.strip() != ""


# --------------------------------------------------------------------------------------------------
# Consistency checkers


def store_problems(home_dir: str | os.PathLike) -> list[str]:
    """Every file under blobs/ must be a complete blob: its sha256 equals its name."""
    out = []
    root = Path(home_dir) / "blobs" / "sha256"
    if not root.is_dir():
        return out
    for shard in root.iterdir():
        if not shard.is_dir():
            out.append(f"stray {shard}")
            continue
        for f in shard.iterdir():
            with open(f, "rb") as fh:
                got = hashlib.file_digest(fh, "sha256").hexdigest()
            if got != f.name:
                out.append(f"blob file {f} holds {got}")
    return out


def home_problems(home_dir: str | os.PathLike, *, run_verify: bool = True) -> list[str]:
    """Everything that would count as lost or corrupt in a home (empty list = clean)."""
    out = store_problems(home_dir)
    db = Path(home_dir) / "pfx.sqlite"
    if db.exists():
        c = sqlite3.connect(db, timeout=30)
        try:
            for (line,) in c.execute("PRAGMA integrity_check").fetchall():
                # SQLite 3.40 reports "NULL value in T.C" for NOT NULL columns of WITHOUT ROWID
                # tables that hold no NULL (a known false positive): confirm by querying.
                hit = re.fullmatch(r"NULL value in (\w+)\.(\w+)", line)
                if hit and c.execute(f"SELECT count(*) FROM {hit[1]} WHERE {hit[2]} IS NULL").fetchone()[0] == 0:
                    continue
                if line != "ok":
                    out.append(f"sqlite integrity_check: {line}")
            tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            # A home whose very first open failed (e.g. disk full) may hold an index without tables yet.
            rows = c.execute("SELECT manifest, digest, size FROM blob_refs").fetchall() if "blob_refs" in tables else []
            inst = c.execute("SELECT manifest, name, version FROM installed").fetchall() if "installed" in tables else []
        finally:
            c.close()
        blobs = Path(home_dir) / "blobs" / "sha256"
        for manifest, name, version in inst:
            p = blobs / manifest[7:9] / manifest[7:]
            if not p.is_file():
                out.append(f"{name}@{version}: manifest blob missing")
        for manifest, digest, size in rows:
            p = blobs / digest[7:9] / digest[7:]
            if not p.is_file() or p.stat().st_size != size:
                out.append(f"blob {digest} of {manifest[:19]} missing or wrong size")
    if run_verify:
        p = pfx(home_dir, "verify", "--json")
        if p.returncode != 0:
            out.append(f"pfx verify exit {p.returncode}: {p.stdout[-400:]} {p.stderr[-400:]}")
    return out


def s3_client(endpoint: str):
    import boto3
    from botocore.config import Config

    # No response checksum validation: the checker must see (and report) stored bytes as they are.
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                        region_name="us-east-1", config=Config(response_checksum_validation="when_required"))


def remote_problems(endpoint: str, bucket: str, prefix: str = "reg/", *, require_indexed: bool = False) -> list[str]:
    """Check a remote's index against its immutable objects (straight to the server, no proxy).

    Every version a package document lists must have a claim naming the same manifest, the manifest
    must hash to its key and name that package and version, and its blobs must exist intact. With
    `require_indexed`, every claim must also be listed in its package document."""
    from registry.manifest import parse_manifest
    from registry.remotes.base import blob_key, claim_key, manifest_key

    s3 = s3_client(endpoint)
    out: list[str] = []

    def get(key: str) -> bytes | None:
        try:
            return s3.get_object(Bucket=bucket, Key=prefix + key)["Body"].read()
        except s3.exceptions.NoSuchKey:
            return None

    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"][len(prefix):] for o in page.get("Contents", [])]
    claims = {}
    for k in keys:
        if k.startswith("claims/"):
            try:
                doc = json.loads(get(k))
            except ValueError:
                out.append(f"claim {k} is not JSON")
                continue
            claims[(doc["name"], doc["version"])] = doc["manifest"]
    indexed = set()
    for k in keys:
        if not k.startswith("packages/"):
            continue
        try:
            pkg = json.loads(get(k))
        except ValueError:
            out.append(f"package document {k} is not JSON")
            continue
        for version, entry in pkg["versions"].items():
            indexed.add((pkg["name"], version))
            who = f"{pkg['name']}@{version}"
            try:
                ck = claim_key(pkg["name"], version)
            except Exception as e:  # noqa: BLE001
                out.append(f"{who}: bad version {e}")
                continue
            if claims.get((pkg["name"], version)) != entry["manifest"] or ck not in keys:
                out.append(f"{who}: indexed without a claim naming its manifest")
                continue
            data = get(manifest_key(entry["manifest"]))
            if data is None:
                out.append(f"{who}: manifest missing")
                continue
            try:
                m = parse_manifest(data, expect_digest=entry["manifest"], expect_name=pkg["name"],
                                   expect_version=version)
            except Exception as e:  # noqa: BLE001
                out.append(f"{who}: manifest bad: {e}")
                continue
            for b in m.blobs():
                blob = get(blob_key(b["digest"]))
                if blob is None:
                    out.append(f"{who}: blob {b['digest'][:19]} missing")
                elif len(blob) != b["size"] or "sha256:" + hashlib.sha256(blob).hexdigest() != b["digest"]:
                    out.append(f"{who}: blob {b['digest'][:19]} corrupt")
        for t, v in pkg.get("tags", {}).items():
            if v not in pkg["versions"]:
                out.append(f"{pkg['name']}: tag {t} -> {v} not listed")
    # Every immutable object must hash to its key, indexed or not (a stored corrupt object would
    # poison every later publish of the same bytes: put_if_absent never overwrites).
    for k in keys:
        if k.startswith(("blobs/sha256/", "manifests/sha256/")):
            data = get(k)
            if data is not None and hashlib.sha256(data).hexdigest() != k.rsplit("/", 1)[1]:
                out.append(f"immutable object {k} does not hash to its key")
    if require_indexed:
        for (name, version) in claims:
            if (name, version) not in indexed:
                out.append(f"{name}@{version}: claimed but not indexed")
    s3.close()
    return out


def machine() -> dict:
    import platform

    return {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine()}
