"""Installing from remotes: resolve everything first, then fetch missing blobs in parallel, verified.

Promises:
* An exact install costs a constant number of requests whatever the registry's size: one package
  document GET + one manifest GET per reference, then one GET per missing blob. Nothing is listed.
* Every byte is verified while it streams into the store (`Store.put_stream` with the expected digest
  and size); truncated or wrong bodies are retried with jittered exponential backoff and are never
  renamed into the store. A blob that keeps failing is reported by digest and nothing is recorded.
* Remotes are tried in order (the user's, then the built-in sample); since every object is verified
  by digest, any remote (a mirror, a bundle) is as good as another for a blob.
* Offline mode never opens a socket: network remotes are replaced by `OfflineRemote`, which raises
  before any connection; local file:// remotes (the sample registry, bundles) still work.
* Resolution of every reference happens before any download (a typo fails fast, fetching nothing).
  A version is recorded only once all of its blobs are verified in the store (recording overlaps the
  remaining downloads); all of its blobs, the ones already in the store included, are marked
  pending before the store is checked, so a concurrent `gc` keeps them.
* Publisher signatures are checked right after resolution, before any blob is fetched, under the
  namespace's trust policy (registry/signing.py): one GET per trusted key, by its known key.
* Recording is cheap: manifests are written to the store by the download workers (in parallel, under
  pending rows, so their fsyncs overlap the network), and ready versions are recorded in batches, one
  SQLite transaction each, which re-checks every blob and the manifest inside the transaction.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry.errors import (
    IntegrityError,
    LocalWriteError,
    NotFound,
    OfflineError,
    PfxError,
    RemoteError,
    Untrusted,
    UsageError,
)
from registry.home import InstallRecord
from registry.lockfile import read_lock
from registry.manifest import Manifest
from registry.names import Ref, parse_ref
from registry.remotes import OfflineRemote, open_remote
from registry.remotes.base import KeyMissing, Remote, blob_key
from registry.resolve import Resolved, cache_get, cache_put, fetch_manifest, fetch_package, resolve_on
from registry.signing import Trust, TrustResult

DEFAULT_WORKERS = 8
DOWNLOAD_ATTEMPTS = 5
RECORD_BATCH = 64  # versions per index transaction while downloads are still running
Progress = Callable[[int, int], None]  # (bytes just completed, total bytes to download)


def candidate_remotes(home: Any, remote_name: str | None = None, **options) -> list[Remote]:
    """The remotes to try, in order: just `remote_name` if given, else all (user's first, sample last)."""
    rows = [home.get_remote(remote_name)] if remote_name else home.list_remotes()
    return [open_remote(r, offline=home.offline, **options) for r in rows]


@dataclass
class _Want:
    """One thing to install: a reference, or a lockfile entry (an exact manifest digest)."""

    ref: Ref
    label: str
    lock: dict | None = None
    resolved: Resolved | None = None
    present: dict | None = None
    trust: TrustResult | None = None
    errors: list[BaseException] = field(default_factory=list)


def _entry(e: Any, key: str, default: Any = None) -> Any:
    return e.get(key, default) if isinstance(e, dict) else getattr(e, key, default)


def _lock_wants(path: str | Path) -> list[_Want]:
    wants = []
    for e in read_lock(path):
        name, version, digest = _entry(e, "name"), _entry(e, "version"), _entry(e, "manifest")
        blobs = _entry(e, "blobs") or []
        lock = {"name": name, "version": version, "manifest": digest, "remote": _entry(e, "remote"),
                "blobs": sorted(_entry(b, "digest") for b in blobs)}
        wants.append(_Want(Ref(name, "digest", digest), f"{name}@{version} ({digest[:19]}...)", lock))
    return wants


def _blobs_present(home: Any, m: Manifest) -> bool:
    return all(home.store.has(b["digest"]) for b in m.blobs())


def _pick_error(w: _Want) -> BaseException:
    """The most useful of the errors seen across remotes: untrusted > integrity > remote > offline > not found."""
    for kind in (Untrusted, IntegrityError, RemoteError, OfflineError):
        for e in w.errors:
            if isinstance(e, kind):
                if kind is OfflineError:
                    return OfflineError(f"offline: {w.label} is not installed",
                                        hint="install it while online, or drop --offline / PFX_OFFLINE")
                return e
    for e in w.errors:
        if isinstance(e, PfxError):
            return NotFound(f"{w.label} was not found on any remote ({e})".replace("\n  hint:", ";"),
                            hint="check the name with `pfx search`, or add the remote that has it")
    return w.errors[0] if w.errors else NotFound(f"{w.label} was not found: no remotes configured")


def _resolve_one(w: _Want, remotes: list[Remote], cached: dict, trust: Trust | None = None) -> None:
    if w.lock and w.lock.get("remote"):
        remotes = sorted(remotes, key=lambda r: r.name != w.lock["remote"])  # the locked remote first
    for remote in remotes:
        try:
            if w.lock:
                m = fetch_manifest(remote, w.lock["manifest"], expect_name=w.lock["name"],
                                   expect_version=w.lock["version"])
                if w.lock["blobs"] and sorted(b["digest"] for b in m.blobs()) != w.lock["blobs"]:
                    raise IntegrityError(f"{w.label}: manifest blobs differ from the lockfile's")
                resolved = Resolved(w.ref, m, remote)
            else:
                resolved = resolve_on(remote, w.ref, cached.get((remote.url, w.ref.name)))
            # Untrusted under enforce: this remote's version is refused; another remote may have a signed one.
            w.trust = trust.check_remote(remote, resolved.manifest) if trust is not None else None
            w.resolved = resolved
            return
        except (PfxError, KeyMissing) as e:
            w.errors.append(e)


class _RemoteBody:
    """A remote's blob body that remembers the exception it raised, so that a read error (the
    remote's) is told apart from an error of the store's own writes (the local disk's)."""

    def __init__(self, chunks: Iterable[bytes]):
        self.chunks, self.it, self.error = chunks, None, None

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        try:
            if self.it is None:
                self.it = iter(self.chunks)
            return next(self.it)
        except StopIteration:
            raise
        except BaseException as e:
            self.error = e
            raise


def _local_write_error(home: Any, what: str, e: OSError) -> LocalWriteError:
    path = e.filename or home.store.tmp_dir  # a failed write() names no file: its temp file was in tmp/
    return LocalWriteError(f"could not write {what} to the local store: {path}: {e.strerror or e}",
                           hint="free disk space or fix the permissions of the home folder, then rerun; "
                                "nothing was recorded")


class _Downloader:
    """Fetch blobs with bounded parallelism; verify while streaming; retry with full jitter."""

    def __init__(self, home: Any, total: int, progress: Progress | None, attempts: int = DOWNLOAD_ATTEMPTS):
        self.home, self.total, self.progress, self.attempts = home, total, progress, attempts
        self.lock = threading.Lock()
        self.done = 0

    def _transient(self, remote: Remote, e: BaseException) -> bool:
        if isinstance(e, IntegrityError):
            return True  # truncated or wrong bytes: the next GET may be fine
        check = getattr(remote, "retryable", None)
        return bool(check and not isinstance(e, PfxError) and check(e)) or isinstance(e, (ConnectionError, TimeoutError))

    def fetch(self, digest: str, size: int, remotes: list[Remote]) -> None:
        errors: list[str] = []
        for remote in remotes:
            for attempt in range(self.attempts):
                body = None
                try:
                    _, chunks = remote.open_blob(blob_key(digest))
                    body = _RemoteBody(chunks)
                    self.home.store.put_stream(body, expect_digest=digest, expect_size=size)
                    with self.lock:
                        self.done += size
                        if self.progress:
                            self.progress(size, self.total)
                    return
                except KeyMissing:
                    errors.append(f"not on {remote.name}")
                    break
                except Exception as e:  # noqa: BLE001 - classified
                    if body is not None and isinstance(e, OSError) and e is not body.error:
                        raise _local_write_error(self.home, f"blob {digest}", e) from None  # no retry
                    errors.append(f"{remote.name}: {(str(e).splitlines() or [type(e).__name__])[0]}")
                    if not self._transient(remote, e) or attempt == self.attempts - 1:
                        break
                    time.sleep(random.uniform(0, min(2.0, 0.05 * 2**attempt)))
        bad = [e for e in errors if "digest" in e or "bytes" in e or "checksum" in e]
        cls = IntegrityError if bad else RemoteError
        raise cls(f"blob {digest} could not be fetched intact: {'; '.join(errors[-3:])}",
                  hint="nothing was stored; retry later or try another remote (--remote)")

    def store_manifest(self, m: Manifest) -> None:
        """Write a (verified) manifest into the store from a worker thread; record re-checks it."""
        if not self.home.store.has(m.digest):
            try:
                self.home.store.put_bytes(m.data, expect_digest=m.digest)
            except OSError as e:
                raise _local_write_error(self.home, f"manifest {m.digest}", e) from None


def _record(home: Any, ws: list[_Want]) -> None:
    """Record complete versions in one index transaction (with the signatures that verified them)."""
    recs = []
    for w in ws:
        t = w.trust
        sigs = [(t.keyid, t.signature)] if t is not None and t.status == "verified" and t.signature else []
        recs.append(InstallRecord(w.resolved.manifest, w.resolved.remote.name, pinned=w.ref.kind == "digest",
                                  yanked=bool(w.resolved.yanked), signatures=sigs))
    home.record_installs(recs)


def _fetch_and_record(home: Any, todo: list[_Want], need: dict, dl: _Downloader, workers: int) -> None:
    """Download blobs in a pool; once a version's blobs are all in the store, its manifest is written
    by the pool too (so no manifest of a failed version is stored, and the fsyncs run in parallel);
    then the main thread (it owns SQLite) records ready versions in batches, overlapping the remaining
    downloads. A failed blob stops everything not yet recorded, after recording what is complete."""
    from concurrent.futures import FIRST_COMPLETED, wait

    waiting = {id(w): {b["digest"] for b in w.resolved.manifest.blobs()} & set(need) for w in todo}
    users: dict[str, list[_Want]] = {}
    for w in todo:
        for d in waiting[id(w)]:
            users.setdefault(d, []).append(w)
    ready: list[_Want] = []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(need) + len(todo)))) as ex:
        pending: dict = {}  # future -> ("blob", digest) | ("manifest", want)

        def blobs_done(w: _Want) -> None:
            pending[ex.submit(dl.store_manifest, w.resolved.manifest)] = ("manifest", w)

        submitted: set[str] = set()
        for w in todo:  # in want order, so early versions complete early
            for b in w.resolved.manifest.blobs():
                d = b["digest"]
                if d in need and d not in submitted:
                    submitted.add(d)
                    size, order = need[d]
                    pending[ex.submit(dl.fetch, d, size, order)] = ("blob", d)
            if not waiting[id(w)]:
                blobs_done(w)
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    kind, what = pending.pop(f)
                    if f.exception() is not None:
                        raise f.exception()
                    if kind == "manifest":
                        ready.append(what)
                        continue
                    for w in users.get(what, []):
                        waiting[id(w)].discard(what)
                        if not waiting[id(w)]:
                            blobs_done(w)
                if len(ready) >= RECORD_BATCH or (ready and not pending):
                    batch, ready = ready, []  # a batch that fails to record is not retried below
                    _record(home, batch)
        except BaseException:
            for other in pending:
                other.cancel()
            if ready:
                try:
                    _record(home, ready)  # complete versions stay installed ...
                except Exception:  # noqa: BLE001, S110 - ... but the first error is the one to report
                    pass
            raise


def install(
    home: Any,
    refs: Iterable[str] = (),
    *,
    lock: str | Path | None = None,
    remote: str | None = None,
    workers: int = DEFAULT_WORKERS,
    progress: Progress | None = None,
    remotes: list[Remote] | None = None,
    **remote_options,
) -> list[dict]:
    """Install references (`name`, `name@1.2.0`, `name@^1`, `name@latest`, `name@sha256:...`) and/or
    exactly the entries of a lockfile. Returns one dict per item: name, version, manifest, remote,
    status ('installed' or 'present'), yanked."""
    wants = [_Want(parse_ref(r), r) for r in refs]
    if lock is not None:
        wants += _lock_wants(lock)
    if not wants:
        raise UsageError("nothing to install", hint="give references (pfx install cat-mittens) or -r pfx.lock")

    # 1. What is already here (no network at all for these).
    for w in wants:
        row = home.find_installed(w.ref)
        if row is not None:
            m = home.manifest(row["manifest"])
            if _blobs_present(home, m):
                w.present = row
    todo = [w for w in wants if w.present is None]
    results: list[dict] = []
    if todo:
        if remotes is None:
            remotes = candidate_remotes(home, remote, max_pool=max(workers, 10), **remote_options)
        cached = {}
        for r in remotes:
            if isinstance(r, OfflineRemote):
                continue
            for w in todo:
                if not w.lock and w.ref.kind != "digest":
                    c = cache_get(home, r, w.ref.name)
                    if c:
                        cached[(r.url, w.ref.name)] = c
        # 2. Resolve (and check signatures) for everything before fetching anything.
        trust = Trust.load(home)
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo)))) as ex:
            list(ex.map(lambda w: _resolve_one(w, remotes, cached, trust), todo))
        failed = [w for w in todo if w.resolved is None]
        if failed:
            raise _pick_error(failed[0])
        for w in todo:
            if w.resolved.fresh_doc:
                cache_put(home, w.resolved.remote, w.ref.name, *w.resolved.fresh_doc)
        # 3. Fetch the blobs that are missing, each once, from the resolving remote first. Every blob
        # of every version is marked pending BEFORE the presence check: a blob already in the store
        # but unreferenced (left by a removed install) must not be taken by a gc between "it is
        # here, skip the download" and the record.
        mark = {b["digest"] for w in todo for b in w.resolved.manifest.blobs()}
        mark |= {w.resolved.manifest.digest for w in todo}
        with home.pending(sorted(mark)):
            need: dict[str, tuple[int, list[Remote]]] = {}
            for w in todo:
                for b in w.resolved.manifest.blobs():
                    if b["digest"] not in need and not home.store.has(b["digest"]):
                        order = [w.resolved.remote] + [r for r in remotes if r is not w.resolved.remote]
                        need[b["digest"]] = (b["size"], order)
            dl = _Downloader(home, sum(s for s, _ in need.values()), progress)
            _fetch_and_record(home, todo, need, dl, workers)
    for w in wants:
        if w.present is not None:
            results.append({"name": w.present["name"], "version": w.present["version"],
                            "manifest": w.present["manifest"], "remote": w.present.get("remote"),
                            "status": "present", "yanked": bool(w.present.get("yanked"))})
        else:
            m = w.resolved.manifest
            results.append({"name": m.name, "version": m.version, "manifest": m.digest,
                            "remote": w.resolved.remote.name, "status": "installed", "yanked": w.resolved.yanked,
                            "signed_by": w.trust.keyid if w.trust else None})
            if w.trust is not None and w.trust.status == "warn":
                results[-1]["warning"] = w.trust.message
    return results


def remote_info(home: Any, ref_text: str, remote_name: str | None = None) -> dict:
    """What a remote knows about a reference: the chosen version's manifest plus all versions and tags."""
    ref = parse_ref(ref_text)
    errors: list[BaseException] = []
    for remote in candidate_remotes(home, remote_name):
        try:
            res = resolve_on(remote, ref)
            pkg = fetch_package(remote, ref.name) if ref.kind != "digest" else None
        except (PfxError, KeyMissing) as e:
            errors.append(e)
            continue
        m = res.manifest
        return {
            "name": m.name, "version": m.version, "manifest": m.digest, "remote": remote.name,
            "installed": False, "yanked": res.yanked, "trigger": m.trigger, "superclass": m.superclass,
            "description": m.description, "tags": list(m.tags), "license": m.license,
            "base": m.raw["base"], "size": m.total_size(), "blobs": m.blobs(), "card": m.card,
            "signers": list(pkg.summary.get("signers", [])) if pkg and pkg.summary.get("version") == m.version else [],
            "versions": [{"version": e["version"], "yanked": e["yanked"]} for e in pkg.entries()] if pkg else [],
            "dist_tags": dict(pkg.tags) if pkg else {},
        }
    w = _Want(ref, ref_text, errors=errors)
    raise _pick_error(w)
