"""Real S3 servers shared by a whole test session, for tests that run on moto *and* on them.

`shared_rgw()` starts one single-node Ceph RGW (tests/kit/rgw.py) the first time it is called and keeps
it until the test process exits (its daemons die with the process in any case). Besides the helper's
own user it creates one whose keys are the moto tests' `test` / `test` (tests/kit/s3.py S3_ENV), so
every test written for moto - boto3 clients, `pfx` subprocesses, publish workers - talks to RGW
unchanged. Each test makes its own bucket, so sharing the store costs no isolation.

`rgw_skip_reason()` is None when RGW can run here, else why not (the visible pytest skip reason); a
start failure with the packages installed is an error, never a skip. `shared_s3rver()` and
`s3rver_skip_reason()` do the same for s3rver (tests/kit/s3rver.py), a real store that ignores
conditional writes; its only keys are S3RVER / S3RVER (`S3RVER_ENV`).
"""

from __future__ import annotations

import atexit
import subprocess
import threading
from contextlib import ExitStack

from tests.kit.rgw import RGW, rgw_available, rgw_server
from tests.kit.s3rver import S3rver, s3rver_available, s3rver_server

COMPAT_KEYS = ("test", "test")  # tests/kit/s3.py S3_ENV
_lock = threading.Lock()
_rgw: RGW | None = None
_s3rver: S3rver | None = None
S3RVER_ENV = {"AWS_ACCESS_KEY_ID": "S3RVER", "AWS_SECRET_ACCESS_KEY": "S3RVER", "AWS_DEFAULT_REGION": "us-east-1"}
_stack = ExitStack()
atexit.register(_stack.close)  # stop the servers (and remove their folders) when the tests end


def rgw_skip_reason() -> str | None:
    why = rgw_available()
    return None if why is None else f"Ceph RGW not available: {why} (.ci/install-test-deps installs it)"


def add_user(rgw: RGW, uid: str, access_key: str, secret_key: str) -> None:
    """Create an S3 user with the given keys on a running gateway (radosgw-admin, ~0.1 s)."""
    subprocess.run(["radosgw-admin", "-c", str(rgw.dir / "ceph.conf"), "-n", "client.admin", "user", "create",
                    "--uid", uid, "--display-name", uid, "--access-key", access_key, "--secret-key", secret_key],
                   check=True, capture_output=True, text=True, timeout=60)


def shared_rgw() -> RGW:
    """The session's RGW, started on first use (call from the main thread: see tests/kit/rgw.py)."""
    global _rgw
    with _lock:
        if _rgw is None:
            rgw = _stack.enter_context(rgw_server())
            add_user(rgw, "pfx-compat", *COMPAT_KEYS)
            _rgw = rgw
        return _rgw


def s3rver_skip_reason() -> str | None:
    why = s3rver_available()
    return None if why is None else f"s3rver not available: {why} (.ci/install-test-deps installs it)"


def shared_s3rver() -> S3rver:
    """The session's s3rver, started on first use."""
    global _s3rver
    with _lock:
        if _s3rver is None:
            _s3rver = _stack.enter_context(s3rver_server())
        return _s3rver
