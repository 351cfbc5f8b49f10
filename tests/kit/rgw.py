"""A real Ceph RADOS Gateway (RGW) on 127.0.0.1 for tests: one mon, one in-memory OSD, one radosgw.

Why: moto is a model of S3; RGW is a production S3 implementation with its own reading of the
conditional-write headers (If-None-Match: * / If-Match on PutObject), so tests of claims and
compare-and-swap also run against a real store. Everything lives in a fresh temporary folder (config,
mon store, OSD, run dir, admin sockets, pid files, logs) and every daemon is a child process of this
one, so nothing under /etc/ceph, /var/lib/ceph or /var/run/ceph is read or written and several
clusters can run side by side or one after another in one process.

    with rgw_server() as rgw:
        s3 = rgw.client()                     # boto3 client, path-style, SigV4
        s3.create_bucket(Bucket="pfx-test")   # 3-63 chars, DNS-style names only

Debian 12: `apt-get install radosgw ceph-mon ceph-osd ceph-common` (Ceph 16.2 pacific). Start-up is
1.2-1.8 s on 2 cores (20 runs, median 1.56 s; ~12 s with Ceph's default timings); see `_conf` for
the settings that matter. `rgw_available()` says why the server cannot run here (use it for
pytest.skip reasons).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

APT_HINT = "apt-get install radosgw ceph-mon ceph-osd ceph-common"
# Binaries used: the daemons, the two offline tools that seed the mon, the `ceph` CLI (registers the
# OSD id with the mon) and radosgw-admin (creates the S3 user).
BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph", "monmaptool", "ceph-authtool")

ACCESS_KEY = "PFXTESTACCESSKEY0001"
SECRET_KEY = "pfx-test-secret-key-not-a-secret-0001"
REGION = "us-east-1"  # RGW's default zonegroup answers to any region name in SigV4; this is boto3's usual


class RGWStartError(RuntimeError):
    """The cluster did not come up; the message carries the tail of the relevant logs."""


@dataclass(frozen=True)
class RGW:
    """A running gateway. `endpoint` is http://127.0.0.1:<port>; use path-style addressing."""

    endpoint: str
    access_key: str
    secret_key: str
    version: str  # `radosgw --version`, e.g. "ceph version 16.2.15 (...) pacific (stable)"
    dir: Path  # the cluster's temp folder (logs under dir/log), removed on exit
    region: str = REGION
    startup_s: float = 0.0  # seconds from the first process started to the first signed request served

    def client(self, **config: Any):
        """A boto3 S3 client for this gateway (path-style, no retries unless `config` says otherwise)."""
        import boto3
        from botocore.config import Config

        cfg = Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}, **config)
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=self.region, config=cfg)


def rgw_available() -> str | None:
    """None if the Ceph binaries are installed, else a human-readable reason (a pytest skip reason)."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        what = "radosgw" if "radosgw" in missing else "Ceph tools"
        return f"{what} not installed (missing {', '.join(missing)}): {APT_HINT}"
    return None


@lru_cache(maxsize=1)
def rgw_version() -> str:
    """`radosgw --version`, once per process."""
    out = subprocess.run(["radosgw", "--version"], capture_output=True, text=True, timeout=30, env=_env(),
                         check=False)
    return (out.stdout or out.stderr).strip()


def _free_port() -> int:
    """A port that was free a moment ago (the daemon may still lose a race for it: then we retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    """The caller's environment without the variables that would point Ceph tools at another cluster."""
    env = {k: v for k, v in os.environ.items() if k not in ("CEPH_CONF", "CEPH_ARGS", "CEPH_KEYRING")}
    env.setdefault("LANG", "C.UTF-8")
    return env


def _conf(d: Path, fsid: str, mon_port: int, rgw_port: int) -> str:
    """ceph.conf for a throwaway single-node cluster. Each setting is here for a reason:

    * auth none everywhere: no keyrings to distribute; radosgw, however, forces
      `ms_mon_client_mode = secure`, which needs cephx and otherwise loops forever on
      "get_initial_auth_request returned -13", so its section sets `crc secure`.
    * msgr2 only (`v2:` mon address, msgr1 not bound): one port for the mon, fewer for the OSD.
    * every path (run dir, admin sockets, pid files, logs, crash dumps, mon/osd/rgw data) under `d`.
    * `paxos propose interval` / `paxos min wait`: the mon batches map changes for 1 s by default;
      radosgw creates its pools one after another, each waiting for a new OSD map, so with the defaults
      start-up takes ~12 s, with these ~1.5 s.
    * size-1 pools, 8 PGs, no autoscaler, failure domain = OSD: one OSD is a healthy cluster, and
      radosgw's ~8 pools stay under the PG-per-OSD limit.
    * memstore OSD: no disk, no block device, nothing to clean but the folder; its content is
      in RAM and gone when the process dies (which is fine: each server starts empty).
    * `objecter tick interval` (clients): radosgw's first read of a freshly created pool can be
      parked until the next osdmap, which the objecter asks for only on its tick (5 s by default):
      one start in four took 6 s instead of 1.5 s.
    * `ms bind retry count/delay`: a daemon whose port was taken retries 3 x 5 s by default; we
      would rather fail in ~1 s and retry the whole start on other ports.
    * `mon data avail crit = 1`: the mon shuts down below 5 % free disk by default (a busy CI disk).
    * beast `tcp_nodelay=1`: without it every GET/HEAD waits ~40 ms for a delayed ACK (Nagle);
      serial GETs went from 44 ms to 3 ms each.
    * gc/lc/usage threads off, small thread pool: less CPU on a 2-core machine.
    """
    return f"""[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{mon_port}
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr1 = false
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
keyring = {d}/keyring
run dir = {d}/run
admin socket = {d}/run/$name.asok
pid file = {d}/run/$name.pid
log file = {d}/log/$name.log
mon cluster log file = {d}/log/cluster.log
crash dir = {d}/crash
log to stderr = false
err to stderr = true
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon max pg per osd = 1000
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 1
paxos propose interval = 0.05
paxos min wait = 0.01
ms bind retry count = 1
ms bind retry delay = 1

[mon]
mon data = {d}/mon

[osd]
osd data = {d}/osd
osd journal = {d}/osd/journal
osd objectstore = memstore
memstore device bytes = 1073741824
osd crush initial weight = 1

[client]
objecter tick interval = 0.2

[client.rgw]
rgw frontends = beast endpoint=127.0.0.1:{rgw_port} tcp_nodelay=1
rgw data = {d}/rgw
ms mon client mode = crc secure
rgw thread pool size = 32
rgw enable gc threads = false
rgw enable lc threads = false
rgw enable usage log = false
"""


class _Cluster:
    """The processes of one cluster and the commands that drive it."""

    def __init__(self, d: Path):
        self.d = d
        self.conf = d / "ceph.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        # setpriv --pdeathsig: a daemon dies with the Python process, even one killed with SIGKILL,
        # so a crashed test run leaves no cluster behind. (It fires when the *thread* that started
        # the daemon exits: enter rgw_server() from a thread that outlives the `with` block.)
        self.prefix = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []

    def run(self, *args: str, timeout: float = 30) -> str:
        """Run a Ceph tool against this cluster; raise RGWStartError with its output if it fails."""
        cmd = [args[0], "-c", str(self.conf), *args[1:]]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=self.d,
                           check=False)
        if r.returncode != 0:
            raise RGWStartError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout}{r.stderr}\n"
                                f"{self.logs()}")
        return r.stdout

    def start(self, name: str, *args: str) -> None:
        """Start a daemon in the foreground (-f: it stays our child, no fork, no setuid to `ceph`)."""
        out = open(self.d / "log" / f"{name}.out", "wb")  # noqa: SIM115 - owned by the child
        try:
            self.procs[name] = subprocess.Popen(
                [*self.prefix, args[0], "-c", str(self.conf), "-f", *args[1:]],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=self.d,
            )
        finally:
            out.close()

    def dead(self) -> str | None:
        """The name of a daemon that has exited, if any."""
        for name, p in self.procs.items():
            if p.poll() is not None:
                return f"{name} exited with {p.returncode}"
        return None

    def logs(self, lines: int = 15) -> str:
        """The last lines of each daemon's stdout and log, for error messages."""
        parts = []
        for f in sorted((self.d / "log").glob("*")):
            try:
                tail = f.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            if tail:
                parts.append(f"--- {f.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def stop(self) -> None:
        """SIGKILL every daemon and reap it. The data is throwaway, and a graceful stop is slow
        (ceph-osd waits seconds for a mon that may already be gone)."""
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


def _wait_port(c: _Cluster, what: str, port: int, deadline: float) -> None:
    """Wait until 127.0.0.1:port accepts connections; fail fast if a daemon died meanwhile."""
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            pass
        if (why := c.dead()) or time.monotonic() > deadline:
            raise RGWStartError(f"{what} not listening on 127.0.0.1:{port} ({why or 'timeout'}):\n{c.logs()}")
        time.sleep(0.05)


def _bring_up(c: _Cluster, timeout: float) -> str:
    """Create and start mon, OSD and radosgw in `c.d`, create the S3 user; return the endpoint."""
    d = c.d
    for sub in ("run", "log", "mon", "osd", "rgw", "crash"):
        (d / sub).mkdir()
    fsid, osd_uuid = str(uuid.uuid4()), str(uuid.uuid4())
    mon_port, rgw_port = _free_port(), _free_port()
    while rgw_port == mon_port:
        rgw_port = _free_port()
    c.conf.write_text(_conf(d, fsid, mon_port, rgw_port))
    deadline = time.monotonic() + timeout

    # The mon: a monmap naming it, a keyring for `mon.` (mkfs wants one even with auth none), mkfs.
    c.run("monmaptool", "--create", "--fsid", fsid, "--addv", "a", f"[v2:127.0.0.1:{mon_port}]",
          str(d / "monmap"))
    c.run("ceph-authtool", "--create-keyring", str(d / "keyring"), "--gen-key", "-n", "mon.",
          "--cap", "mon", "allow *")
    c.run("ceph-mon", "--mkfs", "-i", "a", "--monmap", str(d / "monmap"), "--keyring", str(d / "keyring"))
    c.start("mon.a", "ceph-mon", "-i", "a")
    # OSD mkfs needs no mon (the fsid is in the conf; --no-mon-config: don't ask the mon for config),
    # so it runs while the mon starts.
    c.run("ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", osd_uuid, "--no-mon-config")
    _wait_port(c, "mon", mon_port, deadline)
    # Register osd.0 with the mon (retried until the mon answers; `ceph` waits up to --connect-timeout).
    while True:
        try:
            c.run("ceph", "--connect-timeout", "5", "osd", "new", osd_uuid, "0", timeout=15)
            break
        except (RGWStartError, subprocess.TimeoutExpired):
            if c.dead() or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    c.start("osd.0", "ceph-osd", "-i", "0")
    c.start("rgw", "radosgw", "-n", "client.rgw")  # blocks in init until its pools are active

    endpoint = f"http://127.0.0.1:{rgw_port}"
    while _http_status(endpoint + "/") != 200:  # anonymous ListBuckets: 200 once the frontend serves
        if (why := c.dead()) or time.monotonic() > deadline:
            raise RGWStartError(f"radosgw not serving on {endpoint} "
                                f"({why or f'timeout after {timeout:.0f} s'}):\n{c.logs()}")
        time.sleep(0.1)
    c.run("radosgw-admin", "-n", "client.admin", "user", "create", "--uid", "pfx-test",
          "--display-name", "pfx test", "--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY)
    return endpoint


def _signed_check(rgw: RGW, timeout: float) -> None:
    """One signed request with the new keys, so the first test never races the user's creation."""
    try:
        import boto3  # noqa: F401
    except ImportError:  # the helper itself needs only the standard library
        return
    s3 = rgw.client()
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                s3.list_buckets()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        s3.close()


@contextmanager
def rgw_server(timeout: float = 90.0, attempts: int = 3) -> Iterator[RGW]:
    """Start a fresh single-node Ceph cluster with radosgw on free ports of 127.0.0.1; yield an RGW.

    Each call gets its own temp folder, fsid, ports and an empty store. On exit every daemon is killed
    and the folder removed. A start that fails (e.g. another process took a port between our check
    and the daemon's bind) is retried from scratch up to `attempts` times; the last error, with the
    logs' tails, is raised as RGWStartError. Needs the Debian packages (see `rgw_available()`).
    Works as root (the daemons run in the foreground and never switch user) or as any user.
    """
    if (why := rgw_available()) is not None:
        raise RGWStartError(why)
    version = rgw_version()
    last: Exception | None = None
    for _ in range(attempts):
        d = Path(tempfile.mkdtemp(prefix="pfx-rgw-"))
        c = _Cluster(d)
        try:
            try:
                t0 = time.monotonic()
                endpoint = _bring_up(c, timeout)
                _signed_check(RGW(endpoint, ACCESS_KEY, SECRET_KEY, version, d), 10.0)
                rgw = RGW(endpoint, ACCESS_KEY, SECRET_KEY, version, d, startup_s=time.monotonic() - t0)
            except (RGWStartError, subprocess.TimeoutExpired, OSError) as e:
                last = e
                continue
            yield rgw
            return
        finally:
            c.stop()
            shutil.rmtree(d, ignore_errors=True)
    assert last is not None
    raise last
