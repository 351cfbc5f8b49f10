"""`file:///path` remote: the registry layout on a local disk or a shared filesystem, without locks.

Conditional writes are emulated with `link(2)`, which creates a name atomically and fails if it
exists, on every POSIX filesystem (and NTFS) that supports hard links:

* `put_if_absent(key)`: write a unique temp file beside the target, fsync, then `os.link(tmp, key)`.
  A reader sees either no object or the whole object, never a partial one; a second writer gets
  EEXIST and learns the object is already there (the If-None-Match: * of S3).
* Mutable index documents are stored as a folder of numbered generations, `<key>.d/000000000007`.
  The ETag of a document is `g<n>` for its highest generation n. Compare-and-swap from `g<n>` is
  "link generation n+1": exactly one of several racing writers can create that name, the others get
  EEXIST (the 412 of If-Match). Generations are never deleted, so a number is never reused and a
  stale ETag can never win later (no ABA). A plain file at `<key>` (as a static exporter may write
  it) counts as generation 0.

Nothing here takes a lock, so a crashed writer can never wedge the registry: at worst it leaves a
`.tmp-*` file behind, which no reader ever looks at.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from registry.errors import IntegrityError, RemoteError
from registry.remotes.base import CasFailed, Doc, KeyMissing, Remote, read_capped

GEN_SUFFIX = ".d"
GEN_WIDTH = 12


class FileRemote(Remote):
    def __init__(self, name: str, root: str | os.PathLike, *, read_only: bool = False, single_writer: bool = False):
        self.name = name
        self.root = Path(root)
        self.url = self.root.as_uri() if self.root.is_absolute() else str(self.root)
        self.read_only = read_only
        self.single_writer = single_writer

    def server(self) -> str | None:
        return "local filesystem"

    # -- paths ---------------------------------------------------------------------------------
    def _path(self, key: str) -> Path:
        """Keys are built by this package from hex digests and checked versions; refuse anything else."""
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in ("", ".", "..") or "\\" in p or ":" in p for p in parts):
            raise RemoteError(f"refusing unsafe key {key!r}")
        return self.root.joinpath(*parts)

    def _exclusive_create(self, target: Path, data: bytes) -> bool:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # a registry on a shared disk is read by other users (mkstemp makes 0600)
            try:
                os.link(tmp, target)
            except FileExistsError:
                return False
            return True
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    # -- reads ---------------------------------------------------------------------------------
    def get(self, key: str, *, max_bytes: int) -> bytes:
        p = self._path(key)
        try:
            with open(p, "rb") as f:
                return read_capped(iter(lambda: f.read(1 << 16), b""), max_bytes, key)
        except (FileNotFoundError, NotADirectoryError):
            raise KeyMissing(f"{key} not found on {self.describe()}") from None
        except IsADirectoryError:
            raise IntegrityError(f"{key} on {self.describe()} is a folder, not an object") from None

    def _generations(self, key: str) -> list[int]:
        d = self._path(key + GEN_SUFFIX)
        try:
            return sorted(int(n) for n in os.listdir(d) if n.isdigit() and len(n) == GEN_WIDTH)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def get_doc(self, key: str, *, max_bytes: int, if_none_match: str | None = None) -> Doc | None:
        gens = self._generations(key)
        if gens:
            etag = f"g{gens[-1]}"
            if if_none_match == etag:
                return Doc(b"", etag)
            path_key = f"{key}{GEN_SUFFIX}/{gens[-1]:0{GEN_WIDTH}d}"
            return Doc(self.get(path_key, max_bytes=max_bytes), etag)
        try:
            data = self.get(key, max_bytes=max_bytes)
        except KeyMissing:
            return None
        return Doc(data, "g0")

    def open_blob(self, key: str, chunk_size: int = 1 << 16) -> tuple[int | None, Iterator[bytes]]:
        p = self._path(key)
        try:
            f = open(p, "rb")  # noqa: SIM115 - the chunk generator closes it
        except (FileNotFoundError, NotADirectoryError):
            raise KeyMissing(f"{key} not found on {self.describe()}") from None
        size = os.fstat(f.fileno()).st_size

        def chunks() -> Iterator[bytes]:
            with f:
                while c := f.read(chunk_size):
                    yield c

        return size, chunks()

    def head_size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    # -- writes --------------------------------------------------------------------------------
    def put_if_absent(self, key: str, data: bytes) -> bool:
        self.check_writable()
        return self._exclusive_create(self._path(key), data)

    def put_doc(self, key: str, data: bytes, *, etag: str | None) -> str:
        self.check_writable()
        gens = self._generations(key)
        plain = self._path(key).is_file()
        if etag is None:
            if gens or plain:
                raise CasFailed(f"{key} already exists")
            nxt = 1
        else:
            if not (etag.startswith("g") and etag[1:].isdigit()):
                raise CasFailed(f"{key}: foreign ETag {etag!r}")
            nxt = int(etag[1:]) + 1
        target = self._path(f"{key}{GEN_SUFFIX}/{nxt:0{GEN_WIDTH}d}")
        if not self._exclusive_create(target, data):
            raise CasFailed(f"{key} changed since it was read")
        return f"g{nxt}"

    def put_public(self, key: str, data: bytes) -> None:
        self.check_writable()
        from perfusion_hub.concept import atomic_write_bytes

        atomic_write_bytes(self._path(key), data)

    # -- admin ---------------------------------------------------------------------------------
    def list_keys(self, prefix: str, start_after: str | None = None) -> Iterator[str]:
        base = self.root
        keys: set[str] = set()
        top = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self._path(top) if top else base
        for dirpath, dirnames, filenames in os.walk(start):
            rel = Path(dirpath).relative_to(base).as_posix()
            rel = "" if rel == "." else rel
            if rel.endswith(GEN_SUFFIX):
                dirnames[:] = []
                if any(n.isdigit() for n in filenames):
                    keys.add(rel[: -len(GEN_SUFFIX)])
                continue
            for fn in filenames:
                if fn.startswith(".tmp-"):
                    continue
                keys.add(f"{rel}/{fn}" if rel else fn)
        for k in sorted(keys):
            if k.startswith(prefix) and (start_after is None or k > start_after):
                yield k

    def delete(self, key: str) -> None:
        self.check_writable()
        shutil.rmtree(self._path(key + GEN_SUFFIX), ignore_errors=True)
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass
