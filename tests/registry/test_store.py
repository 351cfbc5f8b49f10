"""The blob store: verified, atomic, lock-free writes that many processes may make at once."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import stat

import pytest

from registry.errors import IntegrityError, NotFound
from registry.store import Store


def dig(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def visible_files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_put_read_layout_and_read_only(tmp_path):
    s = Store(tmp_path)
    data = b"hello" * 1000
    d, n = s.put_bytes(data)
    assert (d, n) == (dig(data), len(data))
    p = s.blob_path(d)
    assert p == tmp_path / "blobs" / "sha256" / d[7:9] / d[7:]
    assert s.has(d) and s.read_bytes(d) == data
    assert not (stat.S_IMODE(p.stat().st_mode) & 0o222)  # read-only
    assert next(iter(s.iter_blobs()))[0] == d
    assert visible_files(tmp_path / "tmp") == []


def test_only_digests_become_paths(tmp_path):
    s = Store(tmp_path)
    for bad in ("../../etc/passwd", "sha256:" + "0" * 63, "sha256:" + "G" * 64, "sha256:" + "a" * 64 + "/..",
                "md5:" + "a" * 64, "sha256:" + "A" * 64, "/abs"):
        with pytest.raises(IntegrityError):
            s.blob_path(bad)
        with pytest.raises(IntegrityError):
            s.has(bad)


def test_generator_failing_mid_stream_leaves_nothing(tmp_path):
    s = Store(tmp_path)

    def chunks():
        yield b"a" * 70_000
        yield b"b" * 10
        raise ConnectionError("connection reset mid-body")

    with pytest.raises(ConnectionError):
        s.put_stream(chunks())
    assert visible_files(tmp_path) == []


@pytest.mark.parametrize("kind", ["digest", "size_short", "size_long"])
def test_mismatch_leaves_nothing(tmp_path, kind):
    s = Store(tmp_path)
    data = os.urandom(5000)
    expect = dig(data)
    if kind == "digest":
        chunks, size = [data[:-1] + bytes([data[-1] ^ 1])], None  # one bit off, never the same bytes
    elif kind == "size_short":
        chunks, size = [data[:-10]], len(data)
    else:
        chunks, size = [data, b"extra"], len(data)
    with pytest.raises(IntegrityError) as e:
        s.put_stream(chunks, expect_digest=expect, expect_size=size)
    assert expect[:20] in str(e.value)
    assert not s.has(expect) and visible_files(tmp_path) == []


def test_corrupt_blob_is_detected_and_rewrite_heals(tmp_path):
    s = Store(tmp_path)
    data = b"x" * 4096
    d, _ = s.put_bytes(data)
    p = s.blob_path(d)
    os.chmod(p, 0o644)
    p.write_bytes(b"y" * 4096)
    assert s.verify_blob(d) == "corrupt"
    with pytest.raises(IntegrityError, match="corrupt"):
        s.read_bytes(d)
    s.put_bytes(data, expect_digest=d)
    assert s.read_bytes(d) == data and s.verify_blob(d) == "ok"
    with pytest.raises(IntegrityError):
        s.put_bytes(b"not it", expect_digest=d)


def test_missing_blob(tmp_path):
    s = Store(tmp_path)
    d = dig(b"nope")
    assert not s.has(d) and s.verify_blob(d) == "missing"
    with pytest.raises(NotFound):
        s.read_bytes(d)


def _writer(root: str, seed: int, rounds: int, q) -> None:
    s = Store(root)
    payload = bytes(range(256)) * 400  # the same 100 KB from every process
    errors = 0
    for i in range(rounds):
        def chunks():
            for off in range(0, len(payload), 7919):
                yield payload[off:off + 7919]
        d, _ = s.put_stream(chunks(), expect_digest=dig(payload), expect_size=len(payload))
        # Every read by any process at any time sees the whole verified blob.
        if s.read_bytes(d) != payload:
            errors += 1
    q.put(errors)


def test_processes_writing_the_same_blob_at_once(tmp_path):
    ctx = mp.get_context("spawn" if os.name == "nt" else "fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), i, 40, q)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert [q.get(timeout=5) for _ in procs] == [0, 0, 0, 0]
    s = Store(tmp_path)
    assert [d for d, _ in s.iter_blobs()] == [dig(bytes(range(256)) * 400)]
    assert visible_files(tmp_path / "tmp") == []


def test_stray_files_are_ignored(tmp_path):
    s = Store(tmp_path)
    d, _ = s.put_bytes(b"ok")
    (tmp_path / "blobs" / "sha256" / "zz").mkdir()
    (tmp_path / "blobs" / "sha256" / d[7:9] / "notes.txt").write_text("x")
    (tmp_path / "blobs" / "sha256" / "ab").mkdir(exist_ok=True)
    (tmp_path / "blobs" / "sha256" / "ab" / ("cd" + "0" * 62)).write_text("misfiled")
    assert [x for x, _ in s.iter_blobs()] == [d]
