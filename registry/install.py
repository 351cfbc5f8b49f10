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
  remaining downloads); the blobs are marked pending meanwhile so a concurrent `gc` keeps them.
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

from registry.errors import IntegrityError, NotFound, OfflineError, PfxError, RemoteError, UsageError
from registry.manifest import Manifest
from registry.names import Ref, parse_ref
from registry.remotes import OfflineRemote, open_remote
from registry.remotes.base import KeyMissing, Remote, blob_key
from registry.resolve import Resolved, cache_get, cache_put, fetch_manifest, resolve_on

DEFAULT_WORKERS = 8
DOWNLOAD_ATTEMPTS = 5
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
    errors: list[BaseException] = field(default_factory=list)


def _entry(e: Any, key: str, default: Any = None) -> Any:
    return e.get(key, default) if isinstance(e, dict) else getattr(e, key, default)


def _lock_wants(path: str | Path) -> list[_Want]:
    from registry.lockfile import read_lock

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
    """The most useful of the errors seen across remotes: integrity > remote > offline > not found."""
    for kind in (IntegrityError, RemoteError, OfflineError):
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


def _resolve_one(w: _Want, remotes: list[Remote], cached: dict) -> None:
    if w.lock and w.lock.get("remote"):
        remotes = sorted(remotes, key=lambda r: r.name != w.lock["remote"])  # the locked remote first
    for remote in remotes:
        try:
            if w.lock:
                m = fetch_manifest(remote, w.lock["manifest"], expect_name=w.lock["name"],
                                   expect_version=w.lock["version"])
                if w.lock["blobs"] and sorted(b["digest"] for b in m.blobs()) != w.lock["blobs"]:
                    raise IntegrityError(f"{w.label}: manifest blobs differ from the lockfile's")
                w.resolved = Resolved(w.ref, m, remote)
            else:
                w.resolved = resolve_on(remote, w.ref, cached.get((remote.url, w.ref.name)))
            return
        except (PfxError, KeyMissing) as e:
            w.errors.append(e)


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
                try:
                    _, chunks = remote.open_blob(blob_key(digest))
                    self.home.store.put_stream(chunks, expect_digest=digest, expect_size=size)
                    with self.lock:
                        self.done += size
                        if self.progress:
                            self.progress(size, self.total)
                    return
                except KeyMissing:
                    errors.append(f"not on {remote.name}")
                    break
                except Exception as e:  # noqa: BLE001 - classified
                    errors.append(f"{remote.name}: {str(e).splitlines()[0]}")
                    if not self._transient(remote, e) or attempt == self.attempts - 1:
                        break
                    time.sleep(random.uniform(0, min(2.0, 0.05 * 2**attempt)))
        bad = [e for e in errors if "digest" in e or "bytes" in e or "checksum" in e]
        cls = IntegrityError if bad else RemoteError
        raise cls(f"blob {digest} could not be fetched intact: {'; '.join(errors[-3:])}",
                  hint="nothing was stored; retry later or try another remote (--remote)")


def _fetch_and_record(home: Any, todo: list[_Want], need: dict, dl: _Downloader, workers: int) -> None:
    """Download in a pool; record each version (main thread: it owns SQLite) as soon as all of its
    blobs are in the store, so the index writes overlap the remaining downloads. A failed blob
    stops everything not yet recorded; versions already recorded are complete and verified."""
    from concurrent.futures import FIRST_EXCEPTION, wait

    waiting = {id(w): {b["digest"] for b in w.resolved.manifest.blobs()} & set(need) for w in todo}
    recorded: set[int] = set()

    def record(w: _Want) -> None:
        m = w.resolved.manifest
        home.record_install(m, remote=w.resolved.remote.name, pinned=w.ref.kind == "digest")
        if w.resolved.yanked and hasattr(home, "set_yanked"):
            home.set_yanked(m.name, m.version, True)
        recorded.add(id(w))

    for w in todo:
        if not waiting[id(w)]:
            record(w)
    users: dict[str, list[_Want]] = {}
    for w in todo:
        for d in waiting[id(w)]:
            users.setdefault(d, []).append(w)
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(need) or 1))) as ex:
        pending = {ex.submit(dl.fetch, d, s, order): d for d, (s, order) in need.items()}
        while pending:
            done, _ = wait(pending, return_when=FIRST_EXCEPTION)
            for f in done:
                d = pending.pop(f)
                if f.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise f.exception()
                for w in users.get(d, []):
                    waiting[id(w)].discard(d)
                    if not waiting[id(w)] and id(w) not in recorded:
                        record(w)


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
        # 2. Resolve everything before fetching anything.
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo)))) as ex:
            list(ex.map(lambda w: _resolve_one(w, remotes, cached), todo))
        failed = [w for w in todo if w.resolved is None]
        if failed:
            raise _pick_error(failed[0])
        for w in todo:
            if w.resolved.fresh_doc:
                cache_put(home, w.resolved.remote, w.ref.name, *w.resolved.fresh_doc)
        # 3. Fetch the blobs that are missing, each once, from the resolving remote first.
        need: dict[str, tuple[int, list[Remote]]] = {}
        for w in todo:
            for b in w.resolved.manifest.blobs():
                if b["digest"] not in need and not home.store.has(b["digest"]):
                    order = [w.resolved.remote] + [r for r in remotes if r is not w.resolved.remote]
                    need[b["digest"]] = (b["size"], order)
        total = sum(s for s, _ in need.values())
        dl = _Downloader(home, total, progress)
        with home.pending(list(need)):
            _fetch_and_record(home, todo, need, dl, workers)
    for w in wants:
        if w.present is not None:
            results.append({"name": w.present["name"], "version": w.present["version"],
                            "manifest": w.present["manifest"], "remote": w.present.get("remote"),
                            "status": "present", "yanked": bool(w.present.get("yanked"))})
        else:
            m = w.resolved.manifest
            results.append({"name": m.name, "version": m.version, "manifest": m.digest,
                            "remote": w.resolved.remote.name, "status": "installed", "yanked": w.resolved.yanked})
    return results


def remote_info(home: Any, ref_text: str, remote_name: str | None = None) -> dict:
    """What a remote knows about a reference: the chosen version's manifest plus all versions and tags."""
    from registry.resolve import fetch_package

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
            "base": m.raw["base"], "size": m.total_size(), "blobs": m.blobs(),
            "versions": [{"version": e["version"], "yanked": e["yanked"]} for e in pkg.entries()] if pkg else [],
            "dist_tags": dict(pkg.tags) if pkg else {},
        }
    w = _Want(ref, ref_text, errors=errors)
    raise _pick_error(w)
