"""Faults between boto3 and S3 (tests/kit/proxy.py): what tests/registry/test_install_faults.py does not cover.

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

The `run_*` scenarios are in tests/kit/scenarios.py; bench/hardening.py runs them with more seeds.
"""

from __future__ import annotations

import pytest

from registry.errors import EXIT_REMOTE
from registry.home import Home
from registry.install import install
from registry.publish import publish
from tests.kit.checks import home_problems, remote_problems
from tests.kit.concepts import add_concept, publish_big_concepts
from tests.kit.proxy import Rule, fault_proxy, key_kind, on
from tests.kit.runner import clean_error, pfx
from tests.kit.s3 import new_bucket
from tests.kit.scenarios import PUBLISH_REQUESTS, run_cli_install_chaos, run_publish_matrix

pytestmark = pytest.mark.usefixtures("aws_env")


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
    with fault_proxy(s3_url) as (proxy, state):
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
    with fault_proxy(s3_url) as (proxy, state):
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
    with fault_proxy(s3_url) as (proxy, state):
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
    with fault_proxy(s3_url) as (proxy, state):
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
