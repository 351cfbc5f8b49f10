"""Searching a remote without downloading its catalogue: AND over hashed term shards (built by
`registry.compact`), plus a direct lookup of an exact package name."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

from registry.documents import MAX_SHARD_BYTES, TERMS_SCHEMA, PackageDoc, parse_shard, term_shard_key
from registry.errors import NotFound, PfxError
from registry.names import validate_name
from registry.remotes.base import Remote
from registry.resolve import fetch_package_doc

_TOKEN = re.compile(r"[a-z0-9]+")
STOPWORDS = frozenset({"a", "an", "the", "of", "and", "or", "in", "on", "with", "for", "to", "photo"})


def tokenize(text: str) -> set[str]:
    return {t for t in _TOKEN.findall(text.lower()) if len(t) > 1 and t not in STOPWORDS}


def terms_of(pkg: PackageDoc) -> set[str]:
    s = pkg.summary
    text = " ".join([pkg.name, s.get("description", ""), s.get("trigger", ""), s.get("superclass", ""),
                     " ".join(s.get("tags", []))])
    return tokenize(text) | {pkg.name}


def read_term_shard(remote: Remote, key: str) -> dict[str, list[str]]:
    """Postings of one term shard ({} if none yet). Used by search: one GET per query term."""
    doc = remote.get_doc(key, max_bytes=MAX_SHARD_BYTES)
    return {} if doc is None else parse_shard(doc.data, key, TERMS_SCHEMA, "terms")


MAX_FILTERED_CANDIDATES = 500


def search_remote(remote: Remote, query: str, limit: int = 20, **filters) -> list[dict]:
    """AND-search over term postings: one GET per query term, then one GET per shown result.

    An exact package name is also looked up directly, so a package is findable by name the moment
    it is published, before any compaction. `filters` are registry.cards.FILTER_KEYS (None = any),
    checked against each package's summary (its latest version's card); with filters, up to
    MAX_FILTERED_CANDIDATES term matches are read (one package-doc GET each, in parallel) to fill
    `limit`, and a superclass filter also serves as a query term."""
    from registry.cards import matches

    filters = {k: v for k, v in filters.items() if v is not None}
    if filters.get("superclass"):
        query = f"{query} {filters['superclass']}"
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
    found = found[: max(limit, 0) if not filters else MAX_FILTERED_CANDIDATES]
    if not found:
        return []

    def one(name: str) -> dict | None:
        try:
            pkg, _ = fetch_package_doc(remote, name)  # no SQLite handle across threads
        except NotFound:
            return None
        if pkg is None or not pkg.versions:
            return None
        if filters and not matches(pkg.summary, pkg.summary.get("superclass"), filters):
            return None
        return {"name": pkg.name, "remote": remote.name, **pkg.summary,
                "versions": len(pkg.versions), "dist_tags": pkg.tags}

    with ThreadPoolExecutor(max_workers=min(8, len(found))) as ex:
        return [r for r in ex.map(one, found) if r is not None][: max(limit, 0)]
