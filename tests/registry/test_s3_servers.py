"""pfx on S3 servers nobody here wrote: Ceph RGW 16 (tests/kit/rgw.py), s3rver (tests/kit/s3rver.py,
a real store that ignores If-None-Match and If-Match), beside moto.

* the capability probe finds, per server, create / swap / the If-Match ETag spelling, and says so;
* both If-Match spellings stay conditional where a store matches them (a stale ETag is refused);
* the whole CLI works on RGW: publish, republish, conflict (exit 4), signed install with equal
  bytes, compact + search, tag, yank;
* on s3rver publish and compact are refused with exit 10 and a hint that keeps --endpoint-url and
  --profile and works when pasted; then single-writer mode publishes, warning every time;
* an endpoint that is down or answers 500 is "could not probe" (exit 6), never recorded as a store
  that lacks the feature, and the next publish probes again;
* torn reads of index documents (half a document with a matching Content-Length) are re-read.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from registry.capabilities import describe, probe
from registry.errors import IntegrityError
from registry.home import Home
from registry.install import install
from registry.publish import publish, yank
from registry.remotes import open_remote
from registry.remotes.base import CasFailed
from registry.resolve import TORN_READ_ATTEMPTS
from tests.kit.concepts import add_concept
from tests.kit.proxy import Rule, fault_proxy
from tests.kit.runner import pfx, pfx_env
from tests.kit.s3 import moto_server, new_bucket
from tests.kit.servers import S3RVER_ENV

pytestmark = pytest.mark.usefixtures("aws_env")

S3_SERVERS = ("moto", "rgw")  # each test using s3_url runs on both (tests/conftest.py)

EXPECTED = {  # (create, swap, etag_form) as the probe must find them
    "moto": ("honoured", "honoured", "quoted"),
    "rgw": ("honoured", "honoured", "unquoted"),
    "s3rver": ("ignored", "ignored", None),
}


@pytest.fixture(scope="module")
def moto_url():
    with moto_server() as url:
        yield url


def _store(request, kind: str) -> tuple[str, str]:
    """(endpoint, a fresh bucket) on the server `kind`."""
    if kind == "moto":
        endpoint = request.getfixturevalue("moto_url")
    elif kind == "rgw":
        endpoint = request.getfixturevalue("rgw").endpoint
    else:
        srv = request.getfixturevalue("s3rver")
        bucket = f"pfx-{os.urandom(6).hex()}"
        srv.client().create_bucket(Bucket=bucket)
        return srv.endpoint, bucket
    return endpoint, new_bucket(endpoint)


def _remote(kind: str, endpoint: str, bucket: str, **kw):
    return open_remote({"name": kind, "url": f"s3://{bucket}/reg", "endpoint_url": endpoint, **kw}, offline=False)


# --------------------------------------------------------------------------------------------------
# The probe and the ETag spelling


@pytest.mark.parametrize("kind", ["moto", "rgw", "s3rver"])
def test_probe_finds_each_capability(kind, request):
    endpoint, bucket = _store(request, kind)
    rem = _remote(kind, endpoint, bucket)
    t0 = time.monotonic()
    res = probe(rem)
    took = time.monotonic() - t0
    assert res["error"] is None, res
    assert (res["create"], res["swap"], res["etag_form"]) == EXPECTED[kind]
    assert res["ok"] is (kind != "s3rver")
    assert list(rem.list_keys("probe/")) == []  # it cleans up after itself
    text = "\n".join(describe(res))
    if kind == "rgw":
        assert "unquoted (If-Match: <md5>): this store does not match the quoted form" in text
    if kind == "s3rver":
        assert "IGNORED (a second create of the same key overwrote the first)" in text
        assert "IGNORED (a swap with a stale ETag overwrote the document)" in text
    print(json.dumps({"server": kind, "probe": {k: res[k] for k in ("create", "swap", "etag_form", "server")},
                      "requests": rem.requests, "seconds": round(took, 3)}))


@pytest.mark.parametrize("kind", ["moto", "rgw"])
def test_if_match_spellings_stay_conditional(kind, request):
    """moto matches both spellings, RGW only the unquoted one; in every spelling a stale ETag is
    refused, so picking a spelling can never turn a swap into an overwrite."""
    endpoint, bucket = _store(request, kind)
    rem = _remote(kind, endpoint, bucket)
    swapped = {}
    for n, form in enumerate(("quoted", "unquoted")):
        doc = rem.get_doc("d.json", max_bytes=64)
        fresh = doc.etag if doc else rem.put_doc("d.json", b'{"n":0}', etag=None)
        rem.etag_form = form
        try:
            rem.put_doc("d.json", json.dumps({"n": n + 1}).encode(), etag=fresh)
            swapped[form] = True
        except CasFailed:
            swapped[form] = False
        before = rem.get_doc("d.json", max_bytes=64).data
        with pytest.raises(CasFailed):  # an ETag the document never had
            rem.put_doc("d.json", b'{"n":99}', etag='"0123456789abcdef0123456789abcdef"')
        if swapped[form]:
            with pytest.raises(CasFailed):  # the ETag that went stale with that swap
                rem.put_doc("d.json", b'{"n":98}', etag=fresh)
        assert rem.get_doc("d.json", max_bytes=64).data == before
    assert swapped == {"moto": {"quoted": True, "unquoted": True}, "rgw": {"quoted": False, "unquoted": True}}[kind]


# --------------------------------------------------------------------------------------------------
# The CLI on RGW


def test_pfx_on_rgw_end_to_end(tmp_path, rgw):
    ep = rgw.endpoint
    url = f"s3://{new_bucket(ep, 'flow')}/reg"
    pub, cons, other = tmp_path / "pub", tmp_path / "cons", tmp_path / "other"
    p = pfx(pub, "remote", "add", "rgw", url, "--endpoint-url", ep, check=True)
    assert "ETag form in If-Match:                unquoted" in p.stdout
    assert "conditional writes: ok (safe for concurrent publishers)" in p.stdout and p.stderr == ""
    alice = json.loads(pfx(pub, "key", "generate", "alice", "--json", check=True).stdout)
    h = Home.open(pub, offline=False)
    m1 = add_concept(h, tmp_path, "team/cat", "1.0.0", description="grey tabby cat", covariance=b"C" * 512)
    add_concept(h, tmp_path, "team/cat", "1.1.0", seed=2, description="grey tabby cat")
    h.close()
    t0 = time.monotonic()
    res = json.loads(pfx(pub, "publish", "team/cat@1.0.0", "--json", check=True).stdout)
    assert res["signed_by"] == [alice["keyid"]] and res["warnings"] == []
    assert pfx(pub, "publish", "team/cat@1.1.0", check=True).stderr == ""  # a second version: a real swap
    p = pfx(pub, "publish", "team/cat@1.0.0", check=True)  # republishing is idempotent
    assert "completed an interrupted publish of team/cat@1.0.0" in p.stdout
    publish_s = time.monotonic() - t0
    # the same version with other bytes, from another machine: refused, exit 4
    ho = Home.open(other, offline=False)
    add_concept(ho, tmp_path, "team/cat", "1.0.0", seed=9)
    ho.close()
    pfx(other, "remote", "add", "rgw", url, "--endpoint-url", ep, check=True)
    p = pfx(other, "publish", "team/cat@1.0.0", "--no-sign")
    assert p.returncode == 4 and "team/cat@1.0.0 already exists" in p.stderr
    # a consumer that trusts alice for 'team' installs the same bytes
    pfx(cons, "remote", "add", "rgw", url, "--endpoint-url", ep, check=True)
    pfx(cons, "key", "trust", "team", alice["public"], check=True)
    got = json.loads(pfx(cons, "install", "team/cat@1.0.0", "--json", check=True).stdout)[0]
    assert got["manifest"] == m1.digest and got["signed_by"] == alice["keyid"]
    hp, hc = Home.open(pub), Home.open(cons)
    for b in m1.blobs():
        assert hc.store.blob_path(b["digest"]).read_bytes() == hp.store.blob_path(b["digest"]).read_bytes()
    hp.close()
    hc.close()
    # index edits and compaction: each one compare-and-swap (unquoted If-Match), no retries storm
    t0 = time.monotonic()
    assert "team/cat@stable -> 1.0.0" in pfx(pub, "tag", "team/cat@1.0.0", "stable", check=True).stdout
    assert "yanked team/cat@1.1.0" in pfx(pub, "yank", "team/cat@1.1.0", check=True).stdout
    stats = json.loads(pfx(pub, "registry", "compact", "--json", check=True).stdout)
    edits_s = time.monotonic() - t0
    assert stats["packages"] == 1 and stats["warnings"] == []
    found = json.loads(pfx(cons, "search", "tabby", "--remote", "rgw", "--json", check=True).stdout)
    assert [r["name"] for r in found] == ["team/cat"]
    info = json.loads(pfx(cons, "info", "team/cat", "--remote", "rgw", "--json", check=True).stdout)
    assert info["dist_tags"] == {"latest": "1.0.0", "stable": "1.0.0"}
    assert [(v["version"], v["yanked"]) for v in info["versions"]] == [("1.0.0", False), ("1.1.0", True)]
    assert edits_s < 15, edits_s  # the quoted If-Match made each edit retry 40 times (~20 s) here
    print(json.dumps({"server": "rgw", "publish_3_s": round(publish_s, 2), "tag_yank_compact_s": round(edits_s, 2)}))


# --------------------------------------------------------------------------------------------------
# A store without conditional writes (s3rver): refused, then single-writer mode


def test_s3rver_is_refused_with_exit_10_and_the_hint_works_as_printed(tmp_path, s3rver):
    bucket = f"pfx-{os.urandom(6).hex()}"
    s3rver.client().create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/reg"
    creds = tmp_path / "aws-credentials"
    creds.write_text("[s3rver]\naws_access_key_id = S3RVER\naws_secret_access_key = S3RVER\n")
    home = tmp_path / "pub"
    env = pfx_env(home, AWS_SHARED_CREDENTIALS_FILE=str(creds))  # env keys are test/test: only the profile works
    with fault_proxy(s3rver.endpoint) as (ep, spy):
        p = pfx(home, "remote", "add", "solo", url, "--endpoint-url", ep, "--profile", "s3rver", env=env, check=True)
        assert "IGNORED (a second create of the same key overwrote the first)" in p.stdout
        assert "IGNORED (a swap with a stale ETag overwrote the document)" in p.stdout
        rows = json.loads(pfx(home, "remote", "list", "--json", env=env, check=True).stdout)
        assert rows[0]["mode"] == "refused (no If-None-Match: *, no If-Match)"
        h = Home.open(home, offline=False)
        m = add_concept(h, tmp_path, "lamp", "1.0.0", description="brass desk lamp")
        add_concept(h, tmp_path, "lamp", "1.1.0", seed=1, description="brass desk lamp")
        h.close()
        for args in (("publish", "lamp@1.0.0"), ("registry", "compact")):
            p = pfx(home, *args, env=env)
            assert p.returncode == 10, p.stderr
            assert "does not honour If-None-Match: * (create if absent) and If-Match (compare-and-swap)" in p.stderr
            assert "Traceback" not in p.stderr
        hint = p.stderr.split("re-add it in single-writer mode: ", 1)[1].split(" (if the store", 1)[0]
        assert hint == (f"pfx remote remove solo && pfx remote add solo {url} --endpoint-url {ep} "
                        "--profile s3rver --default --single-writer")
        before = len(spy.requests)
        r = subprocess.run(hint, shell=True, env=env, capture_output=True, text=True, timeout=120, check=False)
        assert r.returncode == 0, r.stderr
        assert "publishing in single-writer mode" in r.stderr
        for v in ("1.0.0", "1.1.0"):  # a warning at every publish
            p = pfx(home, "publish", f"lamp@{v}", env=env, check=True)
            assert "warning: remote 'solo' does not honour" in p.stderr and "single-writer mode" in p.stderr
        p = pfx(home, "yank", "lamp@1.1.0", env=env, check=True)
        assert "warning: remote 'solo'" in p.stderr
        p = pfx(home, "registry", "compact", env=env, check=True)
        assert "warning: remote 'solo'" in p.stderr
        # single-writer mode on this store: not one conditional header outside the probe's own keys
        assert [c for c in spy.conditional("PUT", since=before) if "/probe/" not in c[0]] == []
        assert spy.count("PUT", "/claims/") == 2 and spy.count("PUT", "/packages/") >= 3
    cons = tmp_path / "cons"
    p = pfx(cons, "remote", "add", "solo", url, "--endpoint-url", s3rver.endpoint, env=pfx_env(cons, **S3RVER_ENV),
            check=True)
    got = json.loads(pfx(cons, "install", "lamp", "--json", env=pfx_env(cons, **S3RVER_ENV), check=True).stdout)
    assert got[0]["version"] == "1.0.0" and got[0]["manifest"] == m.digest  # 1.1.0 is yanked
    found = pfx(cons, "search", "brass", "--remote", "solo", "--json", env=pfx_env(cons, **S3RVER_ENV), check=True)
    assert [r["name"] for r in json.loads(found.stdout)] == ["lamp"]


# --------------------------------------------------------------------------------------------------
# A store that is down or failing is not a store without conditional writes


def test_failed_probe_is_never_recorded_and_the_next_publish_probes_again(tmp_path, moto_url):
    url = f"s3://{new_bucket(moto_url)}/reg"
    home = tmp_path / "h"
    h = Home.open(home, offline=False)
    add_concept(h, tmp_path, "vase", "1.0.0")
    h.close()
    with fault_proxy(moto_url) as (ep, state):
        state.rules.append(Rule(lambda m, p: True, "500", times=10**6))  # a store answering 500 to everything
        p = pfx(home, "remote", "add", "flaky", url, "--endpoint-url", ep, check=True)
        assert "warning: could not probe flaky:" in p.stderr and "nothing recorded" in p.stderr
        assert "ignore" not in p.stderr.lower()
        assert json.loads(pfx(home, "remote", "list", "--json", check=True).stdout)[0]["mode"] == "not probed"
        p = pfx(home, "publish", "vase")
        assert p.returncode == 6 and "could not probe flaky" in p.stderr and "nothing was written" in p.stderr
        assert json.loads(pfx(home, "remote", "list", "--json", check=True).stdout)[0]["mode"] == "not probed"
        state.rules.clear()  # the store recovers: the next publish probes again and succeeds
        p = pfx(home, "publish", "vase", check=True)
        assert "published vase@1.0.0" in p.stdout
    assert json.loads(pfx(home, "remote", "list", "--json", check=True).stdout)[0]["mode"] == "publish"
    # an endpoint nobody listens on: the same (exit 6, could not probe), not a capability refusal
    down = tmp_path / "down"
    pfx(down, "remote", "add", "down", url, "--endpoint-url", "http://127.0.0.1:9", check=True)
    h = Home.open(down, offline=False)
    add_concept(h, tmp_path, "vase", "1.0.0")
    h.close()
    p = pfx(down, "publish", "vase")
    assert p.returncode == 6 and "could not probe down" in p.stderr and "Could not connect" in p.stderr
    # a profile that does not exist: added, not probed, and publish says why (it was a traceback)
    p = pfx(down, "remote", "add", "prof", url, "--endpoint-url", moto_url, "--profile", "nope", check=True)
    assert "could not probe prof" in p.stderr and "profile (nope) could not be found" in p.stderr
    p = pfx(down, "publish", "vase", "--to", "prof")
    assert p.returncode == 6 and "profile (nope)" in p.stderr and "Traceback" not in p.stderr


# --------------------------------------------------------------------------------------------------
# Torn reads


def test_torn_reads_of_index_documents_are_read_again(tmp_path, s3_url):
    url = f"s3://{new_bucket(s3_url)}/reg"
    with fault_proxy(s3_url) as (ep, spy):
        pub = Home.open(tmp_path / "pub", offline=False)
        pub.add_remote("s3", url, endpoint_url=ep)
        add_concept(pub, tmp_path, "jug", "1.0.0")
        publish(pub, "jug")
        cons = Home.open(tmp_path / "cons", offline=False)
        cons.add_remote("s3", url, endpoint_url=ep)
        spy.tear(lambda p: "/packages/" in p, times=2)  # read twice while "being written"
        assert install(cons, ["jug@1.0.0"])[0]["status"] == "installed"
        assert spy.torn == 2
        spy.tear(lambda p: "/packages/" in p, times=2)  # the read in yank's compare-and-swap loop
        assert yank(pub, "jug@1.0.0")["yanked"] is True
        assert spy.torn == 4
        spy.tear(lambda p: "/packages/" in p, times=TORN_READ_ATTEMPTS)  # torn every time: corrupt, exit 5
        cons2 = Home.open(tmp_path / "cons2", offline=False)
        cons2.add_remote("s3", url, endpoint_url=ep)
        with pytest.raises(IntegrityError, match="not valid JSON") as e:
            install(cons2, ["jug@1.0.0"])
        assert e.value.exit_code == 5 and cons2.installed() == []
