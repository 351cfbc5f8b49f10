"""s3rver (npm) on 127.0.0.1 for tests: a real S3 server that IGNORES conditional writes.

Why: the spec says remotes that ignore If-None-Match / If-Match exist, and the capability probe of
`pfx remote add` must catch them. The fault proxy in tests/kit/proxy.py imitates one by stripping the
headers; s3rver is one for real. Measured with boto3 1.44.8 on s3rver 3.7.1:
* PutObject ignores If-None-Match and If-Match: 200 and the object is overwritten, every time.
* GetObject ignores If-Match (200), and If-None-Match matches only the exact string it stores, the
  quoted ETag ('"<md5>"' -> 304; the unquoted md5 -> 200).
* ETags are quoted MD5s, equal in PutObject, HeadObject, GetObject and listings; bucket names are
  checked like S3's (3-63 chars, lowercase).

    with s3rver_server() as srv:
        s3 = srv.client()
        s3.create_bucket(Bucket="pfx-test")

Install: `npm install -g s3rver` (3.7.1 tested; .ci/install-test-deps does it). On Node >= 17 it
must run with `--openssl-legacy-provider`: its ListObjects continuation tokens are DES-encrypted,
and without the legacy provider every paginated listing answers 500. We pass the flag through
NODE_OPTIONS. The port is chosen by s3rver itself (`-p 0`) and read back from its
"S3rver listening on ADDRESS:PORT" line, so there is no race for a free port.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

NPM_HINT = "npm install -g s3rver"
ACCESS_KEY = "S3RVER"  # s3rver's built-in account; any other key is refused (InvalidAccessKeyId)
SECRET_KEY = "S3RVER"
REGION = "us-east-1"
_LISTENING = re.compile(rb"S3rver listening on (\S+):(\d+)")


class S3rverStartError(RuntimeError):
    """s3rver did not come up; the message carries its output."""


@dataclass(frozen=True)
class S3rver:
    """A running s3rver. `endpoint` is http://127.0.0.1:<port>; use path-style addressing."""

    endpoint: str
    access_key: str
    secret_key: str
    version: str  # `s3rver --version`, e.g. "3.7.1"
    dir: Path  # its data folder, removed on exit
    region: str = REGION
    startup_s: float = 0.0

    def client(self, **config: Any):
        """A boto3 S3 client for this server (path-style, no retries unless `config` says otherwise)."""
        import boto3
        from botocore.config import Config

        cfg = Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}, **config)
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=self.region, config=cfg)


def s3rver_available() -> str | None:
    """None if node and s3rver are installed, else a human-readable reason (a pytest skip reason)."""
    if shutil.which("node") is None:
        return "node not installed (s3rver needs it): apt-get install nodejs npm && " + NPM_HINT
    if shutil.which("s3rver") is None:
        return f"s3rver not installed: {NPM_HINT}"
    return None


@lru_cache(maxsize=1)
def _node_major() -> int:
    out = subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=30,
                         check=False).stdout
    m = re.match(r"v(\d+)", out.strip())
    return int(m.group(1)) if m else 0


def _env() -> dict[str, str]:
    """NODE_OPTIONS with --openssl-legacy-provider on Node >= 17 (an older node refuses the flag)."""
    env = dict(os.environ)
    if _node_major() >= 17:
        opts = env.get("NODE_OPTIONS", "")
        if "--openssl-legacy-provider" not in opts:
            env["NODE_OPTIONS"] = (opts + " --openssl-legacy-provider").strip()
    return env


@lru_cache(maxsize=1)
def s3rver_version() -> str:
    r = subprocess.run(["s3rver", "--version"], capture_output=True, text=True, timeout=30, env=_env(),
                       check=False)
    return r.stdout.strip()


@contextmanager
def s3rver_server(timeout: float = 30.0) -> Iterator[S3rver]:
    """Start s3rver on a port of 127.0.0.1 that it picks, with an empty temp data folder; yield an S3rver.

    On exit the process is terminated and the folder removed. Raises S3rverStartError (with its
    output) if it does not print its listening line within `timeout` seconds.
    """
    if (why := s3rver_available()) is not None:
        raise S3rverStartError(why)
    version = s3rver_version()
    d = Path(tempfile.mkdtemp(prefix="pfx-s3rver-"))
    cmd = ["s3rver", "-d", str(d / "data"), "-a", "127.0.0.1", "-p", "0", "--silent", "--no-vhost-buckets"]
    # setpriv --pdeathsig: the server dies with this Python process even if it is SIGKILLed.
    if shutil.which("setpriv"):
        cmd = ["setpriv", "--pdeathsig", "KILL", *cmd]
    (d / "data").mkdir()
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         env=_env(), cwd=d)
    out = bytearray()
    found: list[re.Match] = []

    def reader() -> None:
        # Keeps draining the pipe for the server's whole life, so it can never block on a full pipe.
        assert p.stdout is not None
        for line in iter(p.stdout.readline, b""):
            if len(out) < 1 << 16:
                out.extend(line)
            if not found and (m := _LISTENING.search(line)):
                found.append(m)

    t = threading.Thread(target=reader, name="s3rver-out", daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + timeout
        while not found:
            if p.poll() is not None or time.monotonic() > deadline:
                why = (f"exited with {p.returncode}" if p.poll() is not None
                       else f"timeout after {timeout:.0f} s")
                raise S3rverStartError(f"s3rver did not start ({why}):\n{out.decode(errors='replace')}")
            time.sleep(0.05)
        port = int(found[0].group(2))
        yield S3rver(f"http://127.0.0.1:{port}", ACCESS_KEY, SECRET_KEY, version, d,
                     startup_s=time.monotonic() - t0)
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        t.join(timeout=5)
        shutil.rmtree(d, ignore_errors=True)
