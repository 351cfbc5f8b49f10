"""Hostile input to the registry: names and references, and index documents, claims and manifests
planted in a file:// remote and in a real S3 server (moto over HTTP). Every case must be refused
with an error that names the object, before anything is stored. Bundles' symlinks, hardlinks and
escaping entries are in tests/registry/test_bundle.py; only the cases missing there are here."""

from __future__ import annotations

import json
import os
import uuid

import boto3
import pytest

from registry.bundle import export_bundle, import_bundle
from registry.documents import MAX_CLAIM_BYTES, MAX_PACKAGE_BYTES
from registry.errors import IntegrityError, InvalidName, UsageError
from registry.home import Home
from registry.install import install
from registry.manifest import MAX_MANIFEST_BYTES, canonical_json, sha256_digest
from registry.names import parse_ref, validate_name
from registry.remotes import open_remote
from registry.remotes.base import claim_key, manifest_key, package_key
from registry.search import search_remote
from tests.kit.concepts import DEEP, add_concept
from tests.kit.runner import clean_error, pfx
from tests.kit.s3 import new_bucket

pytestmark = pytest.mark.usefixtures("aws_env")

# --------------------------------------------------------------------------------------------------
# names and references


@pytest.mark.parametrize("text,says", [
    ("../etc/passwd", "path traversal"), ("team/..", "path traversal"), ("/etc/passwd", "absolute path"),
    ("c:/windows", "absolute path"), ("a\\..\\b", "path traversal"), ("con", "reserved device name"), ("lpt1.tar", "reserved device name"),
    ("team/aux", "reserved device name"), ("cаt", "CYRILLIC SMALL LETTER A"), ("tеam/cat", "CYRILLIC"),
    ("ｃａｔ", "FULLWIDTH LATIN SMALL LETTER C"), ("team／cat", "FULLWIDTH SOLIDUS"), ("cat．v2", "FULLWIDTH FULL STOP"),
    ("cat\u200b", "ZERO WIDTH SPACE"), ("cat\x00", "control character"), ("cat.", "trailing dot"),
    ("team./cat", "trailing dot"), ("a" * 65, "max 64"), ("x/" + "y" * 65, "max 64"), ("a" * 5000, "too long"),
    ("a..b", "two separators"), ("-a", "starts with"),
])
def test_hostile_names_refused_with_the_reason(text, says):
    with pytest.raises(InvalidName) as e:
        validate_name(text)
    msg = str(e.value)
    assert says in msg and len(msg) < 400


@pytest.mark.parametrize("text,says", [
    ("cat@1.0.0/../../x", "invalid version range"), ("cat@１.0.0", "FULLWIDTH DIGIT ONE"),
    ("cat@lаtest", "CYRILLIC SMALL LETTER A"), ("cat@1.0.0\x00", "control character"),
    ("cat@latest" + "x" * 100, "invalid tag"), ("cat@1.0.0-" + "a" * 5000, "too long"),
    ("cat@sha256:" + "a" * 63, "64 lowercase hex"), ("cat@sha256:" + "A" * 64, "64 lowercase hex"),
    ("../x@1.0.0", "path traversal"), ("cat@@1.0.0", "invalid"),
])
def test_hostile_references_refused_with_the_reason(text, says):
    with pytest.raises(UsageError) as e:
        parse_ref(text)
    assert says in str(e.value) and len(str(e.value)) < 400


def test_cli_refuses_hostile_reference_with_exit_2_before_any_network(tmp_path):
    p = pfx(None, "--home", str(tmp_path / "h"), "install", "cаt@1.0.0", env={"PFX_OFFLINE": "1"}, timeout=60)
    assert p.returncode == 2 and "CYRILLIC SMALL LETTER A" in p.stderr and "Traceback" not in p.stderr


# --------------------------------------------------------------------------------------------------
# documents planted in a remote (file:// and moto)


class Registry:
    """A registry with cat@1.0.0 and dog@1.0.0 published, and an attacker's write access to it."""

    def __init__(self, kind: str, tmp_path, s3_url: str | None):
        if kind == "s3":
            bucket = new_bucket(s3_url)
            self.url, self.endpoint = f"s3://{bucket}/reg", s3_url
            self.s3 = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1")
            self.bucket = bucket
        else:
            self.url, self.endpoint, self.s3 = (tmp_path / "reg").as_uri(), None, None
        self.tmp = tmp_path
        self.pub = self.home("pub")
        self.remote = open_remote(self.pub.get_remote("r"), offline=False)
        self.cat = add_concept(self.pub, tmp_path, "cat", "1.0.0", seed=1)
        self.dog = add_concept(self.pub, tmp_path, "dog", "1.0.0", seed=2)
        from registry.publish import publish

        publish(self.pub, "cat")
        publish(self.pub, "dog")

    def home(self, label: str) -> Home:
        h = Home.open(self.tmp / label, offline=False)
        h.add_remote("r", self.url, endpoint_url=self.endpoint, default=True)
        return h

    def get(self, key: str) -> bytes:
        if self.s3:
            return self.s3.get_object(Bucket=self.bucket, Key="reg/" + key)["Body"].read()
        doc = self.remote.get_doc(key, max_bytes=1 << 20) if key.startswith("packages/") else None
        return doc.data if doc else self.remote.get(key, max_bytes=1 << 20)

    def plant(self, key: str, data: bytes) -> None:
        """Overwrite any object, as someone with write access to the bucket or the folder could."""
        if self.s3:
            self.s3.put_object(Bucket=self.bucket, Key="reg/" + key, Body=data)
        elif key.startswith("packages/"):
            doc = self.remote.get_doc(key, max_bytes=1 << 30)
            self.remote.put_doc(key, data, etag=doc.etag if doc else None)
        else:
            p = self.remote.root.joinpath(*key.split("/"))
            p.parent.mkdir(parents=True, exist_ok=True)
            if p.exists():
                os.chmod(p, 0o644)
                p.unlink()
            p.write_bytes(data)

    def pkg(self, name: str) -> dict:
        return json.loads(self.get(package_key(name)))


@pytest.fixture(params=["file", "s3"])
def reg(request, tmp_path):
    s3 = request.getfixturevalue("s3_url") if request.param == "s3" else None
    return Registry(request.param, tmp_path, s3)


def _refused(reg: Registry, ref: str, match: str) -> None:
    cons = reg.home(f"cons-{uuid.uuid4().hex[:6]}")
    with pytest.raises(IntegrityError, match=match):
        install(cons, [ref], remote="r")
    assert cons.installed() == [] and list(cons.store.iter_blobs()) == [], "something was stored"


def _dup_keys_doc(doc: dict) -> bytes:
    body = canonical_json(doc).decode()
    return ('{"name":' + json.dumps(doc["name"]) + "," + body[1:]).encode()  # "name" twice


def test_package_doc_duplicate_keys(reg):
    reg.plant(package_key("cat"), _dup_keys_doc(reg.pkg("cat")))
    _refused(reg, "cat@1.0.0", "index document of cat.*duplicate key 'name'")


def test_package_doc_over_the_cap_refused_before_parsing(reg):
    reg.plant(package_key("cat"), b"{" + b" " * (MAX_PACKAGE_BYTES + 10) + b"}")
    _refused(reg, "cat@1.0.0", "index document of cat.*limit")


def test_package_doc_of_another_package(reg):
    reg.plant(package_key("cat"), reg.get(package_key("dog")))
    _refused(reg, "cat", "index document of cat.*names 'dog' but was found at the key of 'cat'")


@pytest.mark.parametrize("edit,says", [
    (lambda d: d.update(versions=list(d["versions"])), "versions, tags and summary must be objects"),
    (lambda d: d["versions"]["1.0.0"].update(yanked="no"), "bad manifest digest or yanked flag"),
    (lambda d: d["versions"]["1.0.0"].update(manifest="../../etc/passwd"), "bad manifest digest"),
    (lambda d: d["tags"].update(latest="9.9.9"), "points at a version that is not listed"),
    (lambda d: d["summary"].update(description=["x"]), "summary.description must be a string"),
    (lambda d: d["versions"].update({"../1": d["versions"]["1.0.0"]}), "is not a version"),
    (lambda d: d.update(schema="pfx.package/99"), "a newer pfx may be needed"),
    (lambda d: d.update(extra=1), "not a package document"),
])
def test_package_doc_wrong_types(reg, edit, says):
    doc = reg.pkg("cat")
    edit(doc)
    reg.plant(package_key("cat"), canonical_json(doc))
    _refused(reg, "cat@1.0.0", f"index document of cat.*{says}")


def test_manifest_whose_name_disagrees_with_where_it_was_found(reg):
    doc = reg.pkg("cat")
    doc["versions"]["1.0.0"]["manifest"] = reg.dog.digest  # dog's (valid, published) manifest
    reg.plant(package_key("cat"), canonical_json(doc))
    _refused(reg, "cat@1.0.0", f"manifest {reg.dog.digest} \\(cat@1.0.0\\): names 'dog', expected 'cat'")
    _refused(reg, f"cat@{reg.dog.digest}", "names 'dog', expected 'cat'")


def test_manifest_whose_version_disagrees_with_where_it_was_found(reg):
    doc = reg.pkg("cat")
    doc["versions"]["2.0.0"] = dict(doc["versions"]["1.0.0"])  # 2.0.0 -> the 1.0.0 manifest
    doc["tags"]["latest"] = "2.0.0"
    reg.plant(package_key("cat"), canonical_json(doc))
    _refused(reg, "cat@2.0.0", "is version '1.0.0', expected '2.0.0'")
    _refused(reg, "cat", "is version '1.0.0', expected '2.0.0'")


@pytest.mark.parametrize("how,says", [
    ("dupkey", "duplicate key"), ("spaces", "canonical form"), ("huge", "limit"),
    ("nan", "not allowed"), ("type", "wrong type"),
])
def test_malformed_manifest_under_its_own_digest(reg, how, says):
    raw = json.loads(reg.cat.data)
    if how == "dupkey":
        data = ('{"name":"cat",' + reg.cat.data.decode()[1:]).encode()
    elif how == "spaces":
        data = json.dumps(raw, sort_keys=True, indent=1).encode()
    elif how == "huge":
        raw["provenance"] = {"pad": "x" * MAX_MANIFEST_BYTES}
        data = canonical_json(raw)
    elif how == "nan":
        data = reg.cat.data.replace(b'"beta":0.7', b'"beta":NaN')
    else:
        raw["concept"]["size"] = "60000"
        data = canonical_json(raw)
    digest = sha256_digest(data)
    reg.plant(manifest_key(digest), data)
    doc = reg.pkg("cat")
    doc["versions"]["1.0.0"]["manifest"] = digest
    reg.plant(package_key("cat"), canonical_json(doc))
    _refused(reg, "cat@1.0.0", f"manifest {digest}.*{says}")


@pytest.mark.parametrize("how,says", [
    ("other-version", "disagrees with where it was found"), ("other-name", "disagrees with where it was found"),
    ("dupkey", "duplicate key"), ("huge", "limit"), ("bad-digest", "bad manifest digest"),
])
def test_claim_fallback_refuses_hostile_claims(reg, how, says):
    """cat@3.0.0 is not in the index, so resolve falls back to the claim (a crashed publisher's
    version): a claim that names another version or name, or is malformed, is refused."""
    claim = {"schema": "pfx.claim/1", "name": "cat", "version": "3.0.0", "manifest": reg.cat.digest,
             "created": "2026-01-01T00:00:00Z"}
    if how == "other-version":
        claim["version"] = "1.0.0"
    elif how == "other-name":
        claim["name"] = "dog"
    elif how == "bad-digest":
        claim["manifest"] = "sha256:../../x"
    data = canonical_json(claim)
    if how == "dupkey":
        data = ('{"version":"3.0.0",' + data.decode()[1:]).encode()
    elif how == "huge":
        data = b" " * (MAX_CLAIM_BYTES + 1)
    reg.plant(claim_key("cat", "3.0.0"), data)
    _refused(reg, "cat@3.0.0", f"claim for cat@3.0.0.*{says}")


def test_search_shard_with_foreign_terms_is_refused(reg):
    from registry.compact import compact
    from registry.documents import term_shard_key

    compact(reg.remote)
    key = term_shard_key("cat")
    shard = json.loads(reg.get(key)) if reg.s3 else json.loads(reg.remote.get_doc(key, max_bytes=1 << 22).data)
    shard["terms"]["zebra-not-in-this-shard"] = ["cat"]
    data = canonical_json(shard)
    if reg.s3:
        reg.plant(key, data)
    else:
        doc = reg.remote.get_doc(key, max_bytes=1 << 22)
        reg.remote.put_doc(key, data, etag=doc.etag)
    with pytest.raises(IntegrityError, match=f"search shard {key}.*does not belong"):
        search_remote(reg.remote, "cat")


def test_install_refuses_deeply_nested_package_doc_and_manifest(tmp_path):
    """JSON nested deeply enough to exhaust Python's recursion (a few KB fit under every size cap) is
    refused with an IntegrityError naming the object, and the CLI shows no traceback."""
    reg = Registry("file", tmp_path, None)
    cons = reg.home("cons")
    # A manifest under its own digest (so the digest check passes), listed by the package doc.
    d = sha256_digest(DEEP)
    reg.plant(manifest_key(d), DEEP)
    with pytest.raises(IntegrityError, match=f"manifest {d}.*nested too deeply"):
        install(cons, [f"cat@{d}"], remote="r")
    doc = reg.pkg("cat")
    doc["versions"]["1.0.0"]["manifest"] = d
    reg.plant(package_key("cat"), canonical_json(doc))
    with pytest.raises(IntegrityError, match=f"manifest {d}.*nested too deeply"):
        install(cons, ["cat@1.0.0"], remote="r")
    reg.plant(package_key("cat"), DEEP)
    with pytest.raises(IntegrityError, match="index document of cat.*nested too deeply"):
        install(cons, ["cat@1.0.0"], remote="r")
    assert cons.installed() == [] and list(cons.store.iter_blobs()) == []
    cons.close()
    # The CLI: exit 5, a message, no traceback.
    home = tmp_path / "h"
    pfx(home, "remote", "add", "r", reg.url, check=True)
    p = pfx(home, "install", "cat@1.0.0", "--remote", "r")
    assert p.returncode == 5 and clean_error(p), (p.returncode, p.stderr)
    assert "nested too deeply" in p.stderr


# --------------------------------------------------------------------------------------------------
# bundles: the cases tests/registry/test_bundle.py does not cover


@pytest.fixture
def src_home(tmp_path):
    h = Home.open(tmp_path / "src")
    add_concept(h, tmp_path, "team/chair", "1.0.0", seed=5)
    return h


def test_bundle_symlinked_shard_folder_refused(src_home, tmp_path):
    target = tmp_path / "b"
    export_bundle(src_home, target)
    m = src_home.manifest(src_home.installed()[0]["manifest"])
    h = m.concept["digest"][7:]
    shard = target / "blobs" / "sha256" / h[:2]
    elsewhere = tmp_path / "elsewhere"
    shard.rename(elsewhere)
    shard.symlink_to(elsewhere, target_is_directory=True)
    dst = Home.open(tmp_path / "dst")
    with pytest.raises(IntegrityError, match="symlink"):
        import_bundle(dst, target)
    assert dst.installed() == []


def test_bundle_index_symlink_refused(src_home, tmp_path):
    target = tmp_path / "b"
    export_bundle(src_home, target)
    idx = target / "bundle.json"
    real = tmp_path / "real.json"
    real.write_bytes(idx.read_bytes())
    idx.unlink()
    idx.symlink_to(real)
    with pytest.raises(IntegrityError, match="symlink"):
        import_bundle(Home.open(tmp_path / "dst"), target)


def test_bundle_hardlink_to_outside_file_is_only_read_and_verified(src_home, tmp_path):
    """A hard link is a regular file: its bytes are copied through the digest check, never linked
    into the store, and a file outside the tree is never modified."""
    target = tmp_path / "b"
    export_bundle(src_home, target)
    m = src_home.manifest(src_home.installed()[0]["manifest"])
    h = m.concept["digest"][7:]
    blob = target / "blobs" / "sha256" / h[:2] / h
    outside = tmp_path / "outside-secret"
    outside.write_bytes(b"not the concept")
    os.chmod(blob, 0o644)
    blob.unlink()
    os.link(outside, blob)
    dst = Home.open(tmp_path / "dst")
    with pytest.raises(IntegrityError, match=m.concept["digest"]):
        import_bundle(dst, target)
    assert dst.installed() == [] and outside.read_bytes() == b"not the concept"
    assert not dst.store.has(m.concept["digest"])


def test_bundle_index_entry_disagreeing_with_its_manifest_refused(src_home, tmp_path):
    target = tmp_path / "b"
    export_bundle(src_home, target)
    idx = target / "bundle.json"
    doc = json.loads(idx.read_bytes())
    doc["concepts"][0]["name"] = "team/table"
    idx.write_bytes(canonical_json(doc))
    dst = Home.open(tmp_path / "dst")
    with pytest.raises(IntegrityError, match="names 'team/chair', expected 'team/table'"):
        import_bundle(dst, target)
    assert dst.installed() == [] and list(dst.store.iter_blobs()) == []


def test_bundle_import_obeys_the_trust_policy(src_home, tmp_path):
    """A bundle cannot bypass an enforcing policy: unsigned -> Untrusted; signed by a trusted key ->
    imported with its signature, and verify passes offline."""
    from registry.errors import Untrusted
    from registry.local_ops import verify
    from registry.signing import choose_signer, generate_key, trust_key

    unsigned = tmp_path / "unsigned"
    export_bundle(src_home, unsigned)
    k = generate_key(src_home, "k")
    s = choose_signer(src_home)
    m = src_home.manifest(src_home.installed()[0]["manifest"])
    with src_home.index.write() as c:  # as `pfx publish` leaves it: our signature stored locally
        src_home.index.insert_signatures(c, m.digest, [(s.keyid, s.sign(m.digest))])
    signed = tmp_path / "signed.tar"
    export_bundle(src_home, signed)
    dst = Home.open(tmp_path / "dst")
    trust_key(dst, "team", k["public"])
    with pytest.raises(Untrusted, match="team/chair@1.0.0"):
        import_bundle(dst, unsigned)
    assert dst.installed() == [] and list(dst.store.iter_blobs()) == []
    out = import_bundle(dst, signed)
    assert [e["name"] for e in out["imported"]] == ["team/chair"] and out["warnings"] == []
    assert [kid for kid, _ in dst.index.signatures(m.digest)] == [k["keyid"]]
    assert verify(dst)["ok"]
