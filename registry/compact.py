"""Compaction: fold recent publishes into the search shards, repair the index, rebuild from claims.

Why a separate step: the package documents are the source of truth for resolution and are updated
per package, so publishers of different concepts never contend. Search needs the other direction
(term -> packages), which would put every publisher on a few shared objects. So publishers only
drop a uniquely keyed journal event, and `pfx registry compact` (a cron job, CI step, or a human)
folds the events since its last mark into hash-sharded posting lists:

    search/terms/<hhh>.json   {"schema", "shard", "terms": {term: [package names]}}   hhh = sha256(term)[:3]
    search/pkgs/<hhh>.json    {"schema", "shard", "packages": {name: [terms indexed]}}  hhh = sha256(name)[:3]
    search/state.json         {"schema", "mark", "updated", "events"}  (journal position, CAS-updated)

Every shard is updated by compare-and-swap, so two compactors racing only redo each other's work
(the fold is idempotent), and a crashed compactor leaves shards that are merely a little stale. The
journal is read with LIST StartAfter=<mark - skew window>, so the cost is proportional to new
events, and a publisher whose clock lagged by less than the window is not missed.

The compactor also repairs the index: for each event whose claim names the event's manifest but
whose package document lacks the version (a publisher crashed between claim and index update), the
version is added. `rebuild=True` goes further and rebuilds every package document from the claims
(admin only: it LISTs `claims/`).
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from registry.documents import (
    MAX_SHARD_BYTES,
    PKGS_SCHEMA,
    TERMS_SCHEMA,
    PackageDoc,
    parse_claim,
    parse_shard,
    pkg_shard_key,
    term_shard_key,
)
from registry.errors import Conflict, IntegrityError, NotFound, PfxError
from registry.manifest import canonical_json, strict_json
from registry.publish import add_version, update_package
from registry.remotes.base import CasFailed, KeyMissing, Remote, claim_key
from registry.resolve import fetch_manifest, fetch_package_doc, read_claim, reread_torn
from registry.search import terms_of

MAX_EVENT_BYTES = 4 << 10
MAX_STATE_BYTES = 4 << 10
SKEW_MS = 5 * 60 * 1000
JOURNAL_KEEP_MS = 24 * 3600 * 1000
STATE_KEY = "search/state.json"
STATE_SCHEMA = "pfx.compact/1"


def _read_shard(remote: Remote, key: str, schema: str, field: str) -> tuple[dict, str | None]:
    def once() -> tuple[dict, str | None]:
        doc = remote.get_doc(key, max_bytes=MAX_SHARD_BYTES)
        return ({}, None) if doc is None else (parse_shard(doc.data, key, schema, field), doc.etag)

    return reread_torn(once)


def _cas_shard(remote: Remote, key: str, schema: str, field: str, edit: Callable[[dict], bool]) -> None:
    shard = key.rsplit("/", 1)[1].removesuffix(".json")
    for attempt in range(30):
        body, etag = _read_shard(remote, key, schema, field)
        if not edit(body):
            return
        data = canonical_json({"schema": schema, "shard": shard, field: body})
        try:
            remote.put_doc(key, data, etag=etag)
            return
        except CasFailed:
            time.sleep(random.uniform(0, min(1.0, 0.01 * 2 ** min(attempt, 7))))
    raise Conflict(f"search shard {key} kept changing under the compactor; retry")


def _read_state(remote: Remote) -> tuple[dict, str | None]:
    doc, raw = reread_torn(lambda: _read_state_once(remote))
    if doc is None:
        return {"schema": STATE_SCHEMA, "mark": 0, "events": 0, "updated": ""}, None
    if not isinstance(raw, dict) or raw.get("schema") != STATE_SCHEMA or not isinstance(raw.get("mark"), int):
        raise IntegrityError(f"{STATE_KEY}: not a compaction state document")
    return raw, doc.etag


def _read_state_once(remote: Remote) -> tuple[Any, Any]:
    doc = remote.get_doc(STATE_KEY, max_bytes=MAX_STATE_BYTES)
    return (None, None) if doc is None else (doc, strict_json(doc.data, STATE_KEY, MAX_STATE_BYTES))


def _event_ms(key: str) -> int | None:
    stem = key.removeprefix("journal/").split("-", 1)[0]
    return int(stem) if stem.isdigit() and len(stem) == 13 else None


def _read_event(remote: Remote, key: str) -> dict | None:
    try:
        raw = strict_json(remote.get(key, max_bytes=MAX_EVENT_BYTES), key, MAX_EVENT_BYTES)
    except (KeyMissing, IntegrityError):
        return None  # a malformed or vanished event is skipped, never trusted
    if not isinstance(raw, dict) or raw.get("schema") != "pfx.event/1":
        return None
    if not all(isinstance(raw.get(k), str) for k in ("name", "version", "manifest")):
        return None
    return raw


def _ensure_versions(remote: Remote, name: str, found: dict[str, str]) -> int:
    """Add versions {version: manifest} that have a claim naming that manifest but are not listed."""

    pkg, _ = fetch_package_doc(remote, name)
    missing = {v: d for v, d in found.items() if pkg is None or v not in pkg.versions}
    manifests = []
    for v, d in missing.items():
        claim = read_claim(remote, name, v)
        if claim is None or claim["manifest"] != d:
            continue  # a publisher that lost the claim, or one still on its way: not ours to list
        manifests.append(fetch_manifest(remote, d, expect_name=name, expect_version=v))
    if not manifests:
        return 0

    def mutate(p: PackageDoc) -> bool:
        changed = False
        for m in manifests:
            changed |= add_version(p, m)
        return changed

    update_package(remote, name, mutate)
    return len(manifests)


def _index_terms(remote: Remote, names: set[str]) -> int:
    """Refresh term postings for `names` from their current package documents."""
    new_terms: dict[str, set[str]] = {}
    for n in sorted(names):
        try:
            pkg, _ = fetch_package_doc(remote, n)
        except PfxError:
            continue
        new_terms[n] = terms_of(pkg) if pkg and any(not e["yanked"] for e in pkg.versions.values()) else set()
    by_pkg_shard: dict[str, list[str]] = defaultdict(list)
    for n in new_terms:
        by_pkg_shard[pkg_shard_key(n)].append(n)
    adds: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    removes: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for key, group in by_pkg_shard.items():
        old: dict[str, list[str]] = {}

        def edit(body: dict, group=group, old=old) -> bool:
            changed = False
            for n in group:
                old[n] = list(body.get(n, []))
                want = sorted(new_terms[n])
                if want and body.get(n) != want:
                    body[n] = want
                    changed = True
                elif not want and n in body:
                    del body[n]
                    changed = True
            return changed

        _cas_shard(remote, key, PKGS_SCHEMA, "packages", edit)
        for n in group:
            for t in new_terms[n] - set(old.get(n, [])):
                adds[term_shard_key(t)][t].add(n)
            for t in set(old.get(n, [])) - new_terms[n]:
                removes[term_shard_key(t)][t].add(n)
    # Re-assert current postings too: a crash after the pkgs shard but before the term shard is healed.
    for n, ts in new_terms.items():
        for t in ts:
            adds[term_shard_key(t)][t].add(n)
    for key in set(adds) | set(removes):
        a, r = adds.get(key, {}), removes.get(key, {})

        def edit_terms(body: dict, a=a, r=r) -> bool:
            changed = False
            for t in set(a) | set(r):
                cur = set(body.get(t, []))
                want = (cur | a.get(t, set())) - r.get(t, set())
                if want != cur:
                    changed = True
                    if want:
                        body[t] = sorted(want)
                    else:
                        body.pop(t, None)
            return changed

        _cas_shard(remote, key, TERMS_SCHEMA, "terms", edit_terms)
    return len(new_terms)


def rebuild_from_claims(remote: Remote) -> dict[str, dict[str, str]]:
    """Every claimed version, read from `claims/` (LIST; admin only): {name: {version: manifest}}."""
    out: dict[str, dict[str, str]] = defaultdict(dict)
    for key in remote.list_keys("claims/"):
        try:
            data = remote.get(key, max_bytes=4 << 10)
            raw = strict_json(data, key, 4 << 10)
            name, version = raw["name"], raw["version"]
            if claim_key(name, version) != key:
                continue  # a claim that disagrees with where it was found is ignored
            parse_claim(data, expect_name=name, expect_version=version)
        except (PfxError, KeyError, TypeError):
            continue
        out[name][version] = raw["manifest"]
    return dict(out)


def compact(remote: Remote, *, rebuild: bool = False, now_ms: int | None = None) -> dict[str, Any]:
    """Fold journal events since the last mark into the search shards; repair lagging indexes.
    With `rebuild`, re-derive every package document from the claims first."""
    remote.check_writable()
    state, etag = _read_state(remote)
    stats = {"events": 0, "packages": 0, "repaired": 0, "rebuilt": rebuild, "journal_pruned": 0}
    found: dict[str, dict[str, str]] = defaultdict(dict)
    if rebuild:
        found.update(rebuild_from_claims(remote))
    start_ms = max(0, int(state["mark"]) - SKEW_MS)
    start_after = f"journal/{start_ms:013d}" if state["mark"] else None
    mark = int(state["mark"])
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    for key in remote.list_keys("journal/", start_after=start_after):
        ms = _event_ms(key)
        if ms is None:
            continue
        ev = _read_event(remote, key)
        if ev is None:
            continue
        stats["events"] += 1
        found[ev["name"]].setdefault(ev["version"], ev["manifest"])
        mark = max(mark, min(ms, now_ms))
    for name, versions in found.items():
        try:
            stats["repaired"] += _ensure_versions(remote, name, versions)
        except (NotFound, IntegrityError):
            continue
    stats["packages"] = _index_terms(remote, set(found))
    new_state = {"schema": STATE_SCHEMA, "mark": mark, "events": int(state.get("events", 0)) + stats["events"],
                 "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        remote.put_doc(STATE_KEY, canonical_json(new_state), etag=etag)
    except CasFailed:
        pass  # another compactor moved the mark; our folds are idempotent and already written
    # Old events are no longer needed once well behind the mark (they are only search hints).
    for key in remote.list_keys("journal/"):
        ms = _event_ms(key)
        if ms is None or ms >= mark - JOURNAL_KEEP_MS:
            break
        remote.delete(key)
        stats["journal_pruned"] += 1
    stats["mark"] = mark
    # A registry with a static catalogue (`pfx registry site`) gets it rewritten: yanks and tags change
    # package documents without journal events, so it is rebuilt on every compaction.
    from registry.site import build_site, has_site

    if has_site(remote):
        stats["site"] = build_site(remote)
    return stats
