"""The home: install records, remotes config, search, gc/verify/du, and many processes at once."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
import tomllib

import pytest

from registry.errors import Conflict, NotFound, UsageError, VersionExists
from registry.home import Home, toml_dumps
from registry.local_ops import du, gc, verify
from registry.manifest import build_manifest_from_file
from registry.names import parse_ref
from tests.kit.concepts import BASE, CORPUS, write_concept
from tests.kit.runner import pfx


@pytest.fixture
def home(tmp_path):
    h = Home.open(tmp_path / "home")
    yield h
    h.close()


def test_open_layout_env_and_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("PFX_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("PFX_OFFLINE", "1")
    h = Home.open()
    assert h.root == (tmp_path / "h").resolve() and h.offline
    assert (h.root / "CACHEDIR.TAG").read_text().startswith("Signature: 8a477f597d28d172789f06886806bc55")
    assert (h.root / "blobs" / "sha256").is_dir() and (h.root / "tmp").is_dir()
    assert h.db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    monkeypatch.delenv("PFX_OFFLINE")
    assert not Home.open(tmp_path / "h2").offline
    assert Home.open(tmp_path / "h2", offline=True).offline


def test_add_concept_and_query(home, tmp_path):
    p = write_concept(tmp_path, "cat-mittens")
    m = home.add_concept_file(p, tags=["pet"], description="a grey cat")
    rows = home.installed()
    assert [(r["name"], r["version"], r["manifest"], r["remote"]) for r in rows] == [
        ("cat-mittens", "0.1.0", m.digest, None)]
    assert rows[0]["tags"] == ["pet"] and not rows[0]["yanked"]
    assert home.find_installed(parse_ref("cat-mittens"))["manifest"] == m.digest
    assert home.find_installed(parse_ref("cat-mittens@latest"))["manifest"] == m.digest
    assert home.find_installed(parse_ref(f"cat-mittens@{m.digest}"))["version"] == "0.1.0"
    assert home.find_installed(parse_ref("cat-mittens@2.0.0")) is None
    assert home.find_installed(parse_ref("dog")) is None
    assert home.manifest(m.digest).raw == m.raw
    assert home.next_version("cat-mittens") == "0.2.0" and home.next_version("dog") == "0.1.0"
    # idempotent for the same bytes, refused for other bytes under the same name@version
    assert home.add_concept_file(p, tags=["pet"], description="a grey cat").digest == m.digest
    with pytest.raises(VersionExists):
        other = tmp_path / "other"
        other.mkdir()
        home.add_concept_file(write_concept(other, "cat-mittens", seed=9))
    assert len(home.installed()) == 1


def test_versions_sorted_semver_and_remove(home, tmp_path):
    for v in ("0.10.0", "0.9.0", "0.2.0"):
        home.add_concept_file(write_concept(tmp_path, "cat", v))
    assert [r["version"] for r in home.installed("cat")] == ["0.2.0", "0.9.0", "0.10.0"]
    assert home.find_installed(parse_ref("cat@^0.9"))["version"] == "0.9.0"
    assert [r["version"] for r in home.remove("cat", "0.9.0")] == ["0.9.0"]
    with pytest.raises(NotFound):
        home.remove("cat", "0.9.0")
    assert len(home.remove("cat")) == 2 and home.installed() == []
    with pytest.raises(NotFound):
        home.remove("cat")


def test_record_install_requires_blobs(home, tmp_path):
    m = build_manifest_from_file(write_concept(tmp_path, "dog"))
    with pytest.raises(NotFound, match="not in the store"):
        home.record_install(m, remote="team")
    assert home.installed() == []
    home.store.put_bytes((tmp_path / "dog-0.1.0.safetensors").read_bytes())
    row = home.record_install(m, remote="team", pinned=True)
    assert row["remote"] == "team" and row["pinned"]
    home.set_yanked("dog", "0.1.0")
    assert home.installed()[0]["yanked"]
    assert home.find_installed(parse_ref("dog")) is None  # yanked: not chosen by default...
    assert home.find_installed(parse_ref("dog@0.1.0"))["yanked"]  # ...only by an exact pin


def test_remotes_config(home):
    names = lambda: [r["name"] for r in home.list_remotes()]
    assert names() == ["sample"] and home.default_remote() is None
    sample = home.get_remote("sample")
    assert sample["read_only"] and sample["url"].startswith("file://") and sample["url"].endswith("sample_registry")
    home.add_remote("team", "s3://bucket/prefix", endpoint_url="http://127.0.0.1:9000", profile="p")
    home.add_remote("usb", "file:///media/usb", single_writer=True)
    assert names() == ["team", "usb", "sample"]
    assert home.default_remote()["name"] == "team"  # the first one added
    home.add_remote("other", "s3://b2", default=True)
    assert home.default_remote()["name"] == "other"
    assert home.get_remote("usb")["single_writer"] and home.get_remote("team")["endpoint_url"].endswith("9000")
    with pytest.raises(Conflict):
        home.add_remote("team", "s3://x")
    for bad in (("sample", "s3://x"), ("Bad Name", "s3://x"), ("ok", "ftp://x"), ("ok", "file://relative")):
        with pytest.raises(UsageError):
            home.add_remote(*bad)
    home.remove_remote("other")
    assert home.default_remote() is None and names() == ["team", "usb", "sample"]
    with pytest.raises(NotFound):
        home.get_remote("other")
    with pytest.raises(UsageError):
        home.remove_remote("sample")
    cfg = tomllib.loads(home.config_path.read_text())
    assert [r["name"] for r in cfg["remotes"]] == ["team", "usb"]


def test_toml_writer_roundtrips():
    doc = {"a": "x\"y\\z\n\u0001é", "b": True, "n": 3, "f": 0.25, "l": [1, 2], "t": {"k": "v", "inner": {"z": 1}},
           "arr": [{"name": "r1", "blobs": [{"digest": "d", "size": 1}]}, {"name": "r2"}], "none": None}
    back = tomllib.loads(toml_dumps(doc))
    doc.pop("none")
    assert back == doc


def test_kv_cache_covariance_and_base_digests(home, tmp_path):
    assert home.kv_get("k") is None
    home.kv_set("k", b"\x00raw bytes", etag='"e1"')
    assert home.kv_get("k")["value"] == b"\x00raw bytes" and home.kv_get("k")["etag"] == '"e1"'
    home.kv_set("j", {"a": [1]}, remote="team")
    assert home.kv_get("j", remote="team")["value"] == {"a": [1]} and home.kv_get("j") is None
    d, _ = home.store.put_bytes(b"C" * 100)
    home.add_covariance(d, base_digest=BASE, corpus_digest=CORPUS)
    assert home.find_covariance(BASE, CORPUS) == d and home.find_covariance(BASE, BASE) is None
    m = home.add_concept_file(write_concept(tmp_path, "cat"))  # picks up the registered covariance
    assert m.covariance["digest"] == d
    home.set_base_digest("/models/sd15:123", "sd15", BASE)
    assert home.get_base_digest("/models/sd15:123") == BASE and home.get_base_digest("x") is None


def test_search(home, tmp_path):
    home.add_concept_file(write_concept(tmp_path, "cat-mittens", superclass="cat"), tags=["pet", "grey"])
    home.add_concept_file(write_concept(tmp_path, "chair-eames", superclass="chair", description="mid-century"))
    home.add_concept_file(write_concept(tmp_path, "team/dog-rex", superclass="dog"))
    names = lambda q: [r["name"] for r in home.search(q)]
    assert names("mittens") == ["cat-mittens"]
    assert names("mitt") == ["cat-mittens"]  # prefix
    assert names("grey") == ["cat-mittens"]  # tag
    assert names("century") == ["chair-eames"]  # description
    assert names("chair") == ["chair-eames"]
    assert names("team") == ["team/dog-rex"]
    assert names("cat grey") == ["cat-mittens"] and names("cat chair") == []
    for hostile in ('"', "NEAR(", "a OR b", "*", "cat' --", "-", "^x"):
        home.search(hostile)  # user text never reaches FTS syntax
    assert len(home.search("")) == 3
    home.remove("cat-mittens")
    assert names("mittens") == []


# --------------------------------------------------------------------------------------------------
# gc / verify / du


def test_gc_grace_pending_and_references(home, tmp_path):
    m = home.add_concept_file(write_concept(tmp_path, "cat"))
    orphan, _ = home.store.put_bytes(b"orphan")
    fresh, _ = home.store.put_bytes(b"fresh")
    protected, _ = home.store.put_bytes(b"in flight")
    old = time.time() - 3600
    for d in (orphan, protected, m.concept["digest"], m.digest):
        os.utime(home.store.blob_path(d), (old, old))
    (home.store.tmp_dir / "blob-dead.part").write_bytes(b"x")
    os.utime(home.store.tmp_dir / "blob-dead.part", (old - 7200, old - 7200))
    with home.pending([protected]):
        dry = gc(home, grace_s=600, dry_run=True)
        assert [r["digest"] for r in dry["digests"]] == [orphan] and home.store.has(orphan)
        r = gc(home, grace_s=600)
        assert r["removed"] == 1 and r["kept_recent"] == 1 and r["tmp_removed"] == 1
        assert not home.store.has(orphan) and home.store.has(fresh) and home.store.has(protected)
    r = gc(home, grace_s=0)
    assert {x["digest"] for x in r["digests"]} == {fresh, protected}
    assert home.store.has(m.concept["digest"]) and home.store.has(m.digest)
    assert verify(home)["ok"]
    home.remove("cat")
    assert gc(home, grace_s=0)["removed"] == 2 and list(home.store.iter_blobs()) == []


def test_stale_pending_rows_expire(home):
    d, _ = home.store.put_bytes(b"abandoned")
    with home.pending([d]):
        assert gc(home, grace_s=0)["removed"] == 0
        assert gc(home, grace_s=0, pending_ttl=0)["removed"] == 1


def test_verify_finds_corrupt_missing_and_fix(home, tmp_path):
    a = home.add_concept_file(write_concept(tmp_path, "a"))
    b = home.add_concept_file(write_concept(tmp_path, "b"))
    c = home.add_concept_file(write_concept(tmp_path, "c"))
    rep = verify(home)
    assert rep["ok"] and rep["checked"] == 6 and rep["installed"] == 3
    p = home.store.blob_path(a.concept["digest"])
    os.chmod(p, 0o644)
    with open(p, "r+b") as f:
        f.seek(100)
        f.write(b"\xff")
    home.store.blob_path(b.concept["digest"]).unlink()
    mp_ = home.store.blob_path(c.digest)
    os.chmod(mp_, 0o644)
    mp_.write_bytes(b"{}")
    rep = verify(home)
    assert not rep["ok"]
    assert {x["digest"]: x["used_by"] for x in rep["corrupt"]} == {
        a.concept["digest"]: ["a@0.1.0"], c.digest: ["c@0.1.0"]}
    assert [x["digest"] for x in rep["missing"]] == [b.concept["digest"]]
    rep = verify(home, fix=True)
    assert sorted(rep["fixed"]) == sorted([a.concept["digest"], c.digest]) and not home.store.has(c.digest)


def test_du(home, tmp_path):
    m = home.add_concept_file(write_concept(tmp_path, "a"))
    home.store.put_bytes(b"z" * 1000)
    r = du(home)
    assert r["bytes"]["concept"] == m.concept["size"] and r["bytes"]["manifest"] == len(m.data)
    assert r["bytes"]["unreferenced"] == 1000 and r["blobs"]["concept"] == 1 and r["installed"] == 1
    assert r["bytes"]["total"] == sum(v for k, v in r["bytes"].items() if k != "total")


# gc and what a killed `pfx train` left in <home>/work: removed once stale; checkpoints and a live run's
# folder are kept, and reported.


def _age(path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t), follow_symlinks=False)


def test_gc_removes_stale_training_temp_folders_and_keeps_checkpoints(tmp_path):
    home = Home.open(tmp_path / "h", offline=False)
    work = home.root / "work"
    work.mkdir()
    dead = work / "tmpdead1"  # a killed run's TemporaryDirectory, hours old
    dead.mkdir()
    (dead / "concept.safetensors").write_bytes(b"half")
    _age(dead / "concept.safetensors", 7200)
    _age(dead, 7200)
    half = work / ".cat-0.1.0.ckpt.x1y2.tmp"  # a killed checkpoint write
    half.write_bytes(b"half")
    _age(half, 7200)
    ckpt = work / "cat-0.1.0.ckpt"  # what --resume uses: always kept
    ckpt.write_bytes(b"ckpt")
    _age(ckpt, 7200)
    fresh = work / "tmpfresh"  # a live run that started just now
    fresh.mkdir()
    live = work / "tmplive"  # an old folder with a recent write inside: live
    live.mkdir()
    (live / "concept.safetensors").write_bytes(b"new")
    _age(live, 7200)
    dry = gc(home, grace_s=0, dry_run=True)
    assert dry["work_tmp_removed"] == [str(half), str(dead)]
    assert dead.exists() and half.exists()
    home.close()
    p = pfx(home.root, "gc", "--json", check=True)
    assert json.loads(p.stdout)["work_tmp_removed"] == [str(half), str(dead)]
    assert sorted(x.name for x in work.iterdir()) == ["cat-0.1.0.ckpt", "tmpfresh", "tmplive"]
    assert json.loads(pfx(home.root, "gc", "--json", check=True).stdout)["work_tmp_removed"] == []
    dead.mkdir()
    _age(dead, 7200)
    assert "1 stale training temp item" in pfx(home.root, "gc", check=True).stdout
    assert not dead.exists() and ckpt.exists()


def test_gc_without_a_work_folder(tmp_path):
    home = Home.open(tmp_path / "h", offline=False)
    assert gc(home, grace_s=0)["work_tmp_removed"] == []
    home.close()


# --------------------------------------------------------------------------------------------------
# many processes on one home


def _installer(root, paths, rounds, q):
    h = Home.open(root)
    errs = []
    for i in range(rounds):
        path = paths[i % len(paths)]
        try:
            m = build_manifest_from_file(path)
            with h.pending([b["digest"] for b in m.blobs()]):
                h.store.put_file(path, expect_digest=m.concept["digest"])
                h.record_install(m, remote="x")
            if i % 3 == 2:
                h.remove(m.name, m.version)
        except NotFound:
            pass  # removed by a sibling between install and remove
        except Exception as e:  # noqa: BLE001
            errs.append(repr(e))
    q.put(errs)


def _collector(root, seconds, q):
    h = Home.open(root)
    errs, end = [], time.time() + seconds
    while time.time() < end:
        try:
            gc(h, grace_s=0)
        except Exception as e:  # noqa: BLE001
            errs.append(repr(e))
    q.put(errs)


def test_concurrent_install_remove_gc_keeps_store_consistent(tmp_path):
    root = tmp_path / "home"
    Home.open(root).close()
    paths = [write_concept(tmp_path, f"c{i}") for i in range(6)]
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_installer, args=(root, paths[k::2], 24, q)) for k in range(2)]
    procs.append(ctx.Process(target=_collector, args=(root, 3.0, q)))
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert results == [[], [], []]
    h = Home.open(root)
    rep = verify(h)
    assert rep["ok"], rep
    for row in h.installed():  # no installed version lost a blob, even with gc grace 0
        for b in h.manifest(row["manifest"]).blobs():
            assert h.store.verify_blob(b["digest"]) == "ok"
    gc(h, grace_s=0)
    assert verify(h)["ok"]
