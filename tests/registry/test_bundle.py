"""Lockfile round trip, and offline bundles: export, verified import, hostile tar refusal."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from registry.bundle import export_bundle, import_bundle
from registry.errors import IntegrityError, NotFound, UsageError, VersionExists
from registry.home import Home
from registry.lockfile import check_entry, read_lock, write_lock
from registry.manifest import sha256_digest
from tests.kit.concepts import DEEP, DEEP_OBJ, add_concept, write_concept
from tests.kit.runner import clean_error, pfx


@pytest.fixture
def src(tmp_path):
    h = Home.open(tmp_path / "src")
    for name, v in (("cat-mittens", "0.1.0"), ("cat-mittens", "0.2.0"), ("team/chair", "1.0.0")):
        h.add_concept_file(write_concept(tmp_path, name, v), tags=["x"])
    yield h
    h.close()


def digests(home):
    return [(r["name"], r["version"], r["manifest"]) for r in home.installed()]


# --------------------------------------------------------------------------------------------------
# lockfile


def test_lock_round_trip(src, tmp_path):
    path = tmp_path / "pfx.lock"
    entries = write_lock(src, path)
    assert read_lock(path) == entries
    assert [(e["name"], e["version"]) for e in entries] == [
        ("cat-mittens", "0.1.0"), ("cat-mittens", "0.2.0"), ("team/chair", "1.0.0")]
    for e in entries:
        m = src.manifest(e["manifest"])
        check_entry(e, m)
        assert e["base_digest"] == m.base_digest and e["blobs"] == m.blobs() and e["remote"] is None
    other = src.manifest(entries[1]["manifest"])
    with pytest.raises(IntegrityError):
        check_entry(entries[0], other)
    only = write_lock(src, tmp_path / "one.lock", ["cat-mittens@^0.1"])
    assert [e["version"] for e in only] == ["0.1.0"]
    with pytest.raises(NotFound):
        write_lock(src, tmp_path / "x.lock", ["nope"])


@pytest.mark.parametrize("mutate", [
    lambda t: t.replace("version = 1", "version = 2", 1),
    lambda t: t.replace('name = "cat-mittens"', 'name = "../evil"', 1),
    lambda t: t.replace('version = "0.1.0"', 'version = "one"', 1),
    lambda t: t.replace("manifest = \"sha256:", "manifest = \"md5:", 1),
    lambda t: t.replace("size = ", "size = -", 1),
    lambda t: t + '\n[[concept]]\nname = "cat-mittens"\nversion = "0.1.0"\n',
    lambda t: t + "\nbogus = 1\n",
    lambda t: t + "[[[",
])
def test_lock_validation(src, tmp_path, mutate):
    path = tmp_path / "pfx.lock"
    write_lock(src, path)
    path.write_text(mutate(path.read_text()))
    with pytest.raises(UsageError):
        read_lock(path)


def test_lock_duplicate_entry_refused(src, tmp_path):
    path = tmp_path / "pfx.lock"
    write_lock(src, path, ["cat-mittens@0.1.0"])
    text = path.read_text()
    body = text[text.index("[[concept]]"):]
    path.write_text(text + "\n" + body)
    with pytest.raises(UsageError, match="twice"):
        read_lock(path)


# --------------------------------------------------------------------------------------------------
# bundles


@pytest.mark.parametrize("fmt", ["dir", "tar", "tar.gz"])
def test_export_import_round_trip(src, tmp_path, fmt):
    target = tmp_path / ("bundle" if fmt == "dir" else f"bundle.{fmt}")
    out = export_bundle(src, target)
    assert len(out["concepts"]) == 3
    dst = Home.open(tmp_path / "dst")
    res = import_bundle(dst, target)
    assert len(res["imported"]) == 3 and res["already_installed"] == []
    assert digests(dst) == digests(src)
    again = import_bundle(dst, target)
    assert again["imported"] == [] and len(again["already_installed"]) == 3 and again["blobs_written"] == 0


def test_export_selected_refs_and_folder_is_a_registry(src, tmp_path):
    target = tmp_path / "b"
    out = export_bundle(src, target, ["cat-mittens@0.1.0"])
    assert [c["version"] for c in out["concepts"]] == ["0.1.0"]
    h = src.installed("cat-mittens")[0]
    hexd = h["manifest"][7:]
    assert (target / "manifests" / "sha256" / hexd[:2] / hexd).is_file()
    export_bundle(src, target, ["team/chair"])  # adding to an existing bundle folder merges its index
    dst = Home.open(tmp_path / "dst")
    assert sorted(r["name"] for r in import_bundle(dst, target)["imported"]) == ["cat-mittens", "team/chair"]
    with pytest.raises(NotFound):
        export_bundle(src, tmp_path / "c", ["dog"])


def test_import_without_bundle_index_reads_manifests(src, tmp_path):
    target = tmp_path / "b"
    export_bundle(src, target)
    (target / "bundle.json").unlink()
    dst = Home.open(tmp_path / "dst")
    assert len(import_bundle(dst, target)["imported"]) == 3


def test_tampered_blob_is_refused_and_nothing_is_stored(src, tmp_path):
    target = tmp_path / "b"
    export_bundle(src, target, ["team/chair"])
    concept = src.installed("team/chair")[0]["concept"][7:]
    p = target / "blobs" / "sha256" / concept[:2] / concept
    data = bytearray(p.read_bytes())
    data[-1] ^= 1
    os.chmod(p, 0o644)
    p.write_bytes(bytes(data))
    dst = Home.open(tmp_path / "dst")
    with pytest.raises(IntegrityError, match=concept[:12]):
        import_bundle(dst, target)
    assert dst.installed() == [] and list(dst.store.iter_blobs()) == []
    assert list(dst.store.tmp_dir.iterdir()) == []


def test_conflicting_version_refused_before_writing(src, tmp_path):
    target = tmp_path / "b"
    export_bundle(src, target)
    dst = Home.open(tmp_path / "dst")
    other = tmp_path / "other"
    other.mkdir()
    dst.add_concept_file(write_concept(other, "team/chair", "1.0.0", seed=5))
    before = sorted(d for d, _ in dst.store.iter_blobs())
    with pytest.raises(VersionExists):
        import_bundle(dst, target)
    assert sorted(d for d, _ in dst.store.iter_blobs()) == before


def _hostile_tar(tmp_path, src, add):
    good = tmp_path / "good.tar"
    export_bundle(src, good, ["team/chair"])
    bad = tmp_path / "bad.tar"
    with tarfile.open(good) as tin, tarfile.open(bad, "w") as tout:
        for m in tin:
            tout.addfile(m, tin.extractfile(m) if m.isfile() else None)
        add(tout)
    return bad


def _file(name, data=b"x"):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, io.BytesIO(data)


@pytest.mark.parametrize("what,add", [
    ("symlink", lambda t: t.addfile(_link("blobs/sha256/ab/" + "ab" * 32, "/etc/passwd", tarfile.SYMTYPE))),
    ("hardlink", lambda t: t.addfile(_link("evil", "/etc/shadow", tarfile.LNKTYPE))),
    ("absolute", lambda t: t.addfile(*_file("/tmp/pfx-evil"))),
    ("dotdot", lambda t: t.addfile(*_file("../../outside"))),
    ("inner dotdot", lambda t: t.addfile(*_file("blobs/../../outside"))),
    ("windows", lambda t: t.addfile(*_file("C:\\evil"))),
    ("device", lambda t: t.addfile(_dev("blobs/dev"))),
    ("duplicate", lambda t: t.addfile(*_file("bundle.json", b"{}"))),
])
def test_hostile_tar_refused(src, tmp_path, what, add):
    bad = _hostile_tar(tmp_path, src, add)
    dst = Home.open(tmp_path / "dst")
    with pytest.raises(IntegrityError, match="refused"):
        import_bundle(dst, bad)
    assert dst.installed() == [] and list(dst.store.iter_blobs()) == []
    assert not (tmp_path / "outside").exists()


def _link(name, target, kind):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _dev(name):
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    return info


def test_symlink_in_bundle_folder_refused(src, tmp_path):
    target = tmp_path / "b"
    export_bundle(src, target, ["team/chair"])
    m = src.installed("team/chair")[0]["manifest"][7:]
    p = target / "manifests" / "sha256" / m[:2] / m
    real = tmp_path / "elsewhere"
    real.write_bytes(p.read_bytes())
    os.chmod(p, 0o644)
    p.unlink()
    p.symlink_to(real)
    with pytest.raises(IntegrityError, match="symlink"):
        import_bundle(Home.open(tmp_path / "dst"), target)


def test_export_to_existing_file_refused(src, tmp_path):
    (tmp_path / "x.tar").write_bytes(b"")
    with pytest.raises(UsageError):
        export_bundle(src, tmp_path / "x.tar")


def test_import_refuses_deeply_nested_bundle_index_and_manifest(tmp_path):
    src = Home.open(tmp_path / "src", offline=False)
    add_concept(src, tmp_path, "cat", "1.0.0", seed=1)
    export_bundle(src, tmp_path / "b")
    src.close()
    (tmp_path / "b" / "bundle.json").write_bytes(DEEP)
    home = tmp_path / "h"
    p = pfx(home, "import", str(tmp_path / "b"))
    assert p.returncode == 5 and clean_error(p), (p.returncode, p.stderr)
    assert "bundle.json: JSON nested too deeply" in p.stderr
    # Without an index, every manifest the folder holds is read.
    (tmp_path / "b" / "bundle.json").unlink()
    d = sha256_digest(DEEP_OBJ)
    mdir = tmp_path / "b" / "manifests" / "sha256"
    for f in mdir.rglob("*"):
        if f.is_file():
            os.chmod(f, 0o644)
            f.unlink()
    (mdir / d[7:9]).mkdir(parents=True, exist_ok=True)
    (mdir / d[7:9] / d[7:]).write_bytes(DEEP_OBJ)
    p = pfx(home, "import", str(tmp_path / "b"))
    assert p.returncode == 5 and clean_error(p), (p.returncode, p.stderr)
    assert f"manifest {d}: JSON nested too deeply" in p.stderr
