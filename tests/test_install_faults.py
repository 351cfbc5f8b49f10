"""Downloads through a fault-injecting proxy: 503 SlowDown, connection resets, truncated and wrong
bodies are retried; nothing unverified is stored; a blob that is always wrong fails cleanly."""

from __future__ import annotations

import pytest

from registry.errors import IntegrityError
from registry.home import Home
from registry.install import install
from tests.conceptgen import publish_big_concepts
from tests.s3server import Fault, aws_env, fault_proxy, new_bucket  # noqa: F401  (aws_env: autouse fixture)


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
        state.faults.append(Fault(_blob_get, action, times=3))
        state.faults.append(Fault(lambda m, p: m == "GET" and "/packages/" in p, "503", times=1))
        h = Home.open(tmp_path / f"c-{action}", offline=False)
        h.add_remote("s3", url, endpoint_url=proxy)
        res = install(h, [m.ref() for m in ms], workers=4)
        assert all(f.times == 0 for f in state.faults)  # every fault was actually injected
    assert [r["status"] for r in res] == ["installed"] * 4
    for m in ms:
        for b in m.blobs():
            assert h.store.read_bytes(b["digest"]) == pub.store.read_bytes(b["digest"])
    assert list(h.store.iter_tmp()) == []  # no partial file left behind


def test_always_wrong_bytes_fail_cleanly_then_rerun_succeeds(tmp_path, s3_url, published):
    url, ms, _ = published
    with fault_proxy(s3_url) as (proxy, state):
        state.faults.append(Fault(_blob_get, "corrupt", times=1000))
        h = Home.open(tmp_path / "c", offline=False)
        h.add_remote("s3", url, endpoint_url=proxy)
        with pytest.raises(IntegrityError, match="could not be fetched intact"):
            install(h, [ms[0].ref()])
        assert not h.store.has(ms[0].concept["digest"]) and h.installed() == []
        assert list(h.store.iter_tmp()) == []
        state.faults.clear()
        assert install(h, [ms[0].ref()])[0]["status"] == "installed"
