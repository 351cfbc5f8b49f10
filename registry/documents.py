"""The formats of a remote's documents: package index documents, claims and search shards.

Index documents and claims are the roots of trust, so every parser here (1) caps the size before
parsing, (2) parses strict JSON (no duplicate keys, no NaN), (3) checks the schema, and (4) checks
that what the document names agrees with where it was found (the package doc at the key of
`sha256(name)` must name `name`; a claim at `claims/../<version>.json` must name that version; a search
shard holds only entries that hash to its own shard id). Parsing only: reading and writing them is
`registry.resolve`, `registry.publish`, `registry.search` and `registry.compact`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from registry.errors import IntegrityError, UsageError
from registry.manifest import Manifest, canonical_json, strict_json
from registry.names import Ref, is_digest
from registry.versions import parse_version, select_version, sort_versions

PACKAGE_SCHEMA = "pfx.package/1"
CLAIM_SCHEMA = "pfx.claim/1"
TERMS_SCHEMA, PKGS_SCHEMA = "pfx.terms/1", "pfx.pkgs/1"
MAX_PACKAGE_BYTES = 1 << 20  # ~6,000 versions of one concept; a hostile doc is refused unread
MAX_CLAIM_BYTES = 4 << 10
MAX_SHARD_BYTES = 4 << 20
MAX_SUMMARY_TEXT = 512
MAX_TAGS_PER_PACKAGE = 64
SUMMARY_FIELDS = ("version", "description", "trigger", "superclass", "tags", "license", "base",
                  # since the card (all optional: documents written before them still parse)
                  "title", "base_name", "base_family", "permissions", "signers", "preview")
PERMISSION_FLAGS = ("allow_commercial", "allow_derivatives", "require_credit")  # = perfusion_hub.card's
SHARD_HEX = 3  # 4096 shards per kind; ~60 KB per term shard at 1,000,000 concepts


def _fail(where: str, msg: str) -> None:
    raise IntegrityError(f"{where}: {msg}")


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
    for k, v in list(summary.items()):
        if k not in SUMMARY_FIELDS:
            # A newer pfx's display field: dropped unread (the summary only decorates search results;
            # resolution never reads it), so adding one does not lock older readers out of a registry.
            del summary[k]
        elif k == "tags":
            if not isinstance(v, list) or len(v) > 32 or not all(isinstance(x, str) and len(x) <= 32 for x in v):
                _fail(where, "summary.tags must be a short list of short strings")
        elif k == "signers":
            if not isinstance(v, list) or len(v) > 16 or not all(
                    isinstance(x, str) and re.fullmatch(r"[0-9a-f]{32}", x) for x in v):
                _fail(where, "summary.signers must be a short list of key ids (32 hex)")
        elif k == "permissions":
            if not isinstance(v, dict) or set(v) - set(PERMISSION_FLAGS) or not all(
                    isinstance(x, bool) for x in v.values()):
                _fail(where, f"summary.permissions must map {', '.join(PERMISSION_FLAGS)} to booleans")
        elif k == "preview":
            if not is_digest(v):
                _fail(where, "summary.preview must be a sha256 digest")
        elif not isinstance(v, str) or len(v) > MAX_SUMMARY_TEXT:
            _fail(where, f"summary.{k} must be a string of at most {MAX_SUMMARY_TEXT} characters")
    return PackageDoc(raw["name"], versions, tags, summary)


def summary_of(m: Manifest, signers: list[str] | tuple = ()) -> dict[str, Any]:
    """What a search result (and a search filter) needs without fetching the manifest. `signers`: the key
    ids whose signatures were published with this version."""
    card = m.card
    out = {
        "version": m.version, "description": m.description[:MAX_SUMMARY_TEXT], "trigger": m.trigger[:MAX_SUMMARY_TEXT],
        "superclass": m.superclass[:MAX_SUMMARY_TEXT], "tags": list(m.tags)[:32], "license": m.license[:MAX_SUMMARY_TEXT],
        "base": m.base_digest, "title": card["title"][:MAX_SUMMARY_TEXT], "base_name": m.base_name[:MAX_SUMMARY_TEXT],
        "base_family": card["base_family"][:MAX_SUMMARY_TEXT], "permissions": dict(card["permissions"]),
        "signers": sorted(set(signers))[:16],
    }
    if m.previews:
        out["preview"] = m.previews[0]["digest"]
    return out


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


# --------------------------------------------------------------------------------------------------
# Search shards (built by registry.compact, read by registry.search)
#   search/terms/<hhh>.json   {"schema", "shard", "terms": {term: [package names]}}   hhh = sha256(term)[:3]
#   search/pkgs/<hhh>.json    {"schema", "shard", "packages": {name: [terms indexed]}}  hhh = sha256(name)[:3]


def _h(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:SHARD_HEX]


def term_shard_key(term: str) -> str:
    return f"search/terms/{_h(term)}.json"


def pkg_shard_key(name: str) -> str:
    return f"search/pkgs/{_h(name)}.json"


def parse_shard(data: bytes, key: str, schema: str, field: str) -> dict[str, list[str]]:
    """The body of a search shard found at `key`, checked: schema, shard id, and every entry hashing to it."""
    raw = strict_json(data, f"search shard {key}", MAX_SHARD_BYTES)
    shard = key.rsplit("/", 1)[1].removesuffix(".json")
    if not isinstance(raw, dict) or raw.get("schema") != schema or raw.get("shard") != shard:
        raise IntegrityError(f"search shard {key}: wrong schema or shard id")
    body = raw.get(field)
    if not isinstance(body, dict) or not all(isinstance(v, list) and all(isinstance(x, str) for x in v)
                                             for v in body.values()):
        raise IntegrityError(f"search shard {key}: {field} must map strings to lists of strings")
    bad = [k for k in body if _h(k) != shard]
    if bad:
        raise IntegrityError(f"search shard {key}: {bad[0]!r} does not belong in this shard")
    return body
