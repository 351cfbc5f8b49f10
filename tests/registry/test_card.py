"""Concept cards: ModelSpec keys and the tensor hash in the header, the header check's limits, old files,
`pfx card` editing into a new version (the old one byte-identical), `pfx train` card options, `pfx info`,
and the search filters locally and on a file:// remote (summaries, signed)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from perfusion_hub.card import (
    MAX_THUMBNAIL_CHARS,
    apply_card,
    card_of,
    rewrite_metadata,
    stamp_hash,
    tensor_hash,
    thumbnail_data_uri,
)
from perfusion_hub.concept import ConceptFormatError, read_header_bytes
from registry.documents import PackageDoc, parse_package_doc
from registry.home import Home, sample_registry_path
from registry.manifest import parse_manifest
from tests.kit.concepts import concept_bytes, write_concept
from tests.kit.engine import needs_toy, photo_folder


def run(*args, code=0):
    res = CliRunner().invoke(cli, list(args))
    assert res.exit_code == code, res.output
    return res


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PFX_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PFX_BASE", raising=False)
    return tmp_path / "home"


def carded(name="cat-mittens", version="0.1.0", edits=None, **kw) -> bytes:
    """A concept file with a card, as pfx writes it (ModelSpec keys and the tensor hash)."""
    data = concept_bytes(name, version, **kw)
    meta = apply_card(dict(read_header_bytes(data).metadata), edits or {})
    (n,) = struct.unpack("<Q", data[:8])
    return rewrite_metadata(data, stamp_hash(meta, data[8 + n:]))


def data_section_sha256(data: bytes) -> str:
    (n,) = struct.unpack("<Q", data[:8])
    return "0x" + hashlib.sha256(data[8 + n:]).hexdigest()


# --------------------------------------------------------------------------------------------------
# The header


def test_pfx_written_files_carry_modelspec_keys_and_the_tensor_hash():
    """A concept with a card (what `pfx train` writes: train.concept_metadata applies the card's defaults) is
    written with the ModelSpec keys and the hash of the tensors written; one without a card (a file from before
    cards) is written back byte for byte (tests/engine/test_sd2.py)."""
    import torch

    from perfusion_hub.card import apply_card
    from perfusion_hub.concept import Concept
    from perfusion_hub.concept import concept_bytes as write

    c = Concept(metadata=apply_card(read_header_bytes(concept_bytes("cat-mittens")).metadata),
                token_embedding=torch.ones(8), target_input=torch.ones(8), superclass_input=torch.zeros(8),
                value_targets={"down_blocks.0.attentions.0.transformer_blocks.0.attn2": torch.arange(4.0)})
    data = write(c)
    meta = read_header_bytes(data).metadata
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/perfusion"
    assert meta["modelspec.implementation"] == "pfx"
    assert meta["modelspec.title"] == meta["modelspec.trigger_phrase"] == "cat-mittens"
    assert meta["modelspec.date"] == meta["created"] and meta["modelspec.license"] == meta["license"]
    assert "beta=0.7" in meta["modelspec.usage_hint"]
    # The definition: sha256 of every byte after the header (the tensors in offset order), 0x-prefixed.
    assert meta["modelspec.hash_sha256"] == data_section_sha256(data) == tensor_hash(data)


def test_base_family_picks_the_architecture():
    meta = apply_card(dict(read_header_bytes(concept_bytes("x")).metadata), {"base_family": "sdxl"})
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/perfusion"
    assert card_of({"name": "x"})["architecture"] == "stable-diffusion-v1/perfusion"  # absent family = SD1


def test_old_files_without_card_keys_still_load_and_get_default_cards(tmp_path):
    """The shipped sample registry's concepts predate the card: they load, and build the same manifest."""
    root = sample_registry_path()
    blobs = [p for p in (root / "blobs").rglob("*") if p.is_file() and p.stat().st_size < 1 << 20]
    old = []
    for p in blobs:
        try:
            old.append(read_header_bytes(p.read_bytes()))
        except ConceptFormatError:
            continue  # covariances and previews
    assert old and all("modelspec.sai_model_spec" not in h.metadata for h in old)
    card = card_of(old[0].metadata)
    assert card["title"] == old[0].name and card["base_family"] == "sd1" and card["permissions"] == {}
    manifests = [parse_manifest(p.read_bytes()) for p in (root / "manifests").rglob("*") if p.is_file()]
    assert manifests and all("annotations" not in m.raw for m in manifests)
    assert manifests[0].card["title"] == manifests[0].name and manifests[0].card["tensors_sha256"] == ""
    from perfusion_hub.concept import load_concept

    assert load_concept(next(p for p in blobs if read_ok(p)).read_bytes()).name


def read_ok(p: Path) -> bool:
    try:
        read_header_bytes(p.read_bytes())
        return True
    except ConceptFormatError:
        return False


@pytest.mark.parametrize("key,value,msg", [
    ("modelspec.thumbnail", "data:image/png;base64," + "A" * MAX_THUMBNAIL_CHARS, "thumbnail limit"),
    ("modelspec.thumbnail", "https://example.com/x.png", "data:image"),
    ("modelspec.thumbnail", "data:text/html;base64,PHNjcmlwdD4=", "data:image"),
    ("modelspec.hash_sha256", "abc", "0x and 64"),
    ("modelspec.title", "x" * 201, "200-character"),
    ("modelspec.title", "bell\x07", "control character"),
    ("modelspec.tags", "Cat,<b>", "at most 32 tags"),
    ("permissions", '{"allow_commercial": "yes"}', "true/false"),
    ("permissions", '{"sell_my_soul": true}', "true/false"),
    ("permissions", "not json", "not JSON"),
    ("base_family", "SD XL!", "short lowercase"),
    ("edited_from", "yesterday", "sha256"),
])
def test_header_check_refuses_bad_card_values(key, value, msg):
    with pytest.raises(ConceptFormatError, match=msg):
        read_header_bytes(concept_bytes("x", **{key: value}))


def test_a_changed_tensor_byte_fails_the_stated_hash():
    data = bytearray(carded())
    read_header_bytes(bytes(data))
    data[-1] ^= 1
    with pytest.raises(ConceptFormatError, match="hash_sha256"):
        read_header_bytes(bytes(data))


def test_thumbnail_is_small(tmp_path):
    import numpy as np
    from PIL import Image

    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8))
    uri = thumbnail_data_uri(noise)
    assert uri.startswith("data:image/jpeg;base64,") and len(uri) <= MAX_THUMBNAIL_CHARS
    read_header_bytes(carded(edits={"thumbnail": uri}))


# --------------------------------------------------------------------------------------------------
# pfx card


def test_card_edit_makes_a_new_version_and_leaves_the_old_byte_identical(home, tmp_path):
    h = Home.open(home)
    m0 = h.add_concept_file(write_concept(tmp_path, "cat-mittens", "0.1.0"), tags=["pet"])
    old_blob = h.store.read_bytes(m0.concept["digest"])
    old_manifest = h.store.read_bytes(m0.digest)
    out = json.loads(run("card", "cat-mittens", "--title", "Mittens", "--trigger-phrase", "mittens cat",
                         "--license", "CC-BY-4.0", "--allow-commercial", "--no-allow-derivatives",
                         "--require-credit", "--author", "Ann", "--json").stdout)
    assert out["version"] == "0.1.1" and out["edited_from"] == "cat-mittens@0.1.0"
    assert h.store.read_bytes(m0.concept["digest"]) == old_blob  # still there, unchanged
    assert h.store.read_bytes(m0.digest) == old_manifest
    m1 = h.manifest(out["manifest"])
    new_blob = h.store.read_bytes(m1.concept["digest"])
    meta = read_header_bytes(new_blob).metadata
    assert meta["version"] == "0.1.1" and meta["edited_from"] == m0.concept["digest"]
    assert meta["modelspec.title"] == "Mittens" and meta["modelspec.trigger_phrase"] == "mittens cat"
    assert json.loads(meta["permissions"]) == {"allow_commercial": True, "allow_derivatives": False,
                                               "require_credit": True}
    assert meta["license"] == meta["modelspec.license"] == "CC-BY-4.0" and meta["modelspec.author"] == "Ann"
    # same tensors: the data sections are equal, so the tensor hash names the same weights
    assert meta["modelspec.hash_sha256"] == data_section_sha256(old_blob) == data_section_sha256(new_blob)
    assert m1.tags == ["pet"] and m1.description == m0.description  # kept from the old manifest
    assert m1.card["permissions"]["allow_commercial"] is True and m1.card["title"] == "Mittens"
    # editing 0.1.0 again takes the next free patch; an existing --version is refused
    assert json.loads(run("card", "cat-mittens@0.1.0", "--tags", "cat", "--json").stdout)["version"] == "0.1.2"
    err = run("card", "cat-mittens", "--title", "x", "--version", "0.1.1", code=4)
    assert "already exists" in err.output
    shown = run("card", "cat-mittens@0.1.1").stdout
    assert "Mittens" in shown and "allowed (images)" in shown and "required" in shown
    info = json.loads(run("info", "cat-mittens@0.1.1", "--json").stdout)
    assert info["card"]["title"] == "Mittens" and info["card"]["author"] == "Ann"


def test_card_errors_say_what_to_do(home, tmp_path):
    Home.open(home).add_concept_file(write_concept(tmp_path, "cat-mittens", "0.1.0"))
    assert "SPDX" in run("card", "cat-mittens", "--license", "<script>", code=2).output
    assert "tags are" in run("card", "cat-mittens", "--tags", "Cute Cat!", code=2).output
    assert "pfx install" in run("card", "dog-rex", "--title", "Rex", code=3).output


@needs_toy
def test_train_takes_the_card_options(home, tmp_path):
    photos = photo_folder(tmp_path / "photos")
    out = json.loads(run("train", str(photos), "--name", "cat-mittens", "--superclass", "cat", "--steps", "2",
                         "--batch-size", "4", "--previews", "1", "--title", "Mittens", "--license", "MIT",
                         "--no-allow-commercial", "--tags", "cat,orange", "--description", "an orange cat",
                         "--json").stdout)
    h = Home.open(home)
    blob = h.store.read_bytes(out["concept"]["digest"])
    meta = read_header_bytes(blob).metadata
    assert meta["modelspec.title"] == "Mittens" and meta["license"] == "MIT"
    assert json.loads(meta["permissions"]) == {"allow_commercial": False}
    assert meta["modelspec.tags"] == "cat,orange" and meta["description"] == "an orange cat"
    assert meta["modelspec.thumbnail"].startswith("data:image/jpeg;base64,")  # from the first preview
    assert len(meta["modelspec.thumbnail"]) < 16_000
    assert meta["modelspec.hash_sha256"] == data_section_sha256(blob)
    m = h.manifest(out["manifest"])
    assert m.tags == ["cat", "orange"] and m.card["permissions"] == {"allow_commercial": False}


# --------------------------------------------------------------------------------------------------
# Search filters


def _three(home, tmp_path):
    h = Home.open(home)
    for name, sup, edits in [
        ("cat-mittens", "cat", {"license": "MIT", "permissions": {"allow_commercial": True}}),
        ("cat-tom", "cat", {"license": "CC-BY-NC-4.0", "permissions": {"allow_commercial": False,
                                                                      "require_credit": True}}),
        ("chair-eames", "chair", {"base_family": "sdxl"}),
    ]:
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(carded(name, superclass=sup, edits=edits))
        h.add_concept_file(p)
    return h


def test_local_search_filters(home, tmp_path):
    _three(home, tmp_path)

    def names(*args):
        return sorted(r["name"] for r in json.loads(run("search", "--local", *args, "--json").stdout))

    assert names("") == ["cat-mittens", "cat-tom", "chair-eames"]
    assert names("", "--superclass", "cat") == ["cat-mittens", "cat-tom"]
    assert names("", "--allow-commercial") == ["cat-mittens"]
    assert names("", "--no-allow-commercial") == ["cat-tom"]
    assert names("cat", "--license", "mit") == ["cat-mittens"]
    assert names("", "--require-credit") == ["cat-tom"]
    assert names("", "--base-family", "sdxl") == ["chair-eames"]
    assert names("", "--base-family", "sd1") == ["cat-mittens", "cat-tom"]
    assert names("", "--signed") == []
    assert names("", "--unsigned") == ["cat-mittens", "cat-tom", "chair-eames"]
    assert "with allow_commercial=True" in run("search", "--local", "chair", "--allow-commercial").stdout


def test_remote_search_filters_use_the_summary(home, tmp_path):
    from registry.compact import compact
    from registry.publish import publish, target_remote
    from registry.search import search_remote
    from registry.signing import generate_key

    h = _three(home, tmp_path)
    reg = tmp_path / "reg"
    reg.mkdir()
    h.add_remote("r", reg.as_uri())
    publish(h, "cat-mittens", to="r", sign=False)
    generate_key(h, "alice")
    publish(h, "cat-tom", to="r")  # signed with the default key
    publish(h, "chair-eames", to="r", sign=False)
    rem = target_remote(h, "r")
    compact(rem)

    def names(q, **f):
        return sorted(r["name"] for r in search_remote(rem, q, 20, **f))

    assert names("cat") == ["cat-mittens", "cat-tom"]
    assert names("", superclass="chair") == ["chair-eames"]  # the superclass serves as the query
    assert names("cat", allow_commercial=True) == ["cat-mittens"]
    assert names("cat", signed=True) == ["cat-tom"] and names("cat", signed=False) == ["cat-mittens"]
    assert names("cat", license="cc-by-nc-4.0") == ["cat-tom"]
    assert names("chair", base_family="sd1") == [] and names("chair", base_family="sdxl") == ["chair-eames"]
    hit = search_remote(rem, "cat-tom", 5)[0]
    assert hit["title"] == "cat-tom" and hit["permissions"]["require_credit"] is True and len(hit["signers"]) == 1
    cli_rows = json.loads(run("search", "cat", "--remote", "r", "--allow-commercial", "--json").stdout)
    assert [r["name"] for r in cli_rows] == ["cat-mittens"]
    info = json.loads(run("info", "cat-tom", "--remote", "r", "--json").stdout)
    assert info["card"]["permissions"] == {"allow_commercial": False, "require_credit": True}
    assert info["signers"] == hit["signers"]


def test_package_docs_without_card_fields_parse_and_unknown_summary_fields_are_dropped():
    old = PackageDoc("cat", {"1.0.0": {"manifest": "sha256:" + "a" * 64, "yanked": False}}, {"latest": "1.0.0"},
                     {"version": "1.0.0", "description": "d", "tags": ["x"], "base": "sha256:" + "b" * 64})
    assert parse_package_doc(old.to_bytes(), expect_name="cat").summary["description"] == "d"
    newer = PackageDoc("cat", old.versions, old.tags, {**old.summary, "rating": 5})
    assert "rating" not in parse_package_doc(newer.to_bytes(), expect_name="cat").summary
    bad = PackageDoc("cat", old.versions, old.tags, {**old.summary, "permissions": {"allow_commercial": "yes"}})
    from registry.errors import IntegrityError

    with pytest.raises(IntegrityError, match="permissions"):
        parse_package_doc(bad.to_bytes(), expect_name="cat")
