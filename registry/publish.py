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
"""

from __future__ import annotations

import random
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

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
from registry.resolve import fetch_package, read_claim
from registry.signing import choose_signer, sig_key
from registry.versions import parse_version

CAS_ATTEMPTS = 40
CAPS_KEY = "remote-caps:{url}"
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


def probe(remote: Remote) -> dict:
    """Does the store honour conditional writes? Checks, on throwaway keys under `probe/`:
    a second If-None-Match: * create must fail, and a swap with a stale ETag must fail. Stores that
    silently ignore these headers would let two publishers overwrite each other's claims and index."""
    tok = secrets.token_hex(8)
    k1, k2 = f"probe/{tok}-create", f"probe/{tok}-cas.json"
    out = {"conditional_create": False, "compare_and_swap": False, "error": None}
    try:
        first = remote.put_if_absent(k1, b"probe-1")
        second = remote.put_if_absent(k1, b"probe-2")
        out["conditional_create"] = bool(first) and not second
        e1 = remote.put_doc(k2, b'{"n":1}', etag=None)
        remote.put_doc(k2, b'{"n":2}', etag=e1)
        try:
            remote.put_doc(k2, b'{"n":3}', etag=e1)
            stale_won = True
        except CasFailed:
            stale_won = False
        doc = remote.get_doc(k2, max_bytes=64)
        out["compare_and_swap"] = not stale_won and doc is not None and doc.data == b'{"n":2}'
    except PfxError as e:
        out["error"] = str(e).splitlines()[0]
    except Exception as e:  # noqa: BLE001 - e.g. 501 NotImplemented for conditional headers
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        for k in (k1, k2):
            try:
                remote.delete(k)
            except Exception:  # noqa: BLE001, S110 - best effort cleanup
                pass
    out["ok"] = out["conditional_create"] and out["compare_and_swap"]
    return out


def record_probe(home: Any, remote: Remote, result: dict) -> None:
    """Kept in the home's remote cache under the remote's name (dropped by `pfx remote remove`)."""
    home.kv_set(CAPS_KEY.format(url=remote.url), result, None, remote=remote.name)


def recorded_probe(home: Any, remote: Remote) -> dict | None:
    got = home.kv_get(CAPS_KEY.format(url=remote.url), remote=remote.name)
    return got["value"] if got and isinstance(got.get("value"), dict) else None


def ensure_publishable(home: Any, remote: Remote) -> None:
    """Refuse a remote whose probe failed, unless it was added in single-writer mode. A remote
    configured without `pfx remote add` (never probed) is probed now, once."""
    if remote.single_writer:
        return
    result = recorded_probe(home, remote)
    if result is None:
        result = probe(remote)
        record_probe(home, remote, result)
    if not result.get("ok"):
        raise RemoteError(
            f"remote '{remote.name}' ignores conditional writes (If-None-Match / If-Match); concurrent "
            "publishers there could overwrite each other, so pfx will not publish to it",
            hint=f"if you are its only publisher: pfx remote add {remote.name} {remote.url} --single-writer",
        )


# --------------------------------------------------------------------------------------------------
# Primitive writes


def put_immutable(remote: Remote, key: str, data: bytes) -> bool:
    """Create a content-addressed object. True if we wrote it; False if it was there already (its
    size is checked; its bytes are verified by every reader anyway)."""
    if remote.single_writer:
        size = remote.head_size(key)
        if size is None:
            remote.put_if_absent(key, data)
            return True
    elif remote.put_if_absent(key, data):
        return True
    else:
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
    for attempt in range(CAS_ATTEMPTS):
        doc = remote.get_doc(key, max_bytes=MAX_PACKAGE_BYTES)
        pkg = parse_package_doc(doc.data, expect_name=name) if doc else PackageDoc(name)
        if not mutate(pkg):
            return pkg
        try:
            remote.put_doc(key, pkg.to_bytes(), etag=doc.etag if doc else None)
            return pkg
        except CasFailed:
            time.sleep(random.uniform(0, min(1.0, 0.01 * 2 ** min(attempt, 7))))
    raise Conflict(f"could not update the index of {name} on {remote.describe()} after {CAS_ATTEMPTS} tries",
                   hint="many publishers are editing this concept at once; retry")


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
    if remote.single_writer:
        existing = read_claim(remote, m.name, m.version)
        created = existing is None and remote.put_if_absent(claim_key(m.name, m.version), claim)
    else:
        existing, created = None, remote.put_if_absent(claim_key(m.name, m.version), claim)
    if not created:
        existing = existing or read_claim(remote, m.name, m.version)
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
    remote = target_remote(home, to, **options)
    ensure_publishable(home, remote)
    sigs = [(signer.keyid, signer.sign(m.digest))] if signer else []
    res = publish_manifest(remote, m, home.store.read_bytes, move_latest=move_latest, progress=progress,
                           signatures=sigs)
    if sigs:  # keep our own signature locally too, so `pfx verify` and bundles can use it
        with home.index.write() as c:
            home.index.insert_signatures(c, m.digest, sigs)
    return res


# --------------------------------------------------------------------------------------------------
# yank and tag


def _index_target(home: Any, remote_name: str | None, **options) -> Remote:
    remote = target_remote(home, remote_name, **options)
    ensure_publishable(home, remote)
    return remote


def yank(home: Any, ref_text: str, *, remote_name: str | None = None, undo: bool = False, **options) -> dict:
    """Mark a version yanked (or not): still installable exactly or by digest, never by range/tag.
    If `latest` pointed at it, `latest` falls back to the highest remaining release."""
    ref = parse_ref(ref_text)
    if ref.kind not in ("version", "digest"):
        raise UsageError(f"yank needs an exact version or digest, e.g. {ref.name}@1.2.0")
    remote = _index_target(home, remote_name, **options)
    found: dict = {}

    def mutate(pkg: PackageDoc) -> bool:
        hit = next((v for v, e in pkg.versions.items()
                    if (ref.kind == "version" and v == ref.selector) or e["manifest"] == ref.selector), None)
        if hit is None:
            raise NotFound(f"{ref_text} is not listed on {remote.describe()}")
        found["version"] = hit
        changed = pkg.versions[hit]["yanked"] != (not undo)
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

    if fetch_package(remote, ref.name) is None:
        raise NotFound(f"{ref.name} is not on {remote.describe()}")
    pkg = update_package(remote, ref.name, mutate)
    return {"name": ref.name, "version": found.get("version"), "yanked": not undo, "remote": remote.name,
            "tags": dict(pkg.tags)}


def tag(home: Any, ref_text: str, tag_name: str, *, remote_name: str | None = None, **options) -> dict:
    """Point `tag_name` at the version `ref_text` selects (never a yanked one)."""
    validate_tag(tag_name)
    ref = parse_ref(ref_text)
    remote = _index_target(home, remote_name, **options)
    found: dict = {}

    def mutate(pkg: PackageDoc) -> bool:
        entry = pkg.select(ref)
        if entry.get("yanked"):
            raise UsageError(f"{ref.name}@{entry['version']} is yanked and cannot be tagged")
        found["version"] = entry["version"]
        if pkg.tags.get(tag_name) == entry["version"]:
            return False
        pkg.tags[tag_name] = entry["version"]
        return True

    if fetch_package(remote, ref.name) is None:
        raise NotFound(f"{ref.name} is not on {remote.describe()}")
    pkg = update_package(remote, ref.name, mutate)
    return {"name": ref.name, "tag": tag_name, "version": found["version"], "remote": remote.name,
            "tags": dict(pkg.tags)}

