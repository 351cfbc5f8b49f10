"""Manifests: canonical bytes, a stable digest, and refusal of anything tampered or malformed."""

from __future__ import annotations

import json

import pytest

from perfusion_hub.concept import read_header_bytes
from registry.errors import Incompatible, IntegrityError
from registry.manifest import (
    MAX_MANIFEST_BYTES,
    build_manifest,
    canonical_json,
    parse_manifest,
    sha256_digest,
    strict_json,
)
from tests.kit.concepts import BASE, CORPUS, DEEP, DEEP_OBJ, concept_bytes


def make(name="cat-mittens", version="0.1.0", **kw):
    data = concept_bytes(name, version)
    return build_manifest(read_header_bytes(data), sha256_digest(data), len(data), **kw)


def test_canonical_json_is_sorted_compact_utf8():
    assert canonical_json({"b": 1, "a": [1, {"d": "é", "c": None}]}) == '{"a":[1,{"c":null,"d":"é"}],"b":1}'.encode()
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_digest_is_stable_and_fields_come_from_header():
    a, b = make(), make()
    assert a.digest == b.digest == sha256_digest(a.data)
    assert a.digest.startswith("sha256:") and len(a.digest) == 71
    assert (a.name, a.version, a.trigger, a.superclass, a.base_digest, a.base_name) == (
        "cat-mittens", "0.1.0", "<cat-mittens>", "cat", BASE, "toy")
    assert a.beta == 0.7 and a.tau == 0.1 and a.provenance == {"steps": 10, "seed": 0}
    assert a.license == "cc-by-4.0" and a.description.startswith("a test concept")
    assert make(version="0.2.0").digest != a.digest


def test_blobs_lists_every_part():
    cov = {"digest": "sha256:" + "1" * 64, "size": 100, "base_digest": BASE, "corpus_digest": CORPUS}
    m = make(previews=[("sha256:" + "2" * 64, 50, "image/png")], covariance=cov, tags=["pet", "cat", "pet"])
    roles = {b["role"]: b for b in m.blobs()}
    assert set(roles) == {"concept", "preview", "covariance"}
    assert roles["covariance"]["size"] == 100 and m.covariance["corpus_digest"] == CORPUS
    assert m.tags == ["cat", "pet"]
    assert m.total_size() == len(m.data) + sum(b["size"] for b in m.blobs())


def test_covariance_of_another_base_is_incompatible():
    cov = {"digest": "sha256:" + "1" * 64, "size": 1, "base_digest": "sha256:" + "9" * 64, "corpus_digest": CORPUS}
    with pytest.raises(Incompatible):
        make(covariance=cov)


def test_roundtrip_and_expectations():
    m = make()
    again = parse_manifest(m.data, expect_digest=m.digest, expect_name="cat-mittens", expect_version="0.1.0")
    assert again.raw == m.raw
    with pytest.raises(IntegrityError, match="expected 'dog'"):
        parse_manifest(m.data, expect_name="dog")
    with pytest.raises(IntegrityError, match="expected '0.2.0'"):
        parse_manifest(m.data, expect_version="0.2.0")


def test_every_single_byte_flip_is_detected():
    m = make()
    for i in range(0, len(m.data), max(1, len(m.data) // 97)):
        bad = bytearray(m.data)
        bad[i] ^= 0x01
        with pytest.raises(IntegrityError) as e:
            parse_manifest(bytes(bad), expect_digest=m.digest)
        assert m.digest in str(e.value)  # the error names the object


def _reencode(raw: dict, **kw) -> bytes:
    return json.dumps(raw, **kw).encode()


def test_tampered_content_without_digest_still_checked():
    m = make()
    for mutate in (
        lambda r: r.update(schema="pfx.manifest/9"),
        lambda r: r.update(name="../etc"),
        lambda r: r.update(version="1.0"),
        lambda r: r["concept"].update(digest="sha256:xyz"),
        lambda r: r["concept"].update(size=-1),
        lambda r: r["concept"].update(size=True),
        lambda r: r.update(tau=0),
        lambda r: r.update(beta="0.5"),
        lambda r: r.update(extra=1),
        lambda r: r.pop("trigger"),
        lambda r: r.update(previews=[{"digest": "sha256:" + "a" * 64, "size": 1, "media_type": "text/html"}]),
        lambda r: r.update(tags=["Not Ok"]),
    ):
        raw = json.loads(m.data)
        mutate(raw)
        with pytest.raises(IntegrityError):
            parse_manifest(canonical_json(raw))


def test_non_canonical_duplicate_keys_and_junk_refused():
    m = make()
    raw = json.loads(m.data)
    with pytest.raises(IntegrityError, match="canonical"):
        parse_manifest(_reencode(raw, indent=1, sort_keys=True))
    dup = m.data[:-1] + b',"name":"evil"}'
    with pytest.raises(IntegrityError, match="duplicate"):
        parse_manifest(dup)
    for junk in (b"", b"[]", b"\xff\xfe", b'{"beta": NaN}', b"null"):
        with pytest.raises(IntegrityError):
            parse_manifest(junk)


def test_size_cap_before_parsing():
    huge = b'{"a":"' + b"x" * MAX_MANIFEST_BYTES + b'"}'
    with pytest.raises(IntegrityError, match="limit"):
        parse_manifest(huge)


@pytest.mark.parametrize("data", [DEEP, DEEP_OBJ], ids=["list", "object"])
def test_strict_json_refuses_deep_nesting_naming_the_object(data):
    with pytest.raises(IntegrityError, match="search shard x.*nested too deeply"):
        strict_json(data, "search shard x", 1 << 20)


@pytest.mark.parametrize("data", [DEEP, DEEP_OBJ], ids=["list", "object"])
def test_parse_manifest_refuses_deep_nesting_naming_the_manifest(data):
    d = sha256_digest(data)
    with pytest.raises(IntegrityError, match=f"manifest {d} \\(cat@1.0.0\\): JSON nested too deeply"):
        parse_manifest(data, expect_digest=d, expect_name="cat", expect_version="1.0.0")
