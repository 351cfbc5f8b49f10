"""Publisher signatures and trust against a real S3 server over HTTP (moto on 127.0.0.1): signed
publish and install, tampered manifests and blobs in the bucket, signatures by untrusted keys,
warn/off policies, offline `pfx verify`, and the request budget of an exact install."""

from __future__ import annotations

import json
import os
import stat

import boto3
import pytest

from registry.errors import IntegrityError, NotFound, Untrusted, UsageError
from registry.home import Home
from registry.install import install
from registry.local_ops import verify
from registry.manifest import canonical_json, parse_manifest, sha256_digest
from registry.publish import publish
from registry.remotes.base import blob_key, manifest_key, package_key
from registry.signing import (
    Signer,
    Trust,
    check_signature,
    choose_signer,
    export_public,
    generate_key,
    keyid_of,
    load_private_key,
    namespace_of,
    parse_public_key,
    set_policy,
    sig_key,
    trust_key,
    untrust_key,
)
from tests.kit.concepts import add_concept
from tests.kit.proxy import fault_proxy
from tests.kit.runner import pfx

pytestmark = pytest.mark.usefixtures("aws_env")

S3_SERVERS = ("moto", "rgw")  # each test using s3_url runs on both (tests/conftest.py)


def _home(tmp_path, label, url, endpoint):
    h = Home.open(tmp_path / label, offline=False)
    h.add_remote("s3", url, endpoint_url=endpoint, default=True)
    return h


def _s3(endpoint):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def _nothing_stored(home):
    return home.installed() == [] and list(home.store.iter_blobs()) == []


@pytest.fixture
def signed(tmp_path, s3_url, bucket):
    """A publisher with key 'alice' who published team/cat@1.0.0 signed; a consumer trusting alice."""
    url = f"s3://{bucket}/reg"
    pub = _home(tmp_path, "pub", url, s3_url)
    alice = generate_key(pub, "alice")
    m = add_concept(pub, tmp_path, "team/cat", "1.0.0", description="grey cat")
    res = publish(pub, "team/cat")
    assert res["signed_by"] == [alice["keyid"]]
    cons = _home(tmp_path, "cons", url, s3_url)
    trust_key(cons, "team", alice["public"])
    return {"url": url, "pub": pub, "cons": cons, "m": m, "alice": alice, "bucket": bucket, "endpoint": s3_url}


# --------------------------------------------------------------------------------------------------
# keys and policy


def test_key_files_permissions_and_default(tmp_path):
    h = Home.open(tmp_path / "h")
    k = generate_key(h, "alice")
    priv = h.root / "keys" / "alice.key"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert stat.S_IMODE((h.root / "keys").stat().st_mode) == 0o700
    assert k["default"] and h.config["signing_key"] == "alice"
    assert not generate_key(h, "bob")["default"]  # the first key stays the default
    assert export_public(h)["keyid"] == k["keyid"] == parse_public_key(k["public"])[1]
    with pytest.raises(Exception, match="already exists"):
        generate_key(h, "alice")
    with pytest.raises(UsageError):
        generate_key(h, "../evil")
    os.chmod(priv, 0o644)
    with pytest.raises(Untrusted, match="chmod 600"):
        load_private_key(h, "alice")
    with pytest.raises(NotFound):
        choose_signer(h, key="nobody")
    assert choose_signer(h, sign=False) is None


def test_policy_rules(tmp_path):
    h = Home.open(tmp_path / "h")
    k = generate_key(h, "k")
    assert Trust.load(h).policy("team") == "off"
    assert trust_key(h, "team", k["public"])["policy"] == "enforce"  # enforce once a key is trusted
    assert Trust.load(h).policy("") == "off" and Trust.load(h).policy("other") == "off"
    assert set_policy(h, "*", "warn")["policy"] == "warn"
    assert Trust.load(h).policy("other") == "warn" and Trust.load(h).policy("team") == "enforce"
    assert set_policy(h, "team", "warn")["policy"] == "warn"  # explicit beats auto
    assert set_policy(h, "team", "auto")["policy"] == "enforce"
    assert set_policy(h, "default", "enforce")["namespace"] == ""
    assert namespace_of("cat") == "" and namespace_of("team/cat") == "team"
    assert untrust_key(h, "team", k["keyid"][:10])["policy"] == "warn"  # back to '*'
    with pytest.raises(NotFound):
        untrust_key(h, "team", k["keyid"])
    for bad in ("a/b", "Team", "../x"):
        with pytest.raises(UsageError):
            trust_key(h, bad, k["public"])
    for bad in ("pfx-ed25519:!!!", "pfx-ed25519:" + "QUFB", "ssh-ed25519 AAAA"):
        with pytest.raises(UsageError):
            trust_key(h, "team", bad)


# --------------------------------------------------------------------------------------------------
# install under trust


def test_signed_install_verifies_and_verify_works_offline(signed, tmp_path):
    cons, m, alice = signed["cons"], signed["m"], signed["alice"]
    got = install(cons, ["team/cat@1.0.0"])
    assert got[0]["status"] == "installed" and got[0]["signed_by"] == alice["keyid"]
    assert [k for k, _ in cons.index.signatures(m.digest)] == [alice["keyid"]]
    off = Home.open(cons.root, offline=True)
    assert verify(off)["ok"]
    # a key rotation on the consumer's side: alice no longer trusted, another key is -> verify fails
    other = generate_key(Home.open(tmp_path / "other"), "mallory")
    untrust_key(off, "team", alice["keyid"])
    trust_key(off, "team", other["public"])
    rep = verify(off)
    assert not rep["ok"] and rep["untrusted"][0]["used_by"] == ["team/cat@1.0.0"]
    set_policy(off, "team", "warn")
    rep = verify(off)
    assert rep["ok"] and "team/cat@1.0.0" in rep["trust_warnings"][0]


def test_tampered_manifest_in_bucket_is_refused(signed):
    """An attacker with write access to the bucket but not the key: rewrites the manifest in place
    (digest mismatch), or plants a new manifest and points the package doc at it, with or without
    copying the old signature beside it. Every variant is refused and nothing is stored."""
    s3, b, cons, m = _s3(signed["endpoint"]), signed["bucket"], signed["cons"], signed["m"]
    kid = signed["alice"]["keyid"]
    raw = json.loads(m.data)
    raw["description"] = "evil twin"
    evil = canonical_json(raw)
    evil_digest = sha256_digest(evil)
    parse_manifest(evil, expect_digest=evil_digest)  # a well-formed manifest, just not the signed one

    # 1. in place: the package doc still names the real digest
    s3.put_object(Bucket=b, Key="reg/" + manifest_key(m.digest), Body=evil)
    with pytest.raises(IntegrityError, match=m.digest):
        install(cons, ["team/cat@1.0.0"], remote="s3")
    assert _nothing_stored(cons)
    s3.put_object(Bucket=b, Key="reg/" + manifest_key(m.digest), Body=m.data)

    # 2. a new manifest plus an edited index document, no signature for it
    s3.put_object(Bucket=b, Key="reg/" + manifest_key(evil_digest), Body=evil)
    doc = json.loads(s3.get_object(Bucket=b, Key="reg/" + package_key("team/cat"))["Body"].read())
    doc["versions"]["1.0.0"]["manifest"] = evil_digest
    s3.put_object(Bucket=b, Key="reg/" + package_key("team/cat"), Body=canonical_json(doc))
    with pytest.raises(Untrusted, match="no signature by"):
        install(cons, ["team/cat@1.0.0"], remote="s3")
    assert _nothing_stored(cons)

    # 3. ... and the real signature copied beside it: it signs another digest
    real_sig = s3.get_object(Bucket=b, Key="reg/" + sig_key(m.digest, kid))["Body"].read()
    s3.put_object(Bucket=b, Key="reg/" + sig_key(evil_digest, kid), Body=real_sig)
    with pytest.raises(Untrusted, match="disagrees with where it was found"):
        install(cons, ["team/cat@latest"], remote="s3")
    assert _nothing_stored(cons)

    # 4. ... and a signature document rewritten to claim the new digest: does not verify
    forged = json.loads(real_sig)
    forged["signed"] = evil_digest
    s3.put_object(Bucket=b, Key="reg/" + sig_key(evil_digest, kid), Body=canonical_json(forged))
    with pytest.raises(Untrusted, match="does not verify"):
        install(cons, ["team/cat"], remote="s3")
    assert _nothing_stored(cons)


def test_tampered_blob_in_bucket_is_refused_even_with_a_valid_signature(signed):
    s3, b, cons, m = _s3(signed["endpoint"]), signed["bucket"], signed["cons"], signed["m"]
    concept = m.concept["digest"]
    s3.put_object(Bucket=b, Key="reg/" + blob_key(concept), Body=b"\x01" * m.concept["size"])
    with pytest.raises(IntegrityError, match=concept):
        install(cons, ["team/cat@1.0.0"], remote="s3")
    assert _nothing_stored(cons)


def test_signature_by_untrusted_key_is_refused_under_enforce(signed, tmp_path):
    """Mallory publishes team/dog signed with her own key (and plants a signature under alice's key
    id made with her key). The consumer trusts only alice for 'team': refused, exit 9 from the CLI."""
    url, cons = signed["url"], signed["cons"]
    mal = _home(tmp_path, "mallory", url, signed["endpoint"])
    mk = generate_key(mal, "mallory")
    m = add_concept(mal, tmp_path, "team/dog", "1.0.0", seed=3)
    publish(mal, "team/dog")
    with pytest.raises(Untrusted, match="no signature by"):
        install(cons, ["team/dog@1.0.0"])
    assert cons.installed() == []
    # a document at alice's key id, signed by mallory's key
    key = load_private_key(mal, "mallory")
    fake = Signer("x", signed["alice"]["keyid"], key).sign(m.digest)
    _s3(signed["endpoint"]).put_object(Bucket=signed["bucket"], Key="reg/" + sig_key(m.digest, signed["alice"]["keyid"]),
                                       Body=fake)
    with pytest.raises(Untrusted, match="does not verify"):
        install(cons, ["team/dog@1.0.0"])
    assert cons.installed() == [] and not cons.store.has(m.concept["digest"])
    # the CLI maps it to exit code 9 with one clear line
    p = pfx(None, "--home", str(cons.root), "install", "team/dog@1.0.0")
    assert p.returncode == 9, p.stderr
    assert "not signed by a trusted key" in p.stderr
    # trusting mallory for 'team' lets it in (and records her signature)
    trust_key(cons, "team", mk["public"])
    assert install(cons, ["team/dog@1.0.0"])[0]["signed_by"] == mk["keyid"]
    # but a key trusted for 'team' means nothing for another namespace
    m2 = add_concept(mal, tmp_path, "other/dog", "1.0.0", seed=4)
    publish(mal, "other/dog")
    set_policy(cons, "other", "enforce")
    with pytest.raises(Untrusted, match="no key is trusted for namespace other"):
        install(cons, ["other/dog@1.0.0"])
    assert not cons.store.has(m2.concept["digest"])


def test_warn_policy_installs_with_one_line_warning_and_off_fetches_nothing(tmp_path, s3_url, bucket):
    url = f"s3://{bucket}/reg"
    pub = _home(tmp_path, "pub", url, s3_url)
    add_concept(pub, tmp_path, "lamp", "1.0.0")
    publish(pub, "lamp")  # no key: unsigned
    cons = _home(tmp_path, "cons", url, s3_url)
    set_policy(cons, "default", "warn")
    p = pfx(None, "--home", str(cons.root), "install", "lamp@1.0.0")
    assert p.returncode == 0, p.stderr
    warn = [ln for ln in p.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warn) == 1 and "lamp@1.0.0" in warn[0] and "not signed by a trusted key" in warn[0]
    assert "installed lamp@1.0.0" in p.stdout
    cons2 = _home(tmp_path, "cons2", url, s3_url)
    set_policy(cons2, "*", "enforce")  # explicit enforce with no key trusted: refuse everything
    with pytest.raises(Untrusted):
        install(cons2, ["lamp"])


def test_republish_with_a_key_adds_a_signature(tmp_path, s3_url, bucket):
    url = f"s3://{bucket}/reg"
    pub = _home(tmp_path, "pub", url, s3_url)
    m = add_concept(pub, tmp_path, "team/vase", "1.0.0")
    assert publish(pub, "team/vase", sign=False)["signed_by"] == []
    k = generate_key(pub, "late")
    res = publish(pub, "team/vase@1.0.0", key="late")
    assert res["resumed"] and res["signed_by"] == [k["keyid"]]
    assert publish(pub, "team/vase@1.0.0")["signed_by"] == [k["keyid"]]  # same bytes again: fine
    cons = _home(tmp_path, "cons", url, s3_url)
    trust_key(cons, "team", k["public"])
    assert install(cons, ["team/vase@1.0.0"])[0]["manifest"] == m.digest


def test_exact_install_request_count_stays_constant_with_trust(tmp_path, s3_url, bucket):
    from registry.publish import publish_manifest
    from registry.remotes import open_remote

    url = f"s3://{bucket}/reg"
    pub = _home(tmp_path, "pub", url, s3_url)
    k = generate_key(pub, "k")
    signer = choose_signer(pub)
    rem = open_remote(pub.get_remote("s3"), offline=False)

    def put(name, seed):
        m = add_concept(pub, tmp_path, name, "1.0.0", seed=seed)
        publish_manifest(rem, m, pub.store.read_bytes, signatures=[(signer.keyid, signer.sign(m.digest))])

    for i in range(3):
        put(f"team/c{i}", i)
    counts = {}
    with fault_proxy(s3_url) as (proxy, state):
        for round_, extra in enumerate((0, 25)):
            for i in range(extra):
                put(f"team/more{i}", 100 + i)
            for mode in ("enforce", "off"):
                cons = _home(tmp_path, f"cons{round_}{mode}", url, proxy)
                trust_key(cons, "team", k["public"])
                set_policy(cons, "team", mode)
                before = state.count()
                assert install(cons, ["team/c1@1.0.0"])[0]["status"] == "installed"
                counts[(round_, mode)] = state.count() - before
                assert not any(m == "GET" and "list-type" in p for m, p, _ in state.log[before:])
    # package doc + manifest + signature + concept blob; 'off' skips the signature GET
    assert counts[(0, "enforce")] == counts[(1, "enforce")] == 4
    assert counts[(0, "off")] == counts[(1, "off")] == 3


def test_signature_document_is_small_and_strict(tmp_path):
    h = Home.open(tmp_path / "h")
    generate_key(h, "k")
    s = choose_signer(h)
    d = "sha256:" + "ab" * 32
    doc = s.sign(d)
    assert len(doc) < 300 and s.sign(d) == doc  # deterministic
    raw = json.loads(doc)
    assert set(raw) == {"schema", "algorithm", "keyid", "signed", "signature"} and raw["signed"] == d
    assert sig_key(d, s.keyid) == f"sigs/sha256/ab/{'ab' * 32}/{s.keyid}.sig"
    assert keyid_of(load_private_key(h, "k").public_key().public_bytes_raw()) == s.keyid
    for bad in ("../x", "AB" * 16, ""):
        with pytest.raises(IntegrityError):
            sig_key(d, bad)


def test_signature_document_refuses_deep_nesting():
    with pytest.raises(IntegrityError, match="signature of cat.*nested too deeply"):
        check_signature(b"[" * 4000, manifest_digest="sha256:" + "a" * 64, keyid="k", public_key=None,
                        where="signature of cat")
