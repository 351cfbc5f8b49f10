"""--single-writer as a real mode, and no half-published version after a failure between steps.

* On s3rver (ignores If-None-Match and If-Match) in single-writer mode pfx sends no conditional
  header and checks before it writes: a stale ETag still loses (CasFailed), an existing claim is
  still found. On RGW (honours both) a --single-writer remote still gets every conditional header.
* A publish whose index update fails after its claim (a 500 storm on the package document; a
  `kill -9` while it reads it) leaves a version that is installable exactly, and that the next
  publish from the same home, `pfx registry compact` or an exact `pfx tag` / `pfx yank` from any home
  lists - on s3rver in single-writer mode and on RGW with conditional writes.
"""

from __future__ import annotations

import os
import time

import pytest

from registry.capabilities import prepare_writes
from registry.home import Home
from registry.publish import publish, tag, yank
from registry.remotes import open_remote
from registry.remotes.base import CasFailed, claim_key, package_key
from registry.resolve import fetch_package, read_claim
from tests.kit.concepts import add_concept
from tests.kit.proxy import Rule, fault_proxy
from tests.kit.runner import pfx, pfx_env, start_pfx
from tests.kit.s3 import new_bucket
from tests.kit.servers import S3RVER_ENV

pytestmark = pytest.mark.usefixtures("aws_env")


def _server(request, kind: str) -> tuple[str, str, dict, list[str]]:
    """(endpoint, bucket URL, extra env for pfx, extra `remote add` flags) on `kind`."""
    if kind == "s3rver":
        srv = request.getfixturevalue("s3rver")
        bucket = f"pfx-{os.urandom(6).hex()}"
        srv.client().create_bucket(Bucket=bucket)
        return srv.endpoint, f"s3://{bucket}/reg", S3RVER_ENV, ["--single-writer"]
    ep = request.getfixturevalue("rgw").endpoint
    return ep, f"s3://{new_bucket(ep)}/reg", {}, []


def _listed(url: str, endpoint: str, name: str) -> list[str]:
    pkg = fetch_package(open_remote({"name": "x", "url": url, "endpoint_url": endpoint}, offline=False), name)
    return sorted(pkg.versions) if pkg else []


# --------------------------------------------------------------------------------------------------
# Which headers go out


def test_single_writer_on_s3rver_sends_no_conditional_header_yet_checks(tmp_path, s3rver):
    bucket = f"pfx-{os.urandom(6).hex()}"
    s3rver.client().create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/reg"
    with fault_proxy(s3rver.endpoint) as (ep, spy):
        h = Home.open(tmp_path / "h", offline=False)
        h.add_remote("solo", url, endpoint_url=ep, single_writer=True)
        for i in range(2):
            add_concept(h, tmp_path, "bowl", f"1.{i}.0", seed=i)
        warnings = [publish(h, f"bowl@1.{i}.0")["warnings"] for i in range(2)]
        warnings.append(tag(h, "bowl@1.0.0", "stable")["warnings"])
        warnings.append(yank(h, "bowl@1.1.0")["warnings"])
        assert all(len(w) == 1 and "single-writer mode" in w[0] for w in warnings), warnings
        assert [c for c in spy.conditional("PUT") if "/probe/" not in c[0]] == []
        assert spy.count("PUT", "/packages/") == 4 and spy.count("PUT", "/claims/") == 2
    # the check before each write still catches what it can see: a stale ETag, an existing claim
    rem = open_remote({**h.get_remote("solo"), "endpoint_url": s3rver.endpoint}, offline=False)
    assert prepare_writes(h, rem)  # the recorded probe: a warning, and the headers switched off
    assert not rem.conditional_create and not rem.conditional_swap
    doc = rem.get_doc(package_key("bowl"), max_bytes=1 << 20)
    rem.put_doc(package_key("bowl"), doc.data, etag=doc.etag)
    before = rem.get_doc(package_key("bowl"), max_bytes=1 << 20)
    with pytest.raises(CasFailed):
        rem.put_doc(package_key("bowl"), b"{}", etag='"0123456789abcdef0123456789abcdef"')
    with pytest.raises(CasFailed):
        rem.put_doc(package_key("bowl"), b"{}", etag=None)  # "create" of a document that exists
    assert rem.get_doc(package_key("bowl"), max_bytes=1 << 20).data == before.data
    assert rem.put_if_absent(claim_key("bowl", "1.0.0"), b"{}") is False
    assert read_claim(rem, "bowl", "1.0.0") is not None


def test_single_writer_on_rgw_still_sends_every_conditional_header(tmp_path, rgw):
    url = f"s3://{new_bucket(rgw.endpoint)}/reg"
    with fault_proxy(rgw.endpoint) as (ep, spy):
        h = Home.open(tmp_path / "h", offline=False)
        h.add_remote("solo", url, endpoint_url=ep, single_writer=True)
        for i in range(2):
            add_concept(h, tmp_path, "cup", f"1.{i}.0", seed=i)
            assert publish(h, f"cup@1.{i}.0")["warnings"] == []  # the store honours both: no warning
        sent = [c for c in spy.conditional("PUT") if "/probe/" not in c[0]]
    claims = [c for c in sent if "/claims/" in c[0]]
    packages = [c for c in sent if "/packages/" in c[0]]
    assert [(h_, v) for _, h_, v in claims] == [("if-none-match", "*")] * 2
    assert packages[0][1:] == ("if-none-match", "*")  # the first version creates the document
    assert packages[1][1] == "if-match" and not packages[1][2].startswith('"')  # RGW: the unquoted ETag


# --------------------------------------------------------------------------------------------------
# Failures between the claim and the index update


@pytest.mark.parametrize("kind", ["s3rver", "rgw"])
def test_index_update_failing_after_the_claim_is_completed_by_the_next_publish(kind, request, tmp_path):
    endpoint, url, extra_env, flags = _server(request, kind)
    pub = tmp_path / "pub"
    env = pfx_env(pub, **extra_env)
    h = Home.open(pub, offline=False)
    m0 = add_concept(h, tmp_path, "plate", "1.0.0")
    add_concept(h, tmp_path, "plate", "1.1.0", seed=1)
    h.close()
    with fault_proxy(endpoint) as (ep, state):
        pfx(pub, "remote", "add", "r", url, "--endpoint-url", ep, *flags, env=env, check=True)
        state.rules.append(Rule(lambda m, p: m == "PUT" and "/packages/" in p, "500", times=10**6))
        p = pfx(pub, "publish", "plate@1.0.0", "--no-sign", env=env)
        assert p.returncode == 6 and "Traceback" not in p.stderr, p.stderr
        state.rules.clear()
        rem = open_remote({"name": "r", "url": url, "endpoint_url": endpoint}, offline=False)
        assert read_claim(rem, "plate", "1.0.0")["manifest"] == m0.digest  # claimed ...
        assert fetch_package(rem, "plate") is None  # ... but not listed
        cons = tmp_path / "cons"  # an exact install works meanwhile (the claim is the truth)
        pfx(cons, "remote", "add", "r", url, "--endpoint-url", endpoint, env=pfx_env(cons, **extra_env), check=True)
        pfx(cons, "install", "plate@1.0.0", env=pfx_env(cons, **extra_env), check=True)
        p = pfx(pub, "publish", "plate@1.1.0", "--no-sign", env=env, check=True)
        assert "completed the interrupted publish of plate@1.0.0" in p.stderr
    assert _listed(url, endpoint, "plate") == ["1.0.0", "1.1.0"]
    assert fetch_package(rem, "plate").tags == {"latest": "1.1.0"}


def _kill_while_reading_the_index(pub, name: str, env: dict, state) -> None:
    """Start `pfx publish name@1.0.0`, hold its first GET of name's package document, and kill -9 it
    there: after its claim, before its index update."""
    state.rules[:] = [Rule(lambda m, p: m == "GET" and package_key(name) in p, "stall", times=1)]
    seen = len(state.log)
    proc = start_pfx(pub, "publish", f"{name}@1.0.0", "--no-sign", env=env)
    deadline = time.monotonic() + 90
    while not any(a == "stall" for _, _, a in state.log[seen:]):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.kill()
    proc.communicate()
    state.rules.clear()


def test_publish_killed_after_its_claim_is_listed_by_compact_or_by_an_exact_edit(tmp_path, s3rver):
    bucket = f"pfx-{os.urandom(6).hex()}"
    s3rver.client().create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/reg"
    pub, admin = tmp_path / "pub", tmp_path / "admin"
    env, admin_env = pfx_env(pub, **S3RVER_ENV), pfx_env(admin, **S3RVER_ENV)
    h = Home.open(pub, offline=False)
    for name in ("mug", "pot"):
        add_concept(h, tmp_path, name, "1.0.0")
    h.close()
    pfx(admin, "remote", "add", "r", url, "--endpoint-url", s3rver.endpoint, "--single-writer", env=admin_env,
        check=True)
    with fault_proxy(s3rver.endpoint) as (ep, state):
        state.stall_s = 5
        pfx(pub, "remote", "add", "r", url, "--endpoint-url", ep, "--single-writer", env=env, check=True)
        _kill_while_reading_the_index(pub, "mug", env, state)
        assert _listed(url, s3rver.endpoint, "mug") == []
        p = pfx(admin, "registry", "compact", "--json", env=admin_env, check=True)  # another home: from the journal
        assert '"repaired": 1' in p.stdout
        assert _listed(url, s3rver.endpoint, "mug") == ["1.0.0"]
        _kill_while_reading_the_index(pub, "pot", env, state)
        assert _listed(url, s3rver.endpoint, "pot") == []
        p = pfx(admin, "tag", "pot@1.0.0", "stable", env=admin_env, check=True)  # another home: from the claim
        assert "pot@stable -> 1.0.0" in p.stdout
        # the publisher's own home finds both listed already: nothing to complete, a rerun resumes
        p = pfx(pub, "publish", "mug@1.0.0", "--no-sign", env=env, check=True)
        assert "completed an interrupted publish of mug@1.0.0" in p.stdout
        assert "completed the interrupted publish of" not in p.stderr
    rem = open_remote({"name": "r", "url": url, "endpoint_url": s3rver.endpoint}, offline=False)
    assert fetch_package(rem, "pot").tags == {"latest": "1.0.0", "stable": "1.0.0"}
    assert _listed(url, s3rver.endpoint, "mug") == ["1.0.0"]
