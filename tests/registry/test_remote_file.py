"""file:// remote: link-based create-if-absent, generation-file compare-and-swap, caps, key safety,
and the publish/install/yank/tag protocol end to end on real files."""

from __future__ import annotations

import threading

import pytest

from registry.errors import IntegrityError, NotFound, RemoteError, VersionExists
from registry.home import Home
from registry.install import install
from registry.publish import probe, publish, publish_manifest, tag, yank
from registry.remotes import open_remote
from registry.remotes.base import CasFailed, claim_key, package_key
from registry.remotes.file import FileRemote
from registry.resolve import fetch_package
from tests.kit.concepts import add_concept


@pytest.fixture
def remote(tmp_path):
    return FileRemote("t", tmp_path / "reg")


def test_put_if_absent_first_writer_wins(remote):
    assert remote.put_if_absent("claims/ab/x/1.0.0.json", b"first")
    assert not remote.put_if_absent("claims/ab/x/1.0.0.json", b"second")
    assert remote.get("claims/ab/x/1.0.0.json", max_bytes=100) == b"first"


def test_cas_refuses_stale_etag_and_never_reuses_generations(remote):
    e1 = remote.put_doc("packages/ab/p.json", b"1", etag=None)
    with pytest.raises(CasFailed):
        remote.put_doc("packages/ab/p.json", b"x", etag=None)
    e2 = remote.put_doc("packages/ab/p.json", b"2", etag=e1)
    with pytest.raises(CasFailed):
        remote.put_doc("packages/ab/p.json", b"stale", etag=e1)
    doc = remote.get_doc("packages/ab/p.json", max_bytes=10)
    assert (doc.data, doc.etag) == (b"2", e2)
    assert remote.get_doc("packages/ab/p.json", max_bytes=10, if_none_match=e2).data == b""
    assert list(remote.list_keys("packages/")) == ["packages/ab/p.json"]


def test_cas_under_thread_contention_loses_nothing(remote):
    key = "packages/00/counter.json"
    remote.put_doc(key, b"0", etag=None)

    def bump(n: int) -> None:
        for _ in range(n):
            while True:
                d = remote.get_doc(key, max_bytes=64)
                try:
                    remote.put_doc(key, str(int(d.data) + 1).encode(), etag=d.etag)
                    break
                except CasFailed:
                    continue

    threads = [threading.Thread(target=bump, args=(25,)) for _ in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert remote.get_doc(key, max_bytes=64).data == b"150"


def test_size_cap_and_unsafe_keys(remote):
    remote.put_if_absent("manifests/sha256/aa/big", b"x" * 5000)
    with pytest.raises(IntegrityError, match="limit"):
        remote.get("manifests/sha256/aa/big", max_bytes=4096)
    for bad in ("../etc/passwd", "/abs", "a/../b", "a//b", "c:/x"):
        with pytest.raises(RemoteError):
            remote.get(bad, max_bytes=10)


def test_probe_passes_on_file_and_detects_a_store_ignoring_conditions(tmp_path):
    assert probe(FileRemote("ok", tmp_path / "a"))["ok"]

    class Naive(FileRemote):
        """A store that ignores If-None-Match / If-Match: plain overwrites."""

        def put_if_absent(self, key, data):
            p = self._path(key)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            return True

        def put_doc(self, key, data, *, etag):
            self.put_if_absent(key, data)
            return "x"

        def get_doc(self, key, *, max_bytes, if_none_match=None):
            from registry.remotes.base import Doc, KeyMissing

            try:
                return Doc(self.get(key, max_bytes=max_bytes), "x")
            except KeyMissing:
                return None

    res = probe(Naive("naive", tmp_path / "b"))
    assert not res["ok"] and not res["conditional_create"] and not res["compare_and_swap"]


def _homes(tmp_path):
    pub = Home.open(tmp_path / "pub", offline=False)
    pub.add_remote("loc", (tmp_path / "reg").as_uri(), default=True)
    cons = Home.open(tmp_path / "cons", offline=False)
    cons.add_remote("loc", (tmp_path / "reg").as_uri())
    return pub, cons


def test_publish_install_roundtrip_and_immutability(tmp_path):
    pub, cons = _homes(tmp_path)
    m = add_concept(pub, tmp_path, "team/cat", "1.0.0", description="tabby cat", covariance=b"C" * 999)
    assert publish(pub, "team/cat@1.0.0")["resumed"] is False
    assert publish(pub, "team/cat@1.0.0")["resumed"] is True  # same manifest: idempotent
    other = Home.open(tmp_path / "other", offline=False)
    other.add_remote("loc", (tmp_path / "reg").as_uri())
    add_concept(other, tmp_path, "team/cat", "1.0.0", seed=9)
    with pytest.raises(VersionExists, match="already exists"):
        publish(other, "team/cat@1.0.0")
    res = install(cons, ["team/cat@1.0.0"])
    assert res[0]["manifest"] == m.digest and res[0]["status"] == "installed"
    for b in m.blobs():
        assert cons.store.read_bytes(b["digest"]) == pub.store.read_bytes(b["digest"])


def test_yank_and_tags(tmp_path):
    pub, cons = _homes(tmp_path)
    for v, s in (("1.0.0", 1), ("1.1.0", 2), ("2.0.0-rc.1", 3)):
        add_concept(pub, tmp_path, "dog", v, seed=s)
        publish(pub, f"dog@{v}")
    rem = open_remote(pub.get_remote("loc"), offline=False)
    pkg = fetch_package(rem, "dog")
    assert pkg.tags["latest"] == "1.1.0"  # a prerelease never moves latest
    yank(pub, "dog@1.1.0")
    pkg = fetch_package(rem, "dog")
    assert pkg.versions["1.1.0"]["yanked"] and pkg.tags["latest"] == "1.0.0"
    assert install(cons, ["dog@^1"])[0]["version"] == "1.0.0"  # ranges skip yanked
    assert install(cons, ["dog@1.1.0"])[0]["yanked"] is True  # exact still works
    tag(pub, "dog@2.0.0-rc.1", "next")
    assert fetch_package(rem, "dog").tags["next"] == "2.0.0-rc.1"
    with pytest.raises(Exception, match="yanked"):
        tag(pub, "dog@1.1.0", "stable")
    yank(pub, "dog@1.1.0", undo=True)
    assert fetch_package(rem, "dog").tags["latest"] == "1.1.0"


def test_crash_after_claim_resumes_and_compaction_repairs(tmp_path):
    from registry.compact import compact
    from registry.documents import make_claim
    from registry.publish import put_immutable, write_event
    from registry.remotes.base import blob_key, manifest_key

    pub, cons = _homes(tmp_path)
    m = add_concept(pub, tmp_path, "bird", "0.1.0")
    rem = open_remote(pub.get_remote("loc"), offline=False)
    # A publisher that died right after its claim: immutable objects + event + claim, no index.
    for b in m.blobs():
        put_immutable(rem, blob_key(b["digest"]), pub.store.read_bytes(b["digest"]))
    put_immutable(rem, manifest_key(m.digest), m.data)
    write_event(rem, m.name, m.version, m.digest)
    rem.put_if_absent(claim_key(m.name, m.version), make_claim(m.name, m.version, m.digest, "t"))
    assert fetch_package(rem, "bird") is None
    assert install(cons, ["bird@0.1.0"])[0]["manifest"] == m.digest  # the claim is enough
    fresh = Home.open(tmp_path / "fresh", offline=False)
    fresh.add_remote("loc", (tmp_path / "reg").as_uri())
    with pytest.raises(NotFound):
        install(fresh, ["bird@^0.1"], remote="loc")  # ranges need the index: not there yet
    stats = compact(rem)
    assert stats["repaired"] == 1 and fetch_package(rem, "bird").versions["0.1.0"]["manifest"] == m.digest
    # and a rerun of the publish itself completes too (idempotent)
    assert publish(pub, "bird@0.1.0")["resumed"] is True


def test_rebuild_index_from_claims(tmp_path):
    from registry.compact import compact

    pub, _ = _homes(tmp_path)
    for v in ("1.0.0", "1.2.0"):
        add_concept(pub, tmp_path, "fox", v, seed=hash(v) % 100)
        publish(pub, f"fox@{v}")
    rem = open_remote(pub.get_remote("loc"), offline=False)
    rem.delete(package_key("fox"))
    assert fetch_package(rem, "fox") is None
    compact(rem, rebuild=True)
    assert set(fetch_package(rem, "fox").versions) == {"1.0.0", "1.2.0"}


def test_sample_like_registry_inside_package_is_read_only(tmp_path):
    from pathlib import Path

    import registry

    row = {"name": "pkg", "url": (Path(registry.__file__).parent / "no_such_registry").as_uri()}
    assert open_remote(row, offline=False).read_only
    pub = Home.open(tmp_path / "h", offline=False)
    add_concept(pub, tmp_path, "owl", "1.0.0")
    with pytest.raises(Exception, match="pfx remote add"):
        publish(pub, "owl")  # no default remote: says how to add one
    with pytest.raises(Exception, match="read-only"):
        publish(pub, "owl", to="sample")
    with pytest.raises(RemoteError, match="read-only"):
        publish_manifest(open_remote(row, offline=False), pub.manifest(pub.find_installed("owl")["manifest"]),
                         pub.store.read_bytes)


def test_install_from_lockfile_is_exact_even_when_yanked(tmp_path):
    from registry.lockfile import write_lock

    pub, cons = _homes(tmp_path)
    for v, s in (("1.0.0", 1), ("1.1.0", 2)):
        add_concept(pub, tmp_path, "hat", v, seed=s)
        publish(pub, f"hat@{v}")
    yank(pub, "hat@1.1.0")
    lock = tmp_path / "pfx.lock"
    entries = write_lock(pub, lock, ["hat@1.1.0"])
    res = install(cons, lock=lock)
    assert [(r["version"], r["manifest"]) for r in res] == [("1.1.0", entries[0]["manifest"])]
    assert install(cons, lock=lock)[0]["status"] == "present"
