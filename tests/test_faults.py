"""Faults between boto3 and S3 (tests/faultproxy.py): what tests/test_install_faults.py does not cover.

* publish under every fault on every request it makes (500, 503 SlowDown, reset, lost reply, truncated
  reply, wrong bytes in either direction): it succeeds after retries (or fails cleanly and a rerun
  completes), and afterwards the remote index is consistent (every indexed version has its claim,
  manifest and intact blobs; nothing claimed is left unindexed; no immutable object is corrupt);
* stalls (no reply, or a reply that stops mid-body) bounded by a small read timeout, for install
  and publish;
* install: 500 and wrong bytes on the manifest and package document, through the library and the
  real `pfx install`, with `pfx verify` clean afterwards;
* permanent faults through the real `pfx`: a clear error, a stable non-zero exit code, no traceback,
  a consistent remote and a home that verifies; a rerun without faults completes.

`run_*` functions are shared with bench/hardening.py, which runs them with more seeds.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from registry.errors import EXIT_REMOTE, PfxError
from registry.home import Home
from registry.install import install
from registry.publish import publish
from tests.conceptgen import add_concept, publish_big_concepts
from tests.faultproxy import (
    Rule,
    chaos_proxy,
    clean_error,
    home_problems,
    key_kind,
    on,
    pfx,
    remote_problems,
)
from tests.s3server import isolate_aws_env, new_bucket

PUBLISH_REQUESTS = [("PUT", "config"), ("PUT", "blob"), ("PUT", "manifest"), ("PUT", "journal"), ("PUT", "claim"),
                    ("GET", "package"), ("PUT", "package")]
NET_ACTIONS = ("500", "503", "reset", "drop", "truncate", "corrupt")


@pytest.fixture(autouse=True)
def aws_env(monkeypatch):
    isolate_aws_env(monkeypatch, "/nonexistent-pfx-test")


def run_publish_matrix(s3_url: str, tmp: Path, requests=PUBLISH_REQUESTS, actions=NET_ACTIONS, *,
                       times: int = 1, seed: int = 0, per_request: int | None = None) -> dict:
    """Publish one fresh version per (request, action) with that fault injected `times` times
    (`per_request`: only that many actions per request, rotating, so every action is still used).

    Returns figures: cases, first-try successes, clean failures that a rerun completed, and every
    problem found (a non-PfxError, a failed rerun, an inconsistent remote, a bad install)."""
    bucket = new_bucket(s3_url, "hard")
    url = f"s3://{bucket}/reg"
    rng = random.Random(seed)
    out = {"cases": 0, "ok_first_try": 0, "clean_fail_then_rerun_ok": 0, "faults_injected": 0, "problems": []}
    with chaos_proxy(s3_url) as (proxy, state):
        state.stall_s = 1.0
        home = Home.open(tmp / f"pub-{seed}", offline=False)
        home.add_remote("s3", url, endpoint_url=proxy)
        published = []
        n = per_request or len(actions)
        cases = [(r, actions[(j + k) % len(actions)]) for j, r in enumerate(requests) for k in range(n)]
        for i, ((method, kind), action) in enumerate(cases):
            name = f"f{seed}-{i}-{kind}-{action}".replace("503", "slow").replace("500", "ise")
            m = add_concept(home, tmp, name, "1.0.0", seed=rng.randrange(1 << 30), big=True)
            rule = Rule(on(method, kind), action, times)
            state.rules[:] = [rule]
            out["cases"] += 1
            try:
                publish(home, m.ref(), read_timeout=0.5)
                out["ok_first_try"] += 1
            except PfxError as e:
                state.rules.clear()
                try:
                    publish(home, m.ref(), read_timeout=0.5)
                    out["clean_fail_then_rerun_ok"] += 1
                except Exception as e2:  # noqa: BLE001
                    out["problems"].append(f"{name}: rerun after {type(e).__name__} failed: {e2!r}")
                    continue
            except Exception as e:  # noqa: BLE001 - anything but a PfxError is a bug
                out["problems"].append(f"{name}: {method} {kind} {action}: unclean {type(e).__name__}: {e}")
                continue
            if rule.times == times and kind != "config":
                out["problems"].append(f"{name}: fault {action} on {method} {kind} was never injected")
            out["faults_injected"] += times - rule.times
            published.append(m)
        state.rules.clear()
    out["problems"] += remote_problems(s3_url, bucket, "reg/", require_indexed=True)
    # Everything published installs, intact, into a fresh home (straight to the server).
    fresh = Home.open(tmp / f"fresh-{seed}", offline=False)
    fresh.add_remote("s3", url, endpoint_url=s3_url)
    try:
        install(fresh, [m.ref() for m in published])
    except Exception as e:  # noqa: BLE001
        out["problems"].append(f"install of everything published failed: {e!r}")
    fresh.close()
    out["problems"] += home_problems(tmp / f"fresh-{seed}")
    return out


def test_publish_survives_every_fault_on_every_request(s3_url, tmp_path):
    r = run_publish_matrix(s3_url, tmp_path, per_request=2)  # the full matrix runs in bench/hardening.py
    assert r["problems"] == []
    assert r["cases"] == len(PUBLISH_REQUESTS) * 2
    # Transport faults are retried inside the publish: only a wrong-bytes reply to the package GET
    # (refused by the strict parser, not retried) may need a rerun.
    assert r["ok_first_try"] >= r["cases"] - 1, r


def test_wrong_bytes_stored_by_a_store_that_checks_nothing_are_replaced(s3_url, tmp_path):
    """moto, like some S3-compatibles, stores a PUT body without checking its checksum. A body altered
    in flight must not become a permanently corrupt immutable object (readers would refuse it, and
    put_if_absent would never overwrite it): pfx compares the returned ETag with the MD5 it sent."""
    bucket = new_bucket(s3_url, "hard")
    with chaos_proxy(s3_url) as (proxy, state):
        home = Home.open(tmp_path / "h", offline=False)
        home.add_remote("s3", f"s3://{bucket}/reg", endpoint_url=proxy)
        m = add_concept(home, tmp_path, "wrongbytes", "1.0.0", big=True)
        for kind in ("blob", "manifest", "claim", "package"):
            state.rules.append(Rule(on("PUT", kind), "corrupt", 1))
        publish(home, m.ref())
        assert all(r.times == 0 for r in state.rules)
    assert remote_problems(s3_url, bucket, "reg/", require_indexed=True) == []


@pytest.mark.parametrize("action", ["stall", "stall-body"])
def test_stalls_are_bounded_by_the_read_timeout_and_retried(s3_url, tmp_path, action):
    bucket = new_bucket(s3_url, "hard")
    url = f"s3://{bucket}/reg"
    with chaos_proxy(s3_url) as (proxy, state):
        state.stall_s = 3.0
        pub = Home.open(tmp_path / "pub", offline=False)
        pub.add_remote("s3", url, endpoint_url=proxy)
        ms = [add_concept(pub, tmp_path, f"st{i}", "1.0.0", seed=i, big=True) for i in range(2)]
        state.rules[:] = [Rule(on("PUT", "claim"), action, 1), Rule(on("PUT", "blob"), action, 1)]
        import time

        t0 = time.perf_counter()
        for m in ms:
            publish(pub, m.ref(), read_timeout=0.5)
        assert all(r.times == 0 for r in state.rules)
        state.rules[:] = [Rule(on("GET", "blob"), action, 2), Rule(on("GET", "manifest"), action, 1)]
        h = Home.open(tmp_path / "c", offline=False)
        h.add_remote("s3", url, endpoint_url=proxy)
        res = install(h, [m.ref() for m in ms], read_timeout=0.5)
        elapsed = time.perf_counter() - t0
        assert [r["status"] for r in res] == ["installed"] * 2
        assert all(r.times == 0 for r in state.rules)
    # Five stalls of 3 s each would take 15 s if anything waited them out; the timeout cuts each short.
    assert elapsed < 12, elapsed
    h.close()
    assert home_problems(tmp_path / "c") == []
    assert remote_problems(s3_url, bucket, "reg/", require_indexed=True) == []


@pytest.fixture
def registry_with_four(s3_url, tmp_path):
    bucket = new_bucket(s3_url, "hard")
    url = f"s3://{bucket}/reg"
    _pub, ms = publish_big_concepts(tmp_path / "pub", tmp_path, url, s3_url, 4)
    return bucket, url, ms


def run_cli_install_chaos(s3_url: str, url: str, refs: list[str], home: Path, *, seed: int, rate: float = 0.3) -> dict:
    """`pfx install` through a proxy failing `rate` of all requests at random (seeded): it must succeed
    or fail cleanly; the home must verify either way; a rerun without faults must complete."""
    out = {"ok": False, "clean_fail": False, "faults_injected": 0, "problems": []}
    with chaos_proxy(s3_url) as (proxy, state):
        state.chaos = (random.Random(seed), rate, ("500", "503", "reset", "drop", "truncate", "corrupt"))
        p = pfx(home, "remote", "add", "s3", url, "--endpoint-url", proxy)
        if p.returncode != 0:  # the probe itself may meet faults: a clean failure, then add it again
            if not clean_error(p):
                out["problems"].append(f"remote add: unclean failure {p.returncode}: {p.stderr[-600:]}")
            state.chaos = None
            pfx(home, "remote", "add", "s3", url, "--endpoint-url", proxy, check=True)
            state.chaos = (random.Random(seed + 1), rate, ("500", "503", "reset", "drop", "truncate", "corrupt"))
        p = pfx(home, "install", *refs)
        out["faults_injected"] = sum(state.injected().values())
        if p.returncode == 0:
            out["ok"] = True
        elif clean_error(p):
            out["clean_fail"] = True
        else:
            out["problems"].append(f"install: unclean exit {p.returncode}: {p.stderr[-800:]}")
        out["problems"] += home_problems(home)
        state.chaos = None
        p = pfx(home, "install", *refs)
        if p.returncode != 0:
            out["problems"].append(f"rerun failed {p.returncode}: {p.stderr[-400:]}")
    out["problems"] += home_problems(home)
    return out


def test_cli_install_under_random_faults_then_verify(s3_url, tmp_path, registry_with_four):
    _bucket, url, ms = registry_with_four
    outcomes = []
    for seed in range(2):
        r = run_cli_install_chaos(s3_url, url, [m.ref() for m in ms], tmp_path / f"h{seed}", seed=seed)
        assert r["problems"] == [], r
        assert r["faults_injected"] > 0
        outcomes.append(r["ok"])
    assert any(outcomes), "retries should carry at least one of the installs through"


def test_cli_install_wrong_manifest_and_index_bytes_fail_cleanly(s3_url, tmp_path, registry_with_four):
    _bucket, url, ms = registry_with_four
    with chaos_proxy(s3_url) as (proxy, state):
        home = tmp_path / "h"
        pfx(home, "remote", "add", "s3", url, "--endpoint-url", proxy, check=True)
        for kind in ("manifest", "package"):
            state.rules[:] = [Rule(on("GET", kind), "corrupt", 100)]
            p = pfx(home, "install", ms[0].ref())
            # Refused by the digest check (5) or by botocore's CRC check, retried, then given up (6).
            assert clean_error(p) and p.returncode in (5, 6), (kind, p.returncode, p.stderr)
            assert ms[0].name in p.stderr or f"{kind}s/" in p.stderr  # the message names what failed
            assert home_problems(home) == []
            assert pfx(home, "list", "--json").stdout.strip() == "[]"
        state.rules[:] = [Rule(on("GET", "manifest"), "500", 2), Rule(on("GET", "package"), "503", 2),
                          Rule(on("GET", "blob"), "500", 2)]
        pfx(home, "install", *[m.ref() for m in ms], check=True)
        assert all(r.times == 0 for r in state.rules)
    assert home_problems(home) == []


def test_cli_publish_permanent_fault_fails_cleanly_and_rerun_completes(s3_url, tmp_path):
    bucket = new_bucket(s3_url, "hard")
    url = f"s3://{bucket}/reg"
    home = tmp_path / "pub"
    h = Home.open(home, offline=False)
    m = add_concept(h, tmp_path, "perm", "1.0.0", big=True)
    h.close()
    with chaos_proxy(s3_url) as (proxy, state):
        pfx(home, "remote", "add", "s3", url, "--endpoint-url", proxy, check=True)
        for kind in ("claim", "package", "blob"):
            state.rules[:] = [Rule(on("PUT", kind), "500", 1000)]
            p = pfx(home, "publish", m.ref())
            assert clean_error(p) and p.returncode == EXIT_REMOTE, (kind, p.returncode, p.stderr)
            assert "after 6 tries" in p.stderr
            assert remote_problems(s3_url, bucket, "reg/") == []  # nothing half-indexed
        state.rules.clear()
        p = pfx(home, "publish", m.ref(), check=True)
        # The claim was written before the package PUT failed, so the rerun completes that publish.
        assert "completed an interrupted publish" in p.stdout or "published" in p.stdout
    assert remote_problems(s3_url, bucket, "reg/", require_indexed=True) == []
    assert home_problems(home) == []


def test_every_request_kind_is_classified():
    # The matchers the tests rely on see each key family (guards against a layout change).
    assert key_kind("/b/reg/blobs/sha256/ab/" + "a" * 64) == "blob"
    assert key_kind("/b/reg/claims/ab/" + "a" * 64 + "/1.0.0.json") == "claim"
    assert key_kind("/b/reg/packages/ab/" + "a" * 64 + ".json") == "package"
