"""Maintenance of a home: verify (re-hash everything), gc (delete what nothing references), du, info.

gc's safety argument, for a home shared by many processes:
  * a blob younger than the grace period is never deleted (a writer's rename sets its mtime), and
  * deletions happen only inside an IMMEDIATE transaction that re-reads every reference, including
    `pending` rows an installer writes *before* it downloads, while
  * `Home.record_install` checks that its blobs exist inside its own IMMEDIATE transaction.
So an installer either registered its pending row before gc's transaction (gc sees it), or it
starts after gc committed (the blob is already gone and it downloads it), and a version recorded as
installed always has its blobs at the moment it is recorded and forever after (gc sees its refs).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from registry.errors import IntegrityError, NotFound
from registry.home import PENDING_TTL_S, Home
from registry.manifest import parse_manifest
from registry.names import Ref, parse_ref
from registry.signing import verify_installed

GC_GRACE_S = 15 * 60.0
TMP_MAX_AGE_S = 3600.0
GC_CHUNK = 500


def _workers() -> int:
    return max(2, min(8, 2 * (os.cpu_count() or 1)))


def verify(home: Home, *, fix: bool = False, progress: Callable[[int], None] | None = None) -> dict:
    """Re-hash every blob and manifest the index references; check manifests parse and agree with
    the index; check stored publisher signatures against the trust policy ('untrusted' entries fail
    the verify, 'trust_warnings' do not). With `fix`, corrupt files are deleted so that a reinstall
    fetches them again."""
    t0 = time.perf_counter()
    conn = home.index.conn
    users: dict[str, list[str]] = {}
    roles: dict[str, str] = {}
    sizes: dict[str, int] = {}
    by_manifest: dict[str, set[tuple[str, int, str]]] = {}
    conn.execute("BEGIN")  # one read snapshot: rows and refs agree even while others write
    try:
        installed = conn.execute("SELECT manifest, name, version FROM installed").fetchall()
        refs = conn.execute("SELECT manifest, digest, size, role FROM blob_refs").fetchall()
    finally:
        conn.execute("COMMIT")
    for manifest, name, version in installed:
        users.setdefault(manifest, []).append(f"{name}@{version}")
        roles[manifest] = "manifest"
        by_manifest[manifest] = set()
    for manifest, digest, size, role in refs:
        ref = users.get(manifest, ["?"])[0]
        users.setdefault(digest, []).append(ref)
        roles.setdefault(digest, role)
        sizes[digest] = size
        by_manifest.setdefault(manifest, set()).add((digest, size, role))

    def check(digest: str) -> tuple[str, str, int, str | None]:
        if roles[digest] == "manifest":
            try:
                data = home.store.read_bytes(digest)
            except NotFound:
                return digest, "missing", 0, None
            except IntegrityError:
                return digest, "corrupt", home.store.check_blob(digest)[1], None
            try:
                m = parse_manifest(data, expect_digest=digest)
            except IntegrityError as e:
                return digest, "bad_manifest", len(data), str(e).splitlines()[0]
            if {(b["digest"], b["size"], b["role"]) for b in m.blobs()} != by_manifest.get(digest, set()):
                return digest, "index_mismatch", len(data), "index rows disagree with the manifest"
            return digest, "ok", len(data), None
        status, size = home.store.check_blob(digest)
        if status == "ok" and size != sizes[digest]:
            status = "corrupt"
        return digest, status, size, None

    problems: dict[str, list[dict]] = {"missing": [], "corrupt": [], "bad_manifest": [], "index_mismatch": []}
    total = 0
    fixed: list[str] = []
    with ThreadPoolExecutor(max_workers=_workers()) as ex:
        for digest, status, size, detail in ex.map(check, sorted(roles), chunksize=64):
            total += size
            if progress:
                progress(1)
            if status == "ok":
                continue
            item = {"digest": digest, "role": roles[digest], "used_by": sorted(set(users.get(digest, [])))}
            if detail:
                item["detail"] = detail
            problems[status].append(item)
            if fix and status in ("corrupt", "bad_manifest") and home.store.delete(digest):
                fixed.append(digest)
    # Signatures (offline: the documents were stored at install): required under an enforcing policy.
    trust = verify_installed(home)
    ok = not any(problems.values()) and not trust["untrusted"]
    return {"ok": ok, "checked": len(roles), "installed": len(by_manifest), "bytes": total, **problems,
            **trust, "fixed": fixed, "seconds": round(time.perf_counter() - t0, 3)}


def gc(home: Home, *, grace_s: float = GC_GRACE_S, dry_run: bool = False,
       pending_ttl: float = PENDING_TTL_S) -> dict:
    """Delete blobs that no installed version, registered covariance or live pending download
    references, and that are older than `grace_s`. Stale temp files and pending rows go too."""
    now = time.time()
    cutoff = now - grace_s
    keep = home.index.referenced(pending_ttl=pending_ttl)
    candidates: list[tuple[str, int]] = []
    recent = 0
    for digest, st in home.store.iter_blobs():
        if digest in keep:
            continue
        if st.st_mtime >= cutoff:
            recent += 1
            continue
        candidates.append((digest, st.st_size))
    removed: list[dict] = []
    if dry_run:
        removed = [{"digest": d, "size": s} for d, s in candidates]
    else:
        for i in range(0, len(candidates), GC_CHUNK):
            with home.index.write() as c:
                keep = home.index.referenced(c, pending_ttl=pending_ttl)
                for digest, size in candidates[i:i + GC_CHUNK]:
                    if digest in keep:
                        continue
                    path = home.store.blob_path(digest)
                    try:
                        if path.stat().st_mtime >= cutoff:  # rewritten since we listed it
                            recent += 1
                            continue
                        path.unlink()
                    except FileNotFoundError:
                        continue
                    removed.append({"digest": digest, "size": size})
    tmp_removed = 0
    for path, st in home.store.iter_tmp():
        if st.st_mtime < now - max(grace_s, TMP_MAX_AGE_S):
            tmp_removed += 1
            if not dry_run:
                try:
                    path.unlink()
                except (FileNotFoundError, IsADirectoryError):
                    pass
    work_tmp = _stale_work_tmp(home, now - max(grace_s, TMP_MAX_AGE_S))
    if not dry_run:
        for path in work_tmp:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        with home.index.write() as c:
            c.execute("DELETE FROM pending WHERE created <= ?", (now - pending_ttl,))
    return {"dry_run": dry_run, "removed": len(removed), "bytes_freed": sum(r["size"] for r in removed),
            "kept_recent": recent, "tmp_removed": tmp_removed, "digests": removed,
            "work_tmp_removed": [str(p) for p in work_tmp]}


def _stale_work_tmp(home: Home, cutoff: float) -> list[Path]:
    """What a killed `pfx train` left in `work/`, untouched since `cutoff`: its temp folder (`tmp*`)
    and a half-written checkpoint's temp file (`.<run>.ckpt.*.tmp`).

    A folder's age is its newest mtime, itself or anything in it (a live run also touches its
    folder as it trains). Checkpoints (`work/*.ckpt`) are never candidates: `--resume` uses them."""
    work = home.root / "work"
    try:
        entries = list(os.scandir(work))
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for entry in entries:
        name = entry.name
        if not ((name.startswith("tmp") and entry.is_dir(follow_symlinks=False))
                or (name.startswith(".") and name.endswith(".tmp") and entry.is_file(follow_symlinks=False))):
            continue
        try:
            newest = entry.stat(follow_symlinks=False).st_mtime
            for top, dirs, files in os.walk(entry.path):
                for n in dirs + files:
                    newest = max(newest, os.lstat(os.path.join(top, n)).st_mtime)
        except FileNotFoundError:  # a live run removing its own folder
            continue
        if newest < cutoff:
            out.append(Path(entry.path))
    return sorted(out)


def du(home: Home) -> dict:
    """Bytes on disk by kind: concept, preview, covariance, manifest, unreferenced, tmp, index."""
    conn = home.index.conn
    role: dict[str, str] = {}
    for (d,) in conn.execute("SELECT manifest FROM installed"):
        role[d] = "manifest"
    for d, r in conn.execute("SELECT digest, role FROM blob_refs"):
        role.setdefault(d, r)
    for (d,) in conn.execute("SELECT digest FROM covariances"):
        role.setdefault(d, "covariance")
    out = {k: 0 for k in ("concept", "preview", "covariance", "manifest", "unreferenced", "tmp", "index")}
    counts = {k: 0 for k in ("concept", "preview", "covariance", "manifest", "unreferenced")}
    for digest, st in home.store.iter_blobs():
        kind = role.get(digest, "unreferenced")
        kind = kind if kind in counts else "unreferenced"
        out[kind] += st.st_size
        counts[kind] += 1
    for _, st in home.store.iter_tmp():
        out["tmp"] += st.st_size
    for suffix in ("", "-wal", "-shm"):
        try:
            out["index"] += os.stat(str(home.index.path) + suffix).st_size
        except FileNotFoundError:
            pass
    out["total"] = sum(out.values())
    return {"bytes": out, "blobs": counts, "installed": conn.execute("SELECT count(*) FROM installed").fetchone()[0],
            "home": str(home.root)}


def info_local(home: Home, ref: Ref | str) -> dict:
    """The installed row plus its manifest, for `pfx info` on something installed."""
    if isinstance(ref, str):
        ref = parse_ref(ref)
    row = home.find_installed(ref)
    if row is None:
        raise NotFound(f"{ref} is not installed", hint=f"`pfx install {ref}` or `pfx search {ref.name}`")
    m = home.manifest(row["manifest"])
    return {**row, "manifest_doc": m.raw, "blobs": m.blobs()}
