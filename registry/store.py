"""The content-addressed blob store: `root/blobs/sha256/<ab>/<hex>`, read-only files.

Correctness never depends on a lock. Each writer streams into its own unique temp file in `root/tmp`
(same filesystem, so the final rename is atomic), hashes while writing, checks size and digest,
fsyncs, makes the file read-only and only then renames it into place. A reader therefore sees either
no file or the whole verified file; two processes writing the same blob both rename identical bytes.
Nothing unverified is ever renamed into the store: on any mismatch or error the temp file is removed.

Only strings that match 'sha256:<64 lowercase hex>' ever become paths.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from registry.errors import IntegrityError, NotFound
from registry.names import is_digest

CHUNK = 1 << 20


def check_digest(digest: str) -> str:
    """Return the hex part of a valid digest; IntegrityError for anything else (never a path)."""
    if not is_digest(digest):
        raise IntegrityError(f"not a sha256 digest: {str(digest)[:80]!r}")
    return digest[7:]


class Store:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.blobs_dir = self.root / "blobs" / "sha256"
        self.tmp_dir = self.root / "tmp"
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    # -- addressing --------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        hexd = check_digest(digest)
        return self.blobs_dir / hexd[:2] / hexd

    def has(self, digest: str) -> bool:
        try:
            return stat.S_ISREG(self.blob_path(digest).stat().st_mode)
        except FileNotFoundError:
            return False

    def size(self, digest: str) -> int:
        try:
            return self.blob_path(digest).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is not in the store ({self.root})") from None

    # -- writing -----------------------------------------------------------------------------------

    def put_stream(
        self,
        chunks: Iterable[bytes],
        *,
        expect_digest: str | None = None,
        expect_size: int | None = None,
    ) -> tuple[str, int]:
        """Store the bytes `chunks` yields; return (digest, size).

        With `expect_digest`/`expect_size` the bytes must match (IntegrityError otherwise, raised as
        soon as the size is exceeded) and nothing is left behind. The same digest written twice (or by
        two processes at once) is fine: the rename is atomic and the bytes identical; a rewrite also
        replaces a copy that rotted on disk and refreshes its mtime (gc's grace period).
        """
        if expect_digest is not None:
            check_digest(expect_digest)
        fd, tmp = tempfile.mkstemp(prefix="blob-", suffix=".part", dir=self.tmp_dir)
        try:
            h = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    if not chunk:
                        continue
                    size += len(chunk)
                    if expect_size is not None and size > expect_size:
                        raise IntegrityError(f"blob {expect_digest or '(stream)'}: more than the expected {expect_size} bytes")
                    h.update(chunk)
                    f.write(chunk)
                f.flush()
                digest = "sha256:" + h.hexdigest()
                if expect_size is not None and size != expect_size:
                    raise IntegrityError(f"blob {expect_digest or digest}: got {size} bytes, expected {expect_size}")
                if expect_digest is not None and digest != expect_digest:
                    raise IntegrityError(f"blob {expect_digest}: content has digest {digest}")
                os.fsync(f.fileno())
            os.chmod(tmp, 0o444)
            final = self.blob_path(digest)
            final.parent.mkdir(exist_ok=True)
            os.replace(tmp, final)
            return digest, size
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def put_bytes(self, data: bytes, expect_digest: str | None = None) -> tuple[str, int]:
        if expect_digest is not None and self.has(expect_digest):
            # Re-hash rather than trust the name: a hit must still be the right bytes.
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            if digest != expect_digest:
                raise IntegrityError(f"blob {expect_digest}: content has digest {digest}")
        return self.put_stream([data], expect_digest=expect_digest, expect_size=None)

    def put_file(self, path: str | os.PathLike, expect_digest: str | None = None) -> tuple[str, int]:
        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as f:
                while block := f.read(CHUNK):
                    yield block

        return self.put_stream(chunks(), expect_digest=expect_digest)

    # -- reading -----------------------------------------------------------------------------------

    def read_bytes(self, digest: str) -> bytes:
        """The blob's bytes, re-verified against the digest (IntegrityError names the blob and path)."""
        path = self.blob_path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is not in the store ({self.root})",
                           hint="reinstall the concept that needs it") from None
        got = "sha256:" + hashlib.sha256(data).hexdigest()
        if got != digest:
            raise IntegrityError(f"blob {digest} at {path} is corrupt (content has digest {got})",
                                 hint="run `pfx verify --fix`, then reinstall")
        return data

    def verify_blob(self, digest: str) -> str:
        """'ok', 'missing' or 'corrupt'. Hashing releases the GIL, so threads parallelise this."""
        return self.check_blob(digest)[0]

    def check_blob(self, digest: str) -> tuple[str, int]:
        """(status, size on disk): one open, one fstat, one hash pass."""
        try:
            with open(self.blob_path(digest), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                got = hashlib.file_digest(f, "sha256").hexdigest()
        except FileNotFoundError:
            return "missing", 0
        return ("ok" if got == digest[7:] else "corrupt"), size

    def delete(self, digest: str) -> bool:
        try:
            os.unlink(self.blob_path(digest))
            return True
        except FileNotFoundError:
            return False

    def iter_blobs(self) -> Iterator[tuple[str, os.stat_result]]:
        """Every well-named blob file with its stat. Stray files are ignored, never interpreted."""
        try:
            shards = list(os.scandir(self.blobs_dir))
        except FileNotFoundError:
            return
        for shard in shards:
            if len(shard.name) != 2 or not shard.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(shard.path):
                name = entry.name
                if len(name) == 64 and name[:2] == shard.name and is_digest("sha256:" + name):
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if stat.S_ISREG(st.st_mode):
                        yield "sha256:" + name, st

    def iter_tmp(self) -> Iterator[tuple[Path, os.stat_result]]:
        for entry in os.scandir(self.tmp_dir):
            try:
                yield Path(entry.path), entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
