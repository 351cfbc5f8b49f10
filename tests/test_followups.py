"""Follow-ups to the hardening work (issue 7).

1. JSON nested deeply enough to exhaust Python's recursion (a few KB of '[' fit under every size cap)
   is refused with an IntegrityError naming the object, for every document read from a remote or a
   bundle, and never shows a traceback.
2. A local disk error while a downloaded blob is written (EFBIG, ENOSPC, EROFS, EACCES) is not retried
   and is reported as local (exit 1, naming the path and the reason), not as a remote failure (exit 6);
   an error raised while reading the remote's body is still the remote's.
3. `pfx gc` removes what a killed `pfx train` left in `<home>/work` once stale (temp folders, a
   half-written checkpoint's temp file), keeps checkpoints and a live run's folder, and reports them.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest

from registry.bundle import export_bundle
from registry.errors import IntegrityError, LocalWriteError, RemoteError
from registry.home import Home
from registry.install import _Downloader, install
from registry.local_ops import gc
from registry.manifest import canonical_json, parse_manifest, sha256_digest, strict_json
from registry.publish import publish
from registry.remotes import open_remote
from registry.remotes.base import manifest_key, package_key
from tests.conceptgen import add_concept, concept_bytes
from tests.faultproxy import clean_error, home_problems, pfx, pfx_env

DEEP = b"[" * 5000 + b"]" * 5000
DEEP_OBJ = b'{"a":' * 5000 + b"1" + b"}" * 5000


@pytest.fixture(autouse=True)
def no_offline(monkeypatch):
    monkeypatch.delenv("PFX_OFFLINE", raising=False)


def _registry(tmp_path: Path, *, big: bool = False):
    """A file:// registry with cat@1.0.0 published; returns (url, remote, manifest)."""
    url = (tmp_path / "reg").as_uri()
    pub = Home.open(tmp_path / "pub", offline=False)
    pub.add_remote("r", url, default=True)
    m = add_concept(pub, tmp_path, "cat", "1.0.0", seed=1, big=big)
    publish(pub, "cat")
    remote = open_remote(pub.get_remote("r"), offline=False)
    pub.close()
    return url, remote, m


def _plant_doc(remote, key: str, data: bytes) -> None:
    doc = remote.get_doc(key, max_bytes=1 << 30)
    remote.put_doc(key, data, etag=doc.etag if doc else None)


def _plant_file(remote, key: str, data: bytes) -> None:
    p = remote.root.joinpath(*key.split("/"))
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


# --------------------------------------------------------------------------------------------------
# 1. deeply nested JSON


@pytest.mark.parametrize("data", [DEEP, DEEP_OBJ], ids=["list", "object"])
def test_strict_json_refuses_deep_nesting_naming_the_object(data):
    with pytest.raises(IntegrityError, match="search shard x.*nested too deeply"):
        strict_json(data, "search shard x", 1 << 20)


@pytest.mark.parametrize("data", [DEEP, DEEP_OBJ], ids=["list", "object"])
def test_parse_manifest_refuses_deep_nesting_naming_the_manifest(data):
    d = sha256_digest(data)
    with pytest.raises(IntegrityError, match=f"manifest {d} \\(cat@1.0.0\\): JSON nested too deeply"):
        parse_manifest(data, expect_digest=d, expect_name="cat", expect_version="1.0.0")


def test_signature_document_refuses_deep_nesting():
    from registry.signing import check_signature

    with pytest.raises(IntegrityError, match="signature of cat.*nested too deeply"):
        check_signature(b"[" * 4000, manifest_digest="sha256:" + "a" * 64, keyid="k", public_key=None,
                        where="signature of cat")


def test_install_refuses_deeply_nested_package_doc_and_manifest(tmp_path):
    url, remote, _ = _registry(tmp_path)
    cons = Home.open(tmp_path / "cons", offline=False)
    cons.add_remote("r", url, default=True)
    # A manifest under its own digest (so the digest check passes), listed by the package doc.
    d = sha256_digest(DEEP)
    _plant_file(remote, manifest_key(d), DEEP)
    with pytest.raises(IntegrityError, match=f"manifest {d}.*nested too deeply"):
        install(cons, [f"cat@{d}"], remote="r")
    doc = json.loads(remote.get_doc(package_key("cat"), max_bytes=1 << 20).data)
    doc["versions"]["1.0.0"]["manifest"] = d
    _plant_doc(remote, package_key("cat"), canonical_json(doc))
    with pytest.raises(IntegrityError, match=f"manifest {d}.*nested too deeply"):
        install(cons, ["cat@1.0.0"], remote="r")
    _plant_doc(remote, package_key("cat"), DEEP)
    with pytest.raises(IntegrityError, match="index document of cat.*nested too deeply"):
        install(cons, ["cat@1.0.0"], remote="r")
    assert cons.installed() == [] and list(cons.store.iter_blobs()) == []
    cons.close()
    # The CLI: exit 5, a message, no traceback.
    home = tmp_path / "h"
    pfx(home, "remote", "add", "r", url, check=True)
    p = pfx(home, "install", "cat@1.0.0", "--remote", "r")
    assert p.returncode == 5 and clean_error(p), (p.returncode, p.stderr)
    assert "nested too deeply" in p.stderr


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


def test_concept_with_deeply_nested_training_metadata_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load, save

    from perfusion_hub.concept import ConceptFormatError, read_header_bytes

    good = tmp_path / "c.safetensors"
    good.write_bytes(concept_bytes("cat", "1.0.0"))
    with safe_open(str(good), "np") as f:
        meta = dict(f.metadata())
    meta["training"] = DEEP.decode()
    data = save(load(good.read_bytes()), metadata=meta)
    with pytest.raises(ConceptFormatError, match="nested too deeply"):
        read_header_bytes(data)


# --------------------------------------------------------------------------------------------------
# 2. local write errors are local


class _FakeRemote:
    name = "fake"

    def __init__(self, chunks):
        self.chunks, self.opened = chunks, 0

    def open_blob(self, key):
        self.opened += 1
        return None, self.chunks()


def test_store_write_error_is_local_and_not_retried(tmp_path, monkeypatch):
    home = Home.open(tmp_path / "h", offline=False)
    data = b"x" * 1000
    remote = _FakeRemote(lambda: iter([data]))

    def put_stream(chunks, **kw):
        for _ in chunks:  # the body reads fine; the store's own write fails
            pass
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(home.store, "put_stream", put_stream)
    with pytest.raises(LocalWriteError, match=f"{home.store.tmp_dir}: No space left on device") as ei:
        _Downloader(home, len(data), None).fetch(sha256_digest(data), len(data), [remote, remote])
    assert remote.opened == 1 and ei.value.exit_code == 1 and "retry later" not in str(ei.value)
    home.close()


@pytest.mark.parametrize("what", ["tmp", "shard"])
def test_unwritable_store_is_local_and_names_the_path(tmp_path, what):
    home = Home.open(tmp_path / "h", offline=False)
    data = b"y" * 1000
    digest = sha256_digest(data)
    remote = _FakeRemote(lambda: iter([data]))
    if what == "tmp":  # mkstemp fails (the tests run as root, so chmod would not stop a write)
        home.store.tmp_dir.rmdir()
        blocker = home.store.tmp_dir
    else:  # the final rename's folder cannot be made
        blocker = home.store.blob_path(digest).parent
    blocker.write_text("not a folder")
    with pytest.raises(LocalWriteError, match=f"blob {digest} to the local store: {blocker}"):
        _Downloader(home, len(data), None).fetch(digest, len(data), [remote])
    assert remote.opened == 1
    home.close()


@pytest.mark.parametrize("exc", [ConnectionResetError, lambda: OSError(errno.EIO, "Input/output error")])
def test_error_reading_the_remote_body_is_still_remote(tmp_path, exc):
    home = Home.open(tmp_path / "h", offline=False)

    def chunks():
        yield b"z" * 10
        raise exc()

    remote = _FakeRemote(chunks)
    with pytest.raises(RemoteError, match="retry later"):
        _Downloader(home, 100, None).fetch("sha256:" + "a" * 64, 100, [remote])
    # A connection reset is transient (retried); any other read error is not; neither is local.
    assert remote.opened == (5 if exc is ConnectionResetError else 1)
    assert list(home.store.iter_tmp()) == []
    home.close()


def _fsize_limit(limit: int):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


def test_file_too_large_during_install_is_a_local_error_exit_1(tmp_path):
    url, _, _ = _registry(tmp_path, big=True)  # the concept is ~60 KB
    home = tmp_path / "h"
    pfx(home, "remote", "add", "r", url, check=True)
    p = subprocess.run(["pfx", "install", "cat@1.0.0"], check=False, env=pfx_env(home), capture_output=True,
                       text=True, timeout=120, preexec_fn=_fsize_limit(32 << 10))
    assert p.returncode == 1 and clean_error(p), (p.returncode, p.stderr)
    assert "File too large" in p.stderr and str(home / "tmp") in p.stderr, p.stderr
    assert "retry later" not in p.stderr and "try another remote" not in p.stderr, p.stderr
    assert list((home / "tmp").iterdir()) == []
    assert home_problems(home) == []
    assert json.loads(pfx(home, "list", "--json").stdout) == []
    pfx(home, "install", "cat@1.0.0", check=True)


# --------------------------------------------------------------------------------------------------
# 3. gc and training leftovers


def _age(path: Path, seconds: float) -> None:
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
