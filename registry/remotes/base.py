"""The remote protocol: a tiny key/value object store with two conditional writes.

Every remote (s3://, file://) exposes the same few operations over the same key layout, so the
publish/resolve/install logic is written once against this class. The protocol is deliberately the
intersection of what S3 offers and what a plain filesystem can emulate without locks:

* `put_if_absent` stands in for `PUT If-None-Match: *` (first writer wins; a second writer learns the
  object already exists and never overwrites it);
* `get_doc` / `put_doc` give compare-and-swap on an opaque ETag (`PUT If-Match: <etag>`), used only for
  the small mutable index documents;
* `open_blob` streams an immutable object; the caller verifies every byte against a digest.

No operation here lists the store on a hot path: `list_keys` exists only for admin work (compaction,
rebuilding the index from claims) and for nothing an install or a publish does.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

from registry.errors import PfxError, RemoteError

# Key layout shared by all remotes (see registry/DESIGN.md).
CONFIG_KEY = "pfx-registry.json"
MAX_CONFIG_BYTES = 16 << 10


class KeyMissing(PfxError):
    """The object does not exist on the remote (a 404). Internal: callers turn it into NotFound."""


class CasFailed(PfxError):
    """A conditional write lost: the object exists (create) or changed since it was read (swap)."""


class ReadOnlyRemote(RemoteError):
    pass


CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
                 ".js": "text/javascript; charset=utf-8", ".json": "application/json", ".png": "image/png",
                 ".jpg": "image/jpeg", ".webp": "image/webp", ".svg": "image/svg+xml", ".txt": "text/plain"}


def content_type(key: str) -> str:
    dot = key.rfind(".")
    return CONTENT_TYPES.get(key[dot:] if dot > key.rfind("/") else "", "application/octet-stream")


def _hex(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise PfxError(f"not a sha256 digest: {digest!r}")
    return hexpart


def blob_key(digest: str) -> str:
    h = _hex(digest)
    return f"blobs/sha256/{h[:2]}/{h}"


def manifest_key(digest: str) -> str:
    h = _hex(digest)
    return f"manifests/sha256/{h[:2]}/{h}"


def name_hash(name: str) -> str:
    """Names never become paths: keys for a package use the sha256 of its (validated) name."""
    return hashlib.sha256(name.encode("utf-8")).hexdigest()


def package_key(name: str) -> str:
    h = name_hash(name)
    return f"packages/{h[:2]}/{h}.json"


def claim_prefix(name: str) -> str:
    h = name_hash(name)
    return f"claims/{h[:2]}/{h}/"


def claim_key(name: str, version: str) -> str:
    if not version or any(c not in "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-+" for c in version):
        raise PfxError(f"not a version: {version!r}")
    return f"{claim_prefix(name)}{version}.json"


@dataclass
class Doc:
    """A mutable document as read: its bytes and the ETag to pass back for compare-and-swap."""

    data: bytes
    etag: str


class Remote(ABC):
    """One registry location. Thread-safe: install fetches blobs from several threads at once."""

    name: str
    url: str
    read_only: bool = False
    single_writer: bool = False
    # How conditional writes are sent, set from the capability probe (registry/capabilities.py). An S3
    # store may match only one spelling of the ETag in If-Match (Ceph RGW 16 only the unquoted one:
    # etag_form "unquoted"); in --single-writer mode a store that ignores a header gets writes without
    # it (conditional_create / conditional_swap False: check, then write). A file:// remote is always
    # atomic and conditional and ignores these.
    etag_forms: tuple[str, ...] = ("opaque",)  # the spellings this remote can send (the probe tries each)
    etag_form: str = "opaque"
    conditional_create: bool = True
    conditional_swap: bool = True

    @abstractmethod
    def get(self, key: str, *, max_bytes: int) -> bytes:
        """Whole object, refused (IntegrityError) if larger than max_bytes. KeyMissing if absent."""

    @abstractmethod
    def get_doc(self, key: str, *, max_bytes: int, if_none_match: str | None = None) -> Doc | None:
        """A mutable document with its ETag; None if absent. If `if_none_match` equals the current
        ETag, returns Doc(b"", etag) without the body (a 304), so a cached copy can be reused."""

    @abstractmethod
    def open_blob(self, key: str, chunk_size: int = 1 << 16) -> tuple[int | None, Iterator[bytes]]:
        """(declared length or None, chunks). Transport errors surface while iterating."""

    @abstractmethod
    def head_size(self, key: str) -> int | None:
        """Size of an existing object, or None if absent."""

    @abstractmethod
    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create `key` unless it exists. True if this call created it, False if it was already there."""

    @abstractmethod
    def put_doc(self, key: str, data: bytes, *, etag: str | None) -> str:
        """Compare-and-swap: replace the document only if its ETag is still `etag` (or create it if
        `etag` is None and it does not exist). Returns the new ETag; CasFailed if the condition fails."""

    @abstractmethod
    def list_keys(self, prefix: str, start_after: str | None = None) -> Iterator[str]:
        """Admin only (compaction, rebuild): keys under prefix in lexicographic order."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Admin only: remove an object (probe leftovers, compacted journal events)."""

    def put_public(self, key: str, data: bytes) -> None:
        """Overwrite a plain, publicly served file (the static catalogue under `site/`): no condition,
        a content type from the key's extension, and on file:// a plain file (not a CAS generation
        folder) so that any static web server can serve it. Never used for roots of trust."""
        raise NotImplementedError(f"remote '{self.name}' cannot hold a static site")

    def describe(self) -> str:
        return f"{self.name} ({self.url})"

    def server(self) -> str | None:
        """What the store says it is (the HTTP Server header of its last answer), if anything."""
        return None

    def check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyRemote(
                f"remote '{self.name}' is read-only and cannot be published to",
                hint="add your own remote: pfx remote add NAME s3://bucket/prefix --default",
            )

    def close(self) -> None:  # pragma: no cover - trivial
        pass


def read_capped(chunks: Iterator[bytes], max_bytes: int, what: str) -> bytes:
    """Collect a stream but stop at max_bytes + 1: a hostile document cannot make us buffer gigabytes."""
    from registry.errors import IntegrityError

    buf = bytearray()
    for c in chunks:
        buf += c
        if len(buf) > max_bytes:
            raise IntegrityError(f"{what} is larger than the {max_bytes}-byte limit; refused before parsing")
    return bytes(buf)
