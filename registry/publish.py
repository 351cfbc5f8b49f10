"""Publishing to a remote, and the two index edits (yank, tag), all crash-safe and lock-free.

Order of writes for `publish` (each step is safe to crash after, and safe to repeat):

1. immutable blobs (concept, previews, covariance companion), then the manifest, then the detached
   signature `sigs/sha256/<ab>/<hex>/<keyid>.sig` when the publisher signs (registry/signing.py),
   each with If-None-Match: * (an existing object of the right size is accepted: content-addressed;
   ed25519 signatures are deterministic, so a re-run writes the same bytes). The signature exists
   before the claim, so no reader can see a signed version without its signature;
2. a journal event `journal/<ms>-<random>.json` (unique key, never contended) so the compactor can
   find this publish, and repair the index if we crash before step 4;
3. the claim `claims/<ab>/<sha256(name)>/<version>.json` with If-None-Match: * - the linearization
   point. First writer wins; a loser whose claim names another manifest gets VersionExists; a
   claim that already names *our* manifest means a previous run of this publish crashed later on,
   and we simply carry on (resume);
4. the package document, by compare-and-swap on its ETag with jittered retry. Only publishers of
   the same package contend there; the edit is idempotent, so a lost response is harmless.

Installs by exact version work from step 3 on (resolve falls back to the claim).

No half-published version outlives a failure between steps 3 and 4: a rerun of the publish resumes
it; the home remembers the publish until step 4 is done, so the next publish, yank, tag or compact
from that home to that remote completes it first; `pfx registry compact` completes it from the
journal event from any home; and yank/tag of that exact version list it from its claim.

Before any write, `registry.capabilities.prepare_writes` applies the remote's probed capabilities
(the If-Match ETag spelling; refusal or --single-writer mode where a conditional write is missing).
"""

from __future__ import annotations

import json
import random
import secrets
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from registry.capabilities import CAPS_KEY, prepare_writes, probe, record_probe, recorded_probe
from registry.documents import MAX_PACKAGE_BYTES, PackageDoc, make_claim, parse_package_doc, summary_of
from registry.errors import (
    Conflict,
    IntegrityError,
    NotFound,
    OfflineError,
    PfxError,
    RemoteError,
    UsageError,
    VersionExists,
)
from registry.manifest import Manifest, canonical_json
from registry.names import parse_ref, validate_tag
from registry.remotes import open_remote
from registry.remotes.base import (
    CONFIG_KEY,
    CasFailed,
    Remote,
    blob_key,
    claim_key,
    manifest_key,
    package_key,
)
from registry.resolve import fetch_manifest, fetch_package, read_claim, reread_torn
from registry.signing import choose_signer, sig_key
from registry.versions import parse_version

CAS_ATTEMPTS = 40
UNFINISHED = "unfinished-publish:"  # home kv, per remote: a publish whose index update is not done yet
UNFINISHED_GRACE_S = 3600  # an unclaimed record this young may be a publish still running in another process
REGISTRY_CONFIG = {"format": "pfx-registry", "layout": 1, "search_shard_hex": 3}
ADD_REMOTE_HINT = "pfx remote add NAME s3://bucket/prefix --default"


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --------------------------------------------------------------------------------------------------
# Choosing and checking the target


def target_remote(home: Any, to: str | None, **options) -> Remote:
    """The remote named `to`, else the user's default; never the read-only sample."""
    if to:
        row = home.get_remote(to)
        if row is None:
            raise NotFound(f"no remote named {to!r}", hint="see `pfx remote list`, or " + ADD_REMOTE_HINT)
    else:
        row = home.default_remote()
        if row is None:
            raise UsageError("no default remote to publish to", hint=f"add one: {ADD_REMOTE_HINT}")
    if home.offline and not str(row["url"]).startswith("file://"):
        raise OfflineError(f"offline: cannot publish to remote '{row['name']}' ({row['url']})",
                           hint="unset PFX_OFFLINE / drop --offline")
    remote = open_remote(row, offline=home.offline, **options)
    remote.check_writable()
    return remote


def ensure_publishable(home: Any, remote: Remote, action: str = "publish") -> list[str]:
    """Apply the remote's probed capabilities before a write (probing it now if it never was); refuse
    a store without conditional writes unless the remote is in single-writer mode. Returns warnings."""
    return prepare_writes(home, remote, action)


__all__ = ["CAPS_KEY", "ensure_publishable", "probe", "record_probe", "recorded_probe"]


# --------------------------------------------------------------------------------------------------
# Primitive writes


def put_immutable(remote: Remote, key: str, data: bytes) -> bool:
    """Create a content-addressed object. True if we wrote it; False if it was there already (its
    size is checked; its bytes are verified by every reader anyway)."""
    if remote.put_if_absent(key, data):
        return True
    size = remote.head_size(key)
    if size is not None and size != len(data):
        raise IntegrityError(
            f"{key} on {remote.describe()} has {size} bytes, expected {len(data)}: the remote object is corrupt",
            hint="an administrator must delete it; content-addressed objects are never overwritten",
        )
    return False


def update_package(remote: Remote, name: str, mutate: Callable[[PackageDoc], bool]) -> PackageDoc:
    """Read-modify-write of a package document by compare-and-swap, retried with jitter.

    `mutate` edits the doc in place and returns False when there is nothing to do (then nothing is
    written), which makes every caller idempotent: a retry after a lost response finds its own edit."""
    key = package_key(name)

    def read() -> tuple[Any, PackageDoc]:
        doc = remote.get_doc(key, max_bytes=MAX_PACKAGE_BYTES)
        return doc, parse_package_doc(doc.data, expect_name=name) if doc else PackageDoc(name)

    for attempt in range(CAS_ATTEMPTS):
        doc, pkg = reread_torn(read)
        if not mutate(pkg):
            return pkg
        try:
            remote.put_doc(key, pkg.to_bytes(), etag=doc.etag if doc else None)
            return pkg
        except CasFailed:
            time.sleep(random.uniform(0, min(1.0, 0.01 * 2 ** min(attempt, 7))))
    raise Conflict(f"could not update the index of {name} on {remote.describe()} after {CAS_ATTEMPTS} tries: "
                   "it changed between every read and write",
                   hint="others are editing this concept at once: retry (a rerun completes this edit); if nobody "
                        f"else is, re-probe the store: pfx remote probe {remote.name}")


def _highest_release(pkg: PackageDoc) -> str | None:
    best = None
    for v, e in pkg.versions.items():
        pv = parse_version(v)
        if e["yanked"] or pv.is_prerelease:
            continue
        if best is None or pv > parse_version(best):
            best = v
    return best


def add_version(pkg: PackageDoc, m: Manifest, *, move_latest: bool = True, published: str | None = None,
                signers: list[str] | tuple = ()) -> bool:
    """The publish edit: list the version (as its claim says), move `latest` if it is a higher
    release, refresh the summary when `latest` moved. `signers`: key ids of the signatures published
    with it (kept in the summary, merged with those already listed for the same version). Returns
    whether anything changed."""
    changed = False
    entry = pkg.versions.get(m.version)
    if entry is None or entry["manifest"] != m.digest:
        pkg.versions[m.version] = {"manifest": m.digest, "yanked": False, "published": published or now_iso()}
        changed = True
    v = parse_version(m.version)
    cur = pkg.tags.get("latest")
    if move_latest and not v.is_prerelease and (cur is None or v > parse_version(cur)):
        pkg.tags["latest"] = m.version
        changed = True
    want_summary = pkg.tags.get("latest") == m.version or not pkg.summary
    if pkg.summary.get("version") == m.version:
        signers = sorted(set(signers) | set(pkg.summary.get("signers", [])))
    if want_summary and pkg.summary != summary_of(m, signers):
        pkg.summary = summary_of(m, signers)
        changed = True
    return changed


def journal_key() -> str:
    return f"journal/{int(time.time() * 1000):013d}-{secrets.token_hex(4)}.json"


def write_event(remote: Remote, name: str, version: str, manifest_digest: str, kind: str = "publish") -> None:
    event = canonical_json({"schema": "pfx.event/1", "kind": kind, "name": name, "version": version,
                            "manifest": manifest_digest, "time": now_iso()})
    remote.put_if_absent(journal_key(), event)


# --------------------------------------------------------------------------------------------------
# publish


def publish_manifest(remote: Remote, m: Manifest, read_blob: Callable[[str], bytes], *,
                     move_latest: bool = True, progress: Callable[[int], None] | None = None,
                     signatures: list[tuple[str, bytes]] = ()) -> dict:
    """Publish one version whose bytes `read_blob(digest)` returns (verified). Usable by anything
    that writes a registry (the CLI, bundle export, the sample-registry builder). `signatures` are
    (keyid, signature document) pairs written beside the manifest (registry/signing.py)."""
    remote.check_writable()
    # Identical bytes from every publisher, so even a store that ignores If-None-Match is harmless here.
    remote.put_if_absent(CONFIG_KEY, canonical_json(REGISTRY_CONFIG))
    uploaded = 0
    for b in m.blobs():
        data = read_blob(b["digest"])
        if len(data) != b["size"]:
            raise IntegrityError(f"local blob {b['digest']} has {len(data)} bytes, the manifest says {b['size']}")
        uploaded += put_immutable(remote, blob_key(b["digest"]), data)
        if progress:
            progress(len(data))
    put_immutable(remote, manifest_key(m.digest), m.data)
    for keyid, doc in signatures:
        put_immutable(remote, sig_key(m.digest, keyid), doc)
    write_event(remote, m.name, m.version, m.digest)
    claim = make_claim(m.name, m.version, m.digest, now_iso())
    resumed = False
    # Single-writer mode on a store that ignores If-None-Match: put_if_absent checks, then writes.
    if not remote.put_if_absent(claim_key(m.name, m.version), claim):
        existing = read_claim(remote, m.name, m.version)
        if existing is None:
            raise RemoteError(f"claim for {m.ref()} on {remote.describe()} vanished after a conflict")
        if existing["manifest"] != m.digest:
            raise VersionExists(
                f"{m.ref()} already exists on {remote.describe()} (manifest {existing['manifest'][:19]}...)",
                hint="versions are immutable: publish a new version (e.g. `pfx train --version`)",
            )
        resumed = True
    signers = [k for k, _ in signatures]
    pkg = update_package(remote, m.name, lambda p: add_version(p, m, move_latest=move_latest, signers=signers))
    return {"name": m.name, "version": m.version, "manifest": m.digest, "remote": remote.name,
            "resumed": resumed, "blobs_uploaded": uploaded, "tags": dict(pkg.tags),
            "signed_by": [k for k, _ in signatures]}


def publish(home: Any, ref_text: str, *, to: str | None = None, move_latest: bool = True,
            progress: Callable[[int], None] | None = None, sign: bool | None = None, key: str | None = None,
            **options) -> dict:
    """Publish an installed (or locally trained) `name[@version]` to a remote, signed with `key` or the
    default signing key if there is one (`sign=False` never signs; `sign=True` requires a key).
    Re-publishing a published version with a key adds that key's signature (a resumed publish)."""
    ref = parse_ref(ref_text)
    if ref.kind not in ("default", "version", "digest"):
        raise UsageError(f"publish takes NAME or NAME@VERSION, not {ref_text!r}")
    row = home.find_installed(ref)
    if row is None:
        raise NotFound(f"{ref_text} is not in the local store", hint="train it first, or `pfx install` it")
    m = home.manifest(row["manifest"])
    signer = choose_signer(home, sign=sign, key=key)  # before any network: a bad key fails fast
    remote, warnings, completed = writable_remote(home, to, "publish", **options)
    sigs = [(signer.keyid, signer.sign(m.digest))] if signer else []
    remember_unfinished(home, remote, m, move_latest)
    try:
        res = publish_manifest(remote, m, home.store.read_bytes, move_latest=move_latest, progress=progress,
                               signatures=sigs)
    except VersionExists:  # another publisher's version: nothing of ours to complete later
        forget_unfinished(home, remote, m.ref())
        raise
    forget_unfinished(home, remote, m.ref())
    if sigs:  # keep our own signature locally too, so `pfx verify` and bundles can use it
        with home.index.write() as c:
            home.index.insert_signatures(c, m.digest, sigs)
    return {**res, "warnings": warnings, "completed": completed}


# --------------------------------------------------------------------------------------------------
# Writable remotes, and publishes a failure left unlisted


def writable_remote(home: Any, name: str | None, action: str, **options) -> tuple[Remote, list[str], list[str]]:
    """The remote to write to, ready for writes: (remote, warnings to show, refs completed).

    Probes it if it never was (registry/capabilities.py), refuses a store without conditional writes
    unless in single-writer mode, then completes this home's publishes that a failure left unlisted."""
    remote = target_remote(home, name, **options)
    warnings = ensure_publishable(home, remote, action)
    return remote, warnings, complete_unfinished(home, remote)


def remember_unfinished(home: Any, remote: Remote, m: Manifest, move_latest: bool) -> None:
    home.kv_set(UNFINISHED + m.ref(), {"manifest": m.digest, "move_latest": move_latest}, None, remote=remote.name)


def forget_unfinished(home: Any, remote: Remote, ref: str) -> None:
    home.kv_delete(UNFINISHED + ref, remote=remote.name)


def complete_unfinished(home: Any, remote: Remote) -> list[str]:
    """List the versions this home claimed on `remote` whose index update a failure (crash, network,
    lost CAS) cut off; drop records of publishes that never reached their claim. Returns the refs listed.
    A failure here leaves the records for next time: it never fails the command that called it."""
    rows = home.index.conn.execute("SELECT key, body, fetched_at FROM remote_cache WHERE remote = ? AND key LIKE ?",
                                   (remote.name, UNFINISHED + "%")).fetchall()
    by_name: dict[str, list[tuple[str, Manifest, bool]]] = defaultdict(list)
    for key, body, since in rows:
        ref = key[len(UNFINISHED):]
        try:
            rec = json.loads(body)
            m = home.manifest(rec["manifest"])
            claim = read_claim(remote, m.name, m.version)
        except (PfxError, ValueError, KeyError, TypeError, OSError):
            continue
        if claim is None or claim["manifest"] != m.digest:  # never claimed (or not by us): nothing to list
            if claim is not None or time.time() - float(since or 0) > UNFINISHED_GRACE_S:  # (or still on its way)
                forget_unfinished(home, remote, ref)
            continue
        by_name[m.name].append((ref, m, bool(rec.get("move_latest", True))))
    done: list[str] = []
    for name, items in by_name.items():
        added: list[str] = []

        def mutate(pkg: PackageDoc, items=items, added=added) -> bool:
            added.clear()  # called again after a lost swap: count the last (written) edit only
            for ref, m, move in items:
                if m.version not in pkg.versions:
                    add_version(pkg, m, move_latest=move)
                    added.append(ref)
            return bool(added)

        try:
            update_package(remote, name, mutate)
        except PfxError:
            continue
        for ref, _, _ in items:
            forget_unfinished(home, remote, ref)
        done += added
    return done


# --------------------------------------------------------------------------------------------------
# yank and tag


def _claimed_unlisted(remote: Remote, ref: Any, pkg: PackageDoc | None) -> Manifest | None:
    """An exact version with a claim but not in the index (a publish cut off before its index update):
    its manifest, so the edit can list it first."""
    if ref.kind != "version" or (pkg is not None and ref.selector in pkg.versions):
        return None
    claim = read_claim(remote, ref.name, ref.selector)
    if claim is None:
        return None
    return fetch_manifest(remote, claim["manifest"], expect_name=ref.name, expect_version=ref.selector)


def yank(home: Any, ref_text: str, *, remote_name: str | None = None, undo: bool = False, **options) -> dict:
    """Mark a version yanked (or not): still installable exactly or by digest, never by range/tag.
    If `latest` pointed at it, `latest` falls back to the highest remaining release."""
    ref = parse_ref(ref_text)
    if ref.kind not in ("version", "digest"):
        raise UsageError(f"yank needs an exact version or digest, e.g. {ref.name}@1.2.0")
    remote, warnings, completed = writable_remote(home, remote_name, "yank", **options)
    found: dict = {}
    current = fetch_package(remote, ref.name)
    unlisted = _claimed_unlisted(remote, ref, current)
    if current is None and unlisted is None:
        raise NotFound(f"{ref.name} is not on {remote.describe()}")

    def mutate(pkg: PackageDoc) -> bool:
        changed = bool(unlisted) and unlisted.version not in pkg.versions and add_version(pkg, unlisted)
        hit = next((v for v, e in pkg.versions.items()
                    if (ref.kind == "version" and v == ref.selector) or e["manifest"] == ref.selector), None)
        if hit is None:
            raise NotFound(f"{ref_text} is not listed on {remote.describe()}")
        found["version"] = hit
        changed |= pkg.versions[hit]["yanked"] != (not undo)
        pkg.versions[hit]["yanked"] = not undo
        if not undo and pkg.tags.get("latest") == hit:
            nxt = _highest_release(pkg)
            if nxt is None:
                pkg.tags.pop("latest")
            else:
                pkg.tags["latest"] = nxt
            changed = True
        elif undo:
            best = _highest_release(pkg)
            if best and (pkg.tags.get("latest") is None or parse_version(best) > parse_version(pkg.tags["latest"])):
                pkg.tags["latest"] = best
                changed = True
        return changed

    pkg = update_package(remote, ref.name, mutate)
    return {"name": ref.name, "version": found.get("version"), "yanked": not undo, "remote": remote.name,
            "tags": dict(pkg.tags), "warnings": warnings, "completed": completed}


def tag(home: Any, ref_text: str, tag_name: str, *, remote_name: str | None = None, **options) -> dict:
    """Point `tag_name` at the version `ref_text` selects (never a yanked one)."""
    validate_tag(tag_name)
    ref = parse_ref(ref_text)
    remote, warnings, completed = writable_remote(home, remote_name, "tag", **options)
    found: dict = {}
    current = fetch_package(remote, ref.name)
    unlisted = _claimed_unlisted(remote, ref, current)
    if current is None and unlisted is None:
        raise NotFound(f"{ref.name} is not on {remote.describe()}")

    def mutate(pkg: PackageDoc) -> bool:
        changed = bool(unlisted) and unlisted.version not in pkg.versions and add_version(pkg, unlisted)
        entry = pkg.select(ref)
        if entry.get("yanked"):
            raise UsageError(f"{ref.name}@{entry['version']} is yanked and cannot be tagged")
        found["version"] = entry["version"]
        if pkg.tags.get(tag_name) == entry["version"]:
            return changed
        pkg.tags[tag_name] = entry["version"]
        return True

    pkg = update_package(remote, ref.name, mutate)
    return {"name": ref.name, "tag": tag_name, "version": found["version"], "remote": remote.name,
            "tags": dict(pkg.tags), "warnings": warnings, "completed": completed}
