"""Downloads through a fault-injecting proxy: 503 SlowDown, connection resets, truncated and wrong
bodies are retried; nothing unverified is stored; a blob that is always wrong fails cleanly. A local
disk error while a downloaded blob is written is local, not the remote's."""

from __future__ import annotations

import errno
import os

import pytest

from registry.errors import IntegrityError, LocalWriteError, RemoteError
from registry.home import Home
from registry.install import _Downloader, install
from registry.manifest import sha256_digest
from tests.kit.concepts import publish_big_concepts
from tests.kit.proxy import Rule, fault_proxy
from tests.kit.s3 import new_bucket

pytestmark = pytest.mark.usefixtures("aws_env")


@pytest.fixture
def published(tmp_path, s3_url):
    url = f"s3://{new_bucket(s3_url)}/reg"
    pub, ms = publish_big_concepts(tmp_path / "pub", tmp_path, url, s3_url, 4)
    return url, ms, pub


def _blob_get(method: str, path: str) -> bool:
    return method == "GET" and "/blobs/sha256/" in path


@pytest.mark.parametrize("action", ["503", "reset", "truncate", "corrupt"])
def test_transient_faults_are_retried_and_bytes_verified(tmp_path, s3_url, published, action):
    url, ms, pub = published
    with fault_proxy(s3_url) as (proxy, state):
        state.rules.append(Rule(_blob_get, action, 3))
        state.rules.append(Rule(lambda m, p: m == "GET" and "/packages/" in p, "503", 1))
        h = Home.open(tmp_path / f"c-{action}", offline=False)
        h.add_remote("s3", url, endpoint_url=proxy)
        res = install(h, [m.ref() for m in ms], workers=4)
        assert all(r.times == 0 for r in state.rules)  # every fault was actually injected
    assert [r["status"] for r in res] == ["installed"] * 4
    for m in ms:
        for b in m.blobs():
            assert h.store.read_bytes(b["digest"]) == pub.store.read_bytes(b["digest"])
    assert list(h.store.iter_tmp()) == []  # no partial file left behind


def test_always_wrong_bytes_fail_cleanly_then_rerun_succeeds(tmp_path, s3_url, published):
    url, ms, _ = published
    with fault_proxy(s3_url) as (proxy, state):
        state.rules.append(Rule(_blob_get, "corrupt", 1000))
        h = Home.open(tmp_path / "c", offline=False)
        h.add_remote("s3", url, endpoint_url=proxy)
        with pytest.raises(IntegrityError, match="could not be fetched intact"):
            install(h, [ms[0].ref()])
        assert not h.store.has(ms[0].concept["digest"]) and h.installed() == []
        assert list(h.store.iter_tmp()) == []
        state.rules.clear()
        assert install(h, [ms[0].ref()])[0]["status"] == "installed"


# --------------------------------------------------------------------------------------------------
# Local write errors are local: not retried, reported as local (exit 1, naming the path and the reason), not
# as a remote failure (exit 6); an error raised while reading the remote's body is still the remote's.


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
