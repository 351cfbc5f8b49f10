"""The one way the tests and bench/ run the real `pfx`: the installed console script in a subprocess,
with exit codes and messages exactly as a user sees them.

`pfx_env(home)` is the environment: this one less any endpoint, profile, offline or debug setting from
outside, plus the test credentials, no AWS config file, this checkout first on PYTHONPATH, offline
Hugging Face, and one thread; `PFX_HOME` is `home` (when given).
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
from pathlib import Path

from tests.kit.s3 import S3_ENV

ROOT = Path(__file__).resolve().parents[2]
_DROPPED = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "PFX_OFFLINE", "PFX_DEBUG")


def pfx_env(home: str | os.PathLike | None = None, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED}
    env.update({**S3_ENV, "AWS_CONFIG_FILE": "/nonexistent-pfx-test", "PYTHONPATH": str(ROOT),
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"})
    if home is not None:
        env["PFX_HOME"] = str(home)
    env.update(extra)
    return env


def pfx(home, *args: str, timeout: float = 120, check: bool = False, env: dict | None = None,
        cwd=ROOT, **kw) -> subprocess.CompletedProcess:
    """Run `pfx ARGS` on `home` (None: no PFX_HOME, e.g. with --home in ARGS); `env`: variables added to
    pfx_env(home); `check`: raise AssertionError with the output on a non-zero exit; `kw`: for
    subprocess.run (e.g. preexec_fn=fsize_limit(...))."""
    p = subprocess.run(["pfx", *args], check=False, env=pfx_env(home, **(env or {})), capture_output=True,
                       text=True, timeout=timeout, cwd=cwd, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"pfx {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def start_pfx(home, *args: str, env: dict | None = None, cwd=ROOT, **kw) -> subprocess.Popen:
    """Start `pfx ARGS` on `home` without waiting (stdout and stderr piped, text)."""
    return subprocess.Popen(["pfx", *args], env=pfx_env(home, **(env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd, **kw)


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


def fsize_limit(limit: int):
    """A preexec_fn capping files at `limit` bytes: writes past it fail with EFBIG (SIGXFSZ ignored)."""
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre
