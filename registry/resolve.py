"""Reading a remote: the index documents, claims and manifests, checked, and reference resolution.

Index documents and claims are the roots of trust, so every read here (1) caps the size before
parsing, (2) parses strict JSON (no duplicate keys, no NaN), (3) checks the schema, and (4) checks
that what the document names agrees with where it was found (the package doc at the key of
`sha256(name)` must name `name`; a claim at `claims/../<version>.json` must name that version; a
manifest must hash to the digest it was fetched by and name the package and version asked for).

Resolution cost does not depend on the registry's size: an exact `name@1.2.0` costs one GET of the
package document (a claim GET as a fallback when the index lags a crashed publisher) plus one GET of
the manifest; a digest pin costs the manifest GET alone. Nothing here lists the store.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from registry.errors import IntegrityError, NotFound, PfxError, UsageError
from registry.manifest import MAX_MANIFEST_BYTES, Manifest, canonical_json, parse_manifest, strict_loads
from registry.names import Ref, is_digest, validate_name
from registry.remotes.base import KeyMissing, Remote, claim_key, manifest_key, package_key
from registry.versions import parse_version, select_version, sort_versions

PACKAGE_SCHEMA = "pfx.package/1"
CLAIM_SCHEMA = "pfx.claim/1"
MAX_PACKAGE_BYTES = 1 << 20  # ~6,000 versions of one concept; a hostile doc is refused unread
MAX_CLAIM_BYTES = 4 << 10
MAX_SUMMARY_TEXT = 512
MAX_TAGS_PER_PACKAGE = 64
SUMMARY_FIELDS = ("version", "description", "trigger", "superclass", "tags", "license", "base")


def strict_json(data: bytes, where: str, cap: int) -> Any:
    """Parse JSON after a size check; duplicate keys and NaN/Infinity are refused (IntegrityError)."""
    if len(data) > cap:
        raise IntegrityError(f"{where}: {len(data)} bytes, over the {cap}-byte limit; refused before parsing")
    return strict_loads(bytes(data), where)


def _fail(where: str, msg: str) -> None:
    raise IntegrityError(f"{where}: {msg}")


# --------------------------------------------------------------------------------------------------
# Package documents


@dataclass
class PackageDoc:
    """The per-package index: every version with its manifest digest and yank flag, the tags, and a
    summary of the latest version for search results. The only mutable object for a package."""

    name: str
    versions: dict[str, dict] = field(default_factory=dict)  # version -> {manifest, published, yanked}
    tags: dict[str, str] = field(default_factory=dict)  # tag -> version
    summary: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return canonical_json({
            "schema": PACKAGE_SCHEMA, "name": self.name, "versions": self.versions,
            "tags": self.tags, "summary": self.summary,
        })

    def entries(self) -> list[dict]:
        """The shape `versions.select_version` takes."""
        return sort_versions([{"version": v, **e} for v, e in self.versions.items()])

    def select(self, ref: Ref) -> dict:
        return select_version(self.entries(), self.tags, ref)


def parse_package_doc(data: bytes, *, expect_name: str, where: str = "") -> PackageDoc:
    where = where or f"index document of {expect_name}"
    raw = strict_json(data, where, MAX_PACKAGE_BYTES)
    if not isinstance(raw, dict) or set(raw) != {"schema", "name", "versions", "tags", "summary"}:
        _fail(where, "not a package document (fields schema, name, versions, tags, summary)")
    if raw["schema"] != PACKAGE_SCHEMA:
        _fail(where, f"schema {raw['schema']!r} is not {PACKAGE_SCHEMA!r} (a newer pfx may be needed)")
    if raw["name"] != expect_name:
        _fail(where, f"names {raw['name']!r} but was found at the key of {expect_name!r}")
    versions, tags, summary = raw["versions"], raw["tags"], raw["summary"]
    if not isinstance(versions, dict) or not isinstance(tags, dict) or not isinstance(summary, dict):
        _fail(where, "versions, tags and summary must be objects")
    for v, e in versions.items():
        try:
            parse_version(v)
        except UsageError:
            _fail(where, f"{v!r} is not a version")
        if not isinstance(e, dict) or not {"manifest", "yanked"} <= set(e) or set(e) - {"manifest", "yanked", "published"}:
            _fail(where, f"entry for {v} must have manifest, yanked (and published)")
        if not is_digest(e["manifest"]) or not isinstance(e["yanked"], bool):
            _fail(where, f"entry for {v} has a bad manifest digest or yanked flag")
        if not isinstance(e.get("published", ""), str):
            _fail(where, f"entry for {v}: published must be a string")
    if len(tags) > MAX_TAGS_PER_PACKAGE:
        _fail(where, f"more than {MAX_TAGS_PER_PACKAGE} tags")
    for t, v in tags.items():
        if not isinstance(t, str) or not re.fullmatch(r"[a-z][a-z0-9._-]{0,63}", t) or v not in versions:
            _fail(where, f"tag {t!r} is malformed or points at a version that is not listed")
    for k, v in summary.items():
        if k not in SUMMARY_FIELDS:
            _fail(where, f"summary has unknown field {k!r}")
        if k == "tags":
            if not isinstance(v, list) or len(v) > 32 or not all(isinstance(x, str) and len(x) <= 32 for x in v):
                _fail(where, "summary.tags must be a short list of short strings")
        elif not isinstance(v, str) or len(v) > MAX_SUMMARY_TEXT:
            _fail(where, f"summary.{k} must be a string of at most {MAX_SUMMARY_TEXT} characters")
    return PackageDoc(raw["name"], versions, tags, summary)


def summary_of(m: Manifest) -> dict[str, Any]:
    """What a search result shows without fetching the manifest."""
    return {
        "version": m.version, "description": m.description[:MAX_SUMMARY_TEXT], "trigger": m.trigger[:MAX_SUMMARY_TEXT],
        "superclass": m.superclass[:MAX_SUMMARY_TEXT], "tags": list(m.tags)[:32], "license": m.license[:MAX_SUMMARY_TEXT],
        "base": m.base_digest,
    }


# --------------------------------------------------------------------------------------------------
# Claims


def make_claim(name: str, version: str, manifest_digest: str, created: str) -> bytes:
    return canonical_json({"schema": CLAIM_SCHEMA, "name": name, "version": version,
                           "manifest": manifest_digest, "created": created})


def parse_claim(data: bytes, *, expect_name: str, expect_version: str) -> dict:
    where = f"claim for {expect_name}@{expect_version}"
    raw = strict_json(data, where, MAX_CLAIM_BYTES)
    if not isinstance(raw, dict) or set(raw) != {"schema", "name", "version", "manifest", "created"}:
        _fail(where, "not a claim (fields schema, name, version, manifest, created)")
    if raw["schema"] != CLAIM_SCHEMA:
        _fail(where, f"schema {raw['schema']!r} is not {CLAIM_SCHEMA!r}")
    if raw["name"] != expect_name or raw["version"] != expect_version:
        _fail(where, f"names {raw['name']!r}@{raw['version']!r}, which disagrees with where it was found")
    if not is_digest(raw["manifest"]) or not isinstance(raw["created"], str):
        _fail(where, "bad manifest digest or created time")
    return raw


def read_claim(remote: Remote, name: str, version: str) -> dict | None:
    try:
        data = remote.get(claim_key(name, version), max_bytes=MAX_CLAIM_BYTES)
    except KeyMissing:
        return None
    except IntegrityError as e:  # over the cap: say which claim, not only its hashed key
        raise IntegrityError(f"claim for {name}@{version}: {e}") from None
    return parse_claim(data, expect_name=name, expect_version=version)


# --------------------------------------------------------------------------------------------------
# Fetching


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


# --------------------------------------------------------------------------------------------------
# Remote search (shards built by compact.py)

_TOKEN = re.compile(r"[a-z0-9]+")
STOPWORDS = frozenset({"a", "an", "the", "of", "and", "or", "in", "on", "with", "for", "to", "photo"})


def tokenize(text: str) -> set[str]:
    return {t for t in _TOKEN.findall(text.lower()) if len(t) > 1 and t not in STOPWORDS}


def terms_of(pkg: PackageDoc) -> set[str]:
    s = pkg.summary
    text = " ".join([pkg.name, s.get("description", ""), s.get("trigger", ""), s.get("superclass", ""),
                     " ".join(s.get("tags", []))])
    return tokenize(text) | {pkg.name}


def search_remote(remote: Remote, query: str, limit: int = 20) -> list[dict]:
    """AND-search over term postings: one GET per query term, then one GET per shown result.

    An exact package name is also looked up directly, so a package is findable by name the moment
    it is published, before any compaction."""
    from registry.compact import read_term_shard, term_shard_key

    terms = sorted(tokenize(query))
    names: set[str] | None = None
    for t in terms:
        postings = read_term_shard(remote, term_shard_key(t)).get(t, [])
        names = set(postings) if names is None else names & set(postings)
    found = sorted(names or ())
    try:
        exact = validate_name(query.strip().lower())
    except PfxError:
        exact = None
    if exact and exact not in found:
        found.insert(0, exact)
    found = found[: max(limit, 0)]
    if not found:
        return []

    def one(name: str) -> dict | None:
        try:
            pkg, _ = fetch_package_doc(remote, name)  # no SQLite handle across threads
        except NotFound:
            return None
        if pkg is None or not pkg.versions:
            return None
        return {"name": pkg.name, "remote": remote.name, **pkg.summary,
                "versions": len(pkg.versions), "dist_tags": pkg.tags}

    with ThreadPoolExecutor(max_workers=min(8, len(found))) as ex:
        return [r for r in ex.map(one, found) if r is not None]
