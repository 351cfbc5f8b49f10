"""Reading a remote: package documents, claims and manifests, fetched and checked, and reference resolution.

Every document is checked by its parser (`registry.documents`, `registry.manifest`) against where it was
found; a manifest must hash to the digest it was fetched by and name the package and version asked for.

Resolution cost does not depend on the registry's size: an exact `name@1.2.0` costs one GET of the
package document (a claim GET as a fallback when the index lags a crashed publisher) plus one GET of
the manifest; a digest pin costs the manifest GET alone. Nothing here lists the store.

Mutable documents (package documents, claims being created, search shards) are read through
`reread_torn`: on a store without atomic PUT a read during a write can return a document cut short,
which parses as no JSON at all (MalformedDocument); that read is repeated a few times with backoff
before it counts as corrupt. JSON that breaks a rule (duplicate keys, NaN, wrong schema) is refused
at once.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from registry.documents import MAX_CLAIM_BYTES, MAX_PACKAGE_BYTES, PackageDoc, parse_claim, parse_package_doc
from registry.errors import IntegrityError, MalformedDocument, NotFound
from registry.manifest import MAX_MANIFEST_BYTES, Manifest, parse_manifest
from registry.names import Ref
from registry.remotes.base import KeyMissing, Remote, claim_key, manifest_key, package_key

T = TypeVar("T")
TORN_READ_ATTEMPTS = 5  # waits of up to 0.05, 0.1, 0.2, 0.4 s: a PUT of a small document is long done


def reread_torn(read: Callable[[], T], attempts: int = TORN_READ_ATTEMPTS) -> T:
    """`read()` (GET + parse), repeated while what comes back is not JSON at all: a torn read of a
    document being written on a store without atomic PUT. The last failure is raised as it is."""
    for attempt in range(attempts):
        try:
            return read()
        except MalformedDocument:
            if attempt == attempts - 1:
                raise
            time.sleep(random.uniform(0.5, 1.0) * 0.05 * 2**attempt)
    raise AssertionError("unreachable")


def read_claim(remote: Remote, name: str, version: str) -> dict | None:
    def once() -> dict | None:
        try:
            data = remote.get(claim_key(name, version), max_bytes=MAX_CLAIM_BYTES)
        except KeyMissing:
            return None
        except IntegrityError as e:  # over the cap: say which claim, not only its hashed key
            raise IntegrityError(f"claim for {name}@{version}: {e}") from None
        return parse_claim(data, expect_name=name, expect_version=version)

    return reread_torn(once)




CACHE_PREFIX = "package-doc:"


def cache_get(home: Any, remote: Remote, name: str) -> tuple[bytes, str] | None:
    """A cached package document (bytes, ETag) from the home's remote cache, if any."""
    try:
        got = home.kv_get(CACHE_PREFIX + name, remote=remote.url)
    except Exception:  # noqa: BLE001 - a cache must never break a read
        return None
    if not got or not got.get("etag") or not isinstance(got.get("value"), str):
        return None
    return got["value"].encode("utf-8"), got["etag"]


def cache_put(home: Any, remote: Remote, name: str, data: bytes, etag: str) -> None:
    try:
        home.kv_set(CACHE_PREFIX + name, data.decode("utf-8"), etag, remote=remote.url)
    except Exception:  # noqa: BLE001, S110 - a cache write must never fail an install
        pass


def fetch_package_doc(remote: Remote, name: str, cached: tuple[bytes, str] | None = None
                      ) -> tuple[PackageDoc | None, tuple[bytes, str] | None]:
    """(package doc or None, fresh (bytes, ETag) to cache or None). Thread-safe: touches no SQLite.
    With `cached`, the GET carries If-None-Match and an unchanged doc comes back without a body."""
    return reread_torn(lambda: _fetch_package_doc(remote, name, cached))


def _fetch_package_doc(remote: Remote, name: str, cached: tuple[bytes, str] | None
                       ) -> tuple[PackageDoc | None, tuple[bytes, str] | None]:
    key = package_key(name)
    try:
        doc = remote.get_doc(key, max_bytes=MAX_PACKAGE_BYTES, if_none_match=cached[1] if cached else None)
    except IntegrityError as e:  # over the cap
        raise IntegrityError(f"index document of {name}: {e}") from None
    if doc is None:
        return None, None
    where = f"index document of {name} on {remote.describe()}"
    if cached and doc.etag == cached[1] and not doc.data:
        return parse_package_doc(cached[0], expect_name=name, where=where), None
    return parse_package_doc(doc.data, expect_name=name, where=where), (doc.data, doc.etag)


def fetch_package(remote: Remote, name: str, home: Any = None) -> PackageDoc | None:
    """The package document, revalidating (and refreshing) the home's cached copy when given a home.
    Call from the thread that owns `home`."""
    cached = cache_get(home, remote, name) if home is not None else None
    pkg, fresh = fetch_package_doc(remote, name, cached)
    if home is not None and fresh is not None:
        cache_put(home, remote, name, *fresh)
    return pkg


def fetch_manifest(remote: Remote, digest: str, *, expect_name: str | None = None,
                   expect_version: str | None = None) -> Manifest:
    try:
        data = remote.get(manifest_key(digest), max_bytes=MAX_MANIFEST_BYTES)
    except KeyMissing:
        raise NotFound(f"manifest {digest} is not on {remote.describe()}") from None
    except IntegrityError as e:  # over the cap
        raise IntegrityError(f"manifest {digest} ({expect_name or '?'}@{expect_version or '?'}): {e}") from None
    return parse_manifest(data, expect_digest=digest, expect_name=expect_name, expect_version=expect_version)


@dataclass
class Resolved:
    ref: Ref
    manifest: Manifest
    remote: Remote
    yanked: bool = False
    fresh_doc: tuple[bytes, str] | None = None  # for the caller to cache (from its own thread)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version


def resolve_on(remote: Remote, ref: Ref, cached: tuple[bytes, str] | None = None) -> Resolved:
    """Resolve one reference on one remote (NotFound if it has no match). Constant request count;
    thread-safe (pass a cached package doc in, get `fresh_doc` out)."""
    if ref.kind == "digest":
        m = fetch_manifest(remote, ref.selector, expect_name=ref.name)
        return Resolved(ref, m, remote)
    pkg, fresh = fetch_package_doc(remote, ref.name, cached)
    entry: dict | None = None
    if pkg is not None:
        try:
            entry = pkg.select(ref)
        except NotFound:
            if ref.kind != "version":
                raise
    if entry is None:
        if ref.kind != "version":
            raise NotFound(f"{ref.name} is not on {remote.describe()}")
        # The index may lag a publisher that crashed after its claim; the claim is the truth.
        claim = read_claim(remote, ref.name, ref.selector)
        if claim is None:
            raise NotFound(f"{ref} is not on {remote.describe()}")
        entry = {"version": ref.selector, "manifest": claim["manifest"], "yanked": False}
    m = fetch_manifest(remote, entry["manifest"], expect_name=ref.name, expect_version=entry["version"])
    return Resolved(ref, m, remote, bool(entry.get("yanked")), fresh)
