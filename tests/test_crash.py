"""Crash consistency and resource exhaustion, with real `pfx` subprocesses.

kill -9 at seeded random points of `pfx install`, `pfx publish`, `pfx gc` and `pfx train`: afterwards
the home verifies clean (every file in the store hashes to its name; the index is intact; every
installed version has its blobs), the remote index is consistent, leftover temp files are removed by
`gc` once stale, and a rerun completes (training resumes from its checkpoint).

Disk full (RLIMIT_FSIZE, SIGXFSZ ignored so writes fail with EFBIG) and unwritable homes (a home whose
parent is a file; a store whose tmp/ or blob shard is a file: the tests run as root, so chmod would not
stop a write) give a clear error and a non-zero exit, and leave nothing corrupt.

The `run_*` functions take a seed list; bench/hardening.py runs them with many more seeds.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest

from registry.home import Home
from tests.conceptgen import add_concept, publish_big_concepts
from tests.enginekit import needs_toy
from tests.faultproxy import (
    chaos_proxy,
    clean_error,
    home_problems,
    kill9_after,
    pfx,
    pfx_env,
    remote_problems,
    start_pfx,
)
from tests.s3server import isolate_aws_env, new_bucket


@pytest.fixture(autouse=True)
def aws_env(monkeypatch):
    isolate_aws_env(monkeypatch, "/nonexistent-pfx-test")


def make_registry(s3_url: str, tmp: Path, n: int, tag: str = "c") -> tuple[str, list]:
    bucket = new_bucket(s3_url, "crash")
    url = f"s3://{bucket}/reg"
    pub, ms = publish_big_concepts(tmp / f"pub-{bucket}", tmp, url, s3_url, n, prefix=tag)
    pub.close()
    return url, ms


def age_tmp_files(home: Path, seconds: float = 7200) -> int:
    """Backdate leftover temp files (as if the crash was hours ago) so gc may take them."""
    n = 0
    for f in (home / "tmp").iterdir():
        t = time.time() - seconds
        os.utime(f, (t, t))
        n += 1
    return n


def gc_cleans_tmp(home: Path) -> list[str]:
    """A crash may leave temp files; once stale, `pfx gc` must remove them all."""
    if not (home / "tmp").is_dir():
        return []
    left = age_tmp_files(home)
    p = pfx(home, "gc", "--json")
    if p.returncode != 0:
        return [f"gc failed: {p.stderr[-300:]}"]
    rest = list((home / "tmp").iterdir())
    return [f"gc left {len(rest)} of {left} stale temp files"] if rest else []


# --------------------------------------------------------------------------------------------------
# kill -9 during install / publish / gc
#
# Kill points are seeded fractions of a measured unkilled run of the same command (measured on the
# spot, so the points stay spread over the whole run however loaded the machine is).


def timed(home, *args: str) -> float:
    t0 = time.perf_counter()
    pfx(home, *args, check=True)
    return time.perf_counter() - t0


def run_install_kills(s3_url: str, tmp: Path, seeds, *, n: int = 6, delay_s: float = 0.03) -> dict:
    url, ms = make_registry(s3_url, tmp, n, tag="ik")
    refs = [m.ref() for m in ms]
    out = {"kill_points": 0, "killed": 0, "problems": [], "delays": []}
    with chaos_proxy(s3_url) as (proxy, state):
        state.delay_s = delay_s  # latency per request spreads the kill points over the downloads
        probe = tmp / "ik-baseline"
        pfx(probe, "remote", "add", "s3", url, "--endpoint-url", proxy, check=True)
        baseline = timed(probe, "install", "--workers", "2", *refs)
        out["baseline_s"] = round(baseline, 2)
        for seed in seeds:
            rng = random.Random(seed)
            home = tmp / f"ik-{seed}"
            pfx(home, "remote", "add", "s3", url, "--endpoint-url", proxy, check=True)
            # Some seeds start from a partly installed home, so kills also land beside existing data.
            pre = rng.randrange(0, 3)
            if pre:
                pfx(home, "install", *refs[:pre], check=True)
            delay = rng.uniform(0.1, 0.95) * baseline
            proc = start_pfx(home, "install", "--workers", str(rng.choice((1, 2, 4))), *refs)
            out["killed"] += kill9_after(proc, delay)
            out["kill_points"] += 1
            out["delays"].append(round(delay, 3))
            out["problems"] += [f"seed {seed} after kill: {p}" for p in home_problems(home)]
            p = pfx(home, "install", *refs)
            if p.returncode != 0:
                out["problems"].append(f"seed {seed}: rerun failed: {p.stderr[-300:]}")
            got = json.loads(pfx(home, "list", "--json").stdout)
            if sorted(r["manifest"] for r in got) != sorted(m.digest for m in ms):
                out["problems"].append(f"seed {seed}: installed set differs after rerun")
            out["problems"] += [f"seed {seed} after rerun: {p}" for p in home_problems(home) + gc_cleans_tmp(home)]
    return out


def run_publish_kills(s3_url: str, tmp: Path, seeds, *, delay_s: float = 0.05) -> dict:
    bucket = new_bucket(s3_url, "crash")
    url = f"s3://{bucket}/reg"
    out = {"kill_points": 0, "killed": 0, "resumed": 0, "problems": []}
    home = tmp / "publisher"
    with chaos_proxy(s3_url) as (proxy, state):
        pfx(home, "remote", "add", "s3", url, "--endpoint-url", proxy, check=True)
        state.delay_s = delay_s
        h = Home.open(home, offline=False)
        add_concept(h, tmp, "warmup", "1.0.0", big=True)
        h.close()
        baseline = timed(home, "publish", "warmup@1.0.0")
        out["baseline_s"] = round(baseline, 2)
        for seed in seeds:
            rng = random.Random(seed)
            h = Home.open(home, offline=False)
            # Sometimes a new version of an existing package (the kill may land in the package CAS).
            name = f"pk{seed % 3}" if rng.random() < 0.5 else f"pn{seed}"
            version = f"1.{seed}.0"
            m = add_concept(h, tmp, name, version, seed=seed, big=True)
            h.close()
            proc = start_pfx(home, "publish", m.ref())
            out["killed"] += kill9_after(proc, rng.uniform(0.1, 0.95) * baseline)
            out["kill_points"] += 1
            out["problems"] += [f"seed {seed} after kill: {p}"
                                for p in remote_problems(s3_url, bucket, "reg/") + home_problems(home)]
            p = pfx(home, "publish", m.ref())
            if p.returncode != 0:
                out["problems"].append(f"seed {seed}: rerun failed {p.returncode}: {p.stderr[-300:]}")
            out["resumed"] += "completed an interrupted publish" in p.stdout
        state.delay_s = 0
    out["problems"] += remote_problems(s3_url, bucket, "reg/", require_indexed=True)
    # Everything published is installable from a fresh home, and verifies.
    fresh = tmp / "publish-check"
    pfx(fresh, "remote", "add", "s3", url, "--endpoint-url", s3_url, check=True)
    h = Home.open(home)
    refs = [f"{r['name']}@{r['version']}" for r in h.installed()]
    h.close()
    p = pfx(fresh, "install", *refs)
    if p.returncode != 0:
        out["problems"].append(f"install of all published failed: {p.stderr[-300:]}")
    out["problems"] += home_problems(fresh)
    return out


def _write_raw_blob(home: Path, data: bytes, age_s: float) -> str:
    hexd = hashlib.sha256(data).hexdigest()
    d = home / "blobs" / "sha256" / hexd[:2]
    d.mkdir(parents=True, exist_ok=True)
    (d / hexd).write_bytes(data)
    t = time.time() - age_s
    os.utime(d / hexd, (t, t))
    return "sha256:" + hexd


def _gc_home(tmp: Path, seed: int, garbage: int) -> tuple[Path, list]:
    home = tmp / f"gc-{seed}"
    h = Home.open(home)
    kept = [add_concept(h, tmp, f"keep{i}", "1.0.0", seed=seed * 10 + i) for i in range(3)]
    gone = [add_concept(h, tmp, f"gone{i}", "1.0.0", seed=seed * 10 + 5 + i) for i in range(3)]
    for m in gone:
        h.remove(m.name)
    h.close()
    for f in (home / "blobs" / "sha256").rglob("*"):
        if f.is_file():  # every blob is old enough for gc (grace 0 below anyway)
            os.utime(f, (time.time() - 7200,) * 2)
    for i in range(garbage):
        _write_raw_blob(home, f"garbage {seed} {i}".encode(), 7200)
    return home, kept


def run_gc_kills(tmp: Path, seeds, *, garbage: int = 4000) -> dict:
    out = {"kill_points": 0, "killed": 0, "problems": []}
    baseline = timed(_gc_home(tmp, 9999, garbage)[0], "gc", "--grace", "0")
    out["baseline_s"] = round(baseline, 2)
    for seed in seeds:
        rng = random.Random(seed)
        home, kept = _gc_home(tmp, seed, garbage)
        proc = start_pfx(home, "gc", "--grace", "0")
        out["killed"] += kill9_after(proc, rng.uniform(0.1, 0.95) * baseline)
        out["kill_points"] += 1
        out["problems"] += [f"seed {seed} after kill: {p}" for p in home_problems(home)]
        pfx(home, "gc", "--grace", "0", check=True)
        h = Home.open(home)
        left = {d for d, _ in h.store.iter_blobs()}
        want = {b["digest"] for m in kept for b in m.blobs()} | {m.digest for m in kept}
        if left != want:
            out["problems"].append(f"seed {seed}: after gc the store holds {len(left)} blobs, expected {len(want)}")
        if sorted(r["name"] for r in h.installed()) != ["keep0", "keep1", "keep2"]:
            out["problems"].append(f"seed {seed}: installed set changed")
        h.close()
        out["problems"] += [f"seed {seed} after rerun: {p}" for p in home_problems(home)]
    return out


def test_kill9_install_at_random_points(s3_url, tmp_path):
    r = run_install_kills(s3_url, tmp_path, seeds=range(3))
    assert r["problems"] == []
    assert r["killed"] >= 2, r  # most seeds really interrupted the install


def test_kill9_publish_at_random_points(s3_url, tmp_path):
    r = run_publish_kills(s3_url, tmp_path, seeds=range(3))
    assert r["problems"] == []
    assert r["killed"] >= 2, r


def test_kill9_gc_at_random_points(tmp_path):
    r = run_gc_kills(tmp_path, seeds=range(2))
    assert r["problems"] == []
    assert r["killed"] >= 1, r


# --------------------------------------------------------------------------------------------------
# kill -9 during training, then --resume


def run_train_kill(tmp: Path, seed: int, *, steps: int = 120) -> dict:
    """Kill `pfx train` a seeded moment after its first checkpoint appears; resume must complete."""
    from tests.enginekit import photo_folder

    rng = random.Random(seed)
    home = tmp / f"train-{seed}"
    photos = photo_folder(tmp / f"photos-{seed}", n=3, seed=seed % 5)
    args = ["train", str(photos), "--name", "crashcat", "--superclass", "cat", "--steps", str(steps),
            "--batch-size", "1", "--previews", "0", "--seed", str(seed), "--json"]
    ckpt = home / "work" / "crashcat-0.1.0.ckpt"
    out = {"kill_points": 0, "problems": [], "checkpoint_step": None}
    proc = start_pfx(home, *args)
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    if not ckpt.exists():
        proc.kill()
        proc.communicate()
        return {**out, "problems": [f"seed {seed}: no checkpoint appeared (rc {proc.returncode})"]}
    killed = kill9_after(proc, rng.uniform(0.0, 1.5))
    out["kill_points"] += 1
    if not killed:
        out["problems"].append(f"seed {seed}: training finished before the kill")
    out["problems"] += home_problems(home)
    if json.loads(pfx(home, "list", "--json").stdout) != []:
        out["problems"].append("a killed training run recorded a concept")
    from safetensors import safe_open

    with safe_open(str(ckpt), "pt") as f:  # the checkpoint on disk is always a whole one
        out["checkpoint_step"] = json.loads(f.metadata()["pfx_checkpoint"])["step"]
    p = pfx(home, *args, "--resume")
    if p.returncode != 0:
        return {**out, "problems": out["problems"] + [f"resume failed: {p.stderr[-500:]}"]}
    info = json.loads(p.stdout)
    if ckpt.exists():
        out["problems"].append("the checkpoint was not consumed by the completed run")
    h = Home.open(home)
    (row,) = h.installed()
    from perfusion_hub.concept import read_header_bytes

    header = read_header_bytes(h.store.read_bytes(h.manifest(row["manifest"]).concept["digest"]))
    if header.training()["steps"] != steps or info["steps"] != steps:
        out["problems"].append(f"resumed run recorded {header.training()['steps']} steps")
    h.close()
    out["problems"] += home_problems(home) + gc_cleans_tmp(home)
    return out


@needs_toy
def test_kill9_training_after_first_checkpoint_then_resume(tmp_path):
    r = run_train_kill(tmp_path, seed=3)
    assert r["problems"] == []
    assert r["checkpoint_step"] in (50, 100)


# --------------------------------------------------------------------------------------------------
# Disk full and unwritable homes


def _fsize_limit(limit: int):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


def test_disk_full_during_install_is_a_clear_error_and_nothing_is_corrupt(s3_url, tmp_path):
    url, ms = make_registry(s3_url, tmp_path, 2, tag="df")
    home = tmp_path / "h"
    pfx(home, "remote", "add", "s3", url, "--endpoint-url", s3_url, check=True)
    pfx(home, "list", check=True)  # the index exists; the concepts (60 KB each) will not fit
    p = subprocess.run(["pfx", "install", *[m.ref() for m in ms]], check=False, env=pfx_env(home), capture_output=True,
                       text=True, timeout=120, preexec_fn=_fsize_limit(32 << 10))
    assert clean_error(p), (p.returncode, p.stderr)
    assert "too large" in p.stderr.lower() or "no space" in p.stderr.lower() or "full" in p.stderr.lower(), p.stderr
    assert home_problems(home) == []
    assert json.loads(pfx(home, "list", "--json").stdout) == []
    assert list((home / "tmp").iterdir()) == []  # the failed writes removed their temp files
    pfx(home, "install", *[m.ref() for m in ms], check=True)
    assert home_problems(home) == []


def test_disk_full_for_the_index_is_a_clear_error(s3_url, tmp_path):
    url, ms = make_registry(s3_url, tmp_path, 1, tag="dq")
    home = tmp_path / "h"
    pfx(home, "remote", "add", "s3", url, "--endpoint-url", s3_url, check=True)
    size = (home / "pfx.sqlite").stat().st_size
    # Blobs fit (the concept is ~60 KB), the SQLite files may not grow past their current size.
    p = subprocess.run(["pfx", "install", ms[0].ref()], check=False, env=pfx_env(home), capture_output=True, text=True,
                       timeout=120, preexec_fn=_fsize_limit(max(size, 64 << 10)))
    assert p.returncode == 0 or clean_error(p), (p.returncode, p.stderr)
    assert home_problems(home) == []
    pfx(home, "install", ms[0].ref(), check=True)
    assert home_problems(home) == []


def test_home_under_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    p = pfx(tmp_path / "afile" / "home", "list")
    assert clean_error(p), (p.returncode, p.stderr)
    assert "afile" in p.stderr


@pytest.mark.parametrize("what", ["tmp", "shard"])
def test_unwritable_store_is_a_clear_error_and_nothing_is_corrupt(s3_url, tmp_path, what):
    url, ms = make_registry(s3_url, tmp_path, 1, tag=f"ro{what}")
    home = tmp_path / "h"
    pfx(home, "remote", "add", "s3", url, "--endpoint-url", s3_url, check=True)
    if what == "tmp":  # the temp folder replaced by a file: no write can even start
        (home / "tmp").rmdir()
        blocker = home / "tmp"
    else:  # the blob shard the concept goes to is a file: the final rename cannot happen
        hexd = ms[0].concept["digest"][7:]
        blocker = home / "blobs" / "sha256" / hexd[:2]
    blocker.write_text("not a folder")
    p = pfx(home, "install", ms[0].ref())
    assert clean_error(p), (p.returncode, p.stderr)
    assert str(blocker) in p.stderr  # the message names the path in the way
    assert "Traceback" not in pfx(home, "verify").stderr
    blocker.unlink()
    assert json.loads(pfx(home, "list", "--json").stdout) == []
    assert home_problems(home) == []
    pfx(home, "install", ms[0].ref(), check=True)
    assert home_problems(home) == []


@needs_toy
def test_disk_full_and_unwritable_output_during_training_are_clear_errors(tmp_path):
    from tests.enginekit import photo_folder

    home = tmp_path / "h"
    photos = photo_folder(tmp_path / "photos", n=2)
    args = ["train", str(photos), "--name", "fullcat", "--superclass", "cat", "--batch-size", "1", "--previews", "0"]
    # Files capped at 16 KB: the first write past that (index, covariance or concept) fails with EFBIG.
    p = subprocess.run(["pfx", *args, "--steps", "2"], check=False, env=pfx_env(home), capture_output=True, text=True,
                       timeout=300, preexec_fn=_fsize_limit(16 << 10))
    assert clean_error(p), (p.returncode, p.stderr[-2000:])
    assert any(w in p.stderr.lower() for w in ("disk", "too large", "full")), p.stderr
    assert home_problems(home) == []
    # The checkpoint cannot be written (its path is taken by a folder): training stops at step 50 with
    # a clear error, records nothing, and leaves the home clean.
    (home / "work" / "fullcat-0.1.0.ckpt").mkdir(parents=True)
    p = pfx(home, *args, "--steps", "60", timeout=300)
    assert clean_error(p), (p.returncode, p.stderr[-2000:])
    assert "fullcat-0.1.0.ckpt" in p.stderr
    assert home_problems(home) == []
    assert json.loads(pfx(home, "list", "--json").stdout) == []
