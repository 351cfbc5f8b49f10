"""Offline bundles: export installed versions as a `file://` registry tree (or a tar of one), import
them on an air-gapped machine.

An exported folder is a complete registry in the layout every remote uses (registry/remotes), so it
also works as `pfx remote add usb file:///media/usb/bundle`. It is written through the same
`publish_manifest` code path as any publish, plus a `bundle.json` listing what it holds, so that
import never needs to list anything.

Import trusts nothing in the bundle: only paths built from hex digests (and `bundle.json`) are read;
a tar with a symlink, hardlink, device, absolute path or an entry that escapes the tree is refused
as a whole before any byte is used; every manifest and blob is verified against its digest while
streaming into the store, and nothing unverified is ever renamed into place.
"""

from __future__ import annotations

import os
import posixpath
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from registry.errors import IntegrityError, NotFound, UsageError, VersionExists
from registry.home import Home, InstallRecord
from registry.index import now_iso
from registry.manifest import MAX_MANIFEST_BYTES, canonical_json, parse_manifest, strict_json
from registry.names import is_digest, parse_ref, validate_name
from registry.publish import publish_manifest
from registry.remotes.file import FileRemote
from registry.signing import MAX_SIG_BYTES, Trust
from registry.versions import parse_version

BUNDLE_SCHEMA = "pfx.bundle/1"
BUNDLE_INDEX = "bundle.json"
MAX_INDEX_BYTES = 16 << 20
MAX_BLOB_BYTES = 256 << 20
MAX_TAR_MEMBERS = 2_000_000
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def _hexkey(kind: str, digest: str) -> str:
    h = digest[7:]
    return f"{kind}/sha256/{h[:2]}/{h}"


def is_tar_path(path: str | os.PathLike) -> bool:
    return str(path).endswith(TAR_SUFFIXES)


# --------------------------------------------------------------------------------------------------
# Export


def _select_rows(home: Home, refs: list[str] | None) -> list[dict]:
    if not refs:
        rows = home.installed()
        if not rows:
            raise NotFound("nothing is installed to export", hint="`pfx install NAME` first")
        return rows
    rows = []
    for text in refs:
        row = home.find_installed(parse_ref(text))
        if row is None:
            raise NotFound(f"{text} is not installed", hint=f"`pfx install {text}` first")
        rows.append(row)
    return rows


def _write_tree(home: Home, root: Path, rows: list[dict], progress: Callable[[int], None] | None) -> list[dict]:
    """Publish each version into the folder `root` as a file:// registry; merge bundle.json."""
    remote = FileRemote("bundle", root)
    index_path = root / BUNDLE_INDEX
    entries: dict[str, dict] = {}
    if index_path.exists():
        for e in _parse_index(index_path.read_bytes()):
            entries[e["manifest"]] = e
    for r in rows:
        m = home.manifest(r["manifest"])
        # with the stored publisher signatures, so import can check them
        publish_manifest(remote, m, home.store.read_bytes, signatures=home.index.signatures(m.digest))
        entries[m.digest] = {"name": m.name, "version": m.version, "manifest": m.digest, "yanked": bool(r.get("yanked"))}
        if progress:
            progress(1)
    doc = {"schema": BUNDLE_SCHEMA, "created": now_iso(),
           "concepts": sorted(entries.values(), key=lambda e: (e["name"], parse_version(e["version"])))}
    from perfusion_hub.concept import atomic_write_bytes

    atomic_write_bytes(index_path, canonical_json(doc))
    return doc["concepts"]


def export_bundle(home: Home, target: str | os.PathLike, refs: list[str] | None = None, *,
                  progress: Callable[[int], None] | None = None) -> dict:
    """Export installed versions (all, or those `refs` select) to a folder or a .tar/.tar.gz file."""
    target = Path(target)
    rows = _select_rows(home, refs)
    if not is_tar_path(target):
        if target.exists() and not target.is_dir():
            raise UsageError(f"{target} exists and is not a folder", hint="name a new folder, or a .tar file")
        target.mkdir(parents=True, exist_ok=True)
        concepts = _write_tree(home, target, rows, progress)
        return {"bundle": str(target), "format": "dir", "concepts": concepts}
    if target.exists():
        raise UsageError(f"{target} already exists", hint="remove it or choose another name")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home.store.tmp_dir, prefix="export-") as tmp:
        tree = Path(tmp) / "tree"
        tree.mkdir()
        concepts = _write_tree(home, tree, rows, progress)
        mode = "w:gz" if str(target).endswith((".gz", ".tgz")) else "w"
        fd, part = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        os.close(fd)
        try:
            with tarfile.open(part, mode, format=tarfile.PAX_FORMAT) as tf:
                for path in sorted(p for p in tree.rglob("*")):
                    rel = path.relative_to(tree).as_posix()
                    if path.is_symlink() or not (path.is_file() or path.is_dir()):
                        continue
                    if path.name.startswith(".tmp-"):
                        continue
                    info = tf.gettarinfo(str(path), arcname=rel)
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    info.mode = 0o755 if path.is_dir() else 0o644
                    if path.is_dir():
                        tf.addfile(info)
                    else:
                        with open(path, "rb") as f:
                            tf.addfile(info, f)
            os.replace(part, target)
        except BaseException:
            try:
                os.unlink(part)
            except FileNotFoundError:
                pass
            raise
    return {"bundle": str(target), "format": "tar", "concepts": concepts}


# --------------------------------------------------------------------------------------------------
# Reading a bundle safely


class _DirSource:
    """A bundle folder. Only digest-derived keys are opened, refusing symlinks on the way."""

    def __init__(self, root: Path):
        self.root = root
        self.where = str(root)

    def _path(self, key: str) -> Path:
        p = self.root
        for part in key.split("/"):
            p = p / part
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                raise NotFound(f"{key} is not in the bundle {self.where}") from None
            if stat.S_ISLNK(st.st_mode):
                raise IntegrityError(f"bundle {self.where}: {key} goes through a symlink; refused")
        if not stat.S_ISREG(os.lstat(p).st_mode):
            raise IntegrityError(f"bundle {self.where}: {key} is not a regular file; refused")
        return p

    def exists(self, key: str) -> bool:
        try:
            self._path(key)
            return True
        except NotFound:
            return False

    def chunks(self, key: str) -> Iterator[bytes]:
        fd = os.open(self._path(key), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            while block := f.read(1 << 20):
                yield block

    def manifest_keys(self) -> list[str]:
        base = self.root / "manifests" / "sha256"
        out = []
        if base.is_dir() and not base.is_symlink():
            for shard in sorted(os.listdir(base)):
                d = base / shard
                if len(shard) == 2 and d.is_dir() and not d.is_symlink():
                    out += [f"manifests/sha256/{shard}/{h}" for h in sorted(os.listdir(d)) if is_digest("sha256:" + h)]
        return out

    def close(self) -> None:
        pass


class _TarSource:
    """A tar bundle, checked member by member before anything is read; nothing is extracted to disk."""

    def __init__(self, path: Path):
        self.where = str(path)
        try:
            self.tf = tarfile.open(path, "r:*")  # noqa: SIM115 - closed by close()
        except (tarfile.TarError, OSError) as e:
            raise IntegrityError(f"bundle {path}: not a readable tar ({e})") from None
        self.members: dict[str, tarfile.TarInfo] = {}
        try:
            for n, m in enumerate(self.tf):
                if n > MAX_TAR_MEMBERS:
                    raise IntegrityError(f"bundle {path}: more than {MAX_TAR_MEMBERS} entries")
                self._check(m)
        except tarfile.TarError as e:
            raise IntegrityError(f"bundle {path}: corrupt tar ({e})") from None
        except BaseException:
            self.tf.close()
            raise

    def _check(self, m: tarfile.TarInfo) -> None:
        name = m.name
        bad = None
        if m.issym() or m.islnk():
            bad = f"is a {'symlink' if m.issym() else 'hardlink'} (to {m.linkname!r})"
        elif not (m.isfile() or m.isdir()):
            bad = "is not a regular file or folder"
        elif name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or "\\" in name:
            bad = "has an absolute or non-POSIX path"
        else:
            norm = posixpath.normpath(name)
            if norm.startswith("..") or any(p == ".." for p in name.split("/")):
                bad = "points outside the bundle"
        if bad:
            raise IntegrityError(f"bundle {self.where}: entry {name!r} {bad}; the whole bundle is refused")
        if m.isfile():
            norm = posixpath.normpath(name)
            if norm in self.members:
                raise IntegrityError(f"bundle {self.where}: entry {name!r} appears twice; refused")
            if m.size > MAX_BLOB_BYTES:
                raise IntegrityError(f"bundle {self.where}: entry {name!r} is {m.size} bytes; refused")
            self.members[norm] = m

    def exists(self, key: str) -> bool:
        return key in self.members

    def chunks(self, key: str) -> Iterator[bytes]:
        m = self.members.get(key)
        if m is None:
            raise NotFound(f"{key} is not in the bundle {self.where}")
        f = self.tf.extractfile(m)
        assert f is not None
        with f:
            while block := f.read(1 << 20):
                yield block

    def manifest_keys(self) -> list[str]:
        out = []
        for k in sorted(self.members):
            parts = k.split("/")
            if len(parts) == 4 and parts[:2] == ["manifests", "sha256"] and is_digest("sha256:" + parts[3]):
                out.append(k)
        return out

    def close(self) -> None:
        self.tf.close()


def _read_capped(src, key: str, cap: int) -> bytes:
    buf = bytearray()
    for c in src.chunks(key):
        buf += c
        if len(buf) > cap:
            raise IntegrityError(f"bundle {src.where}: {key} is over the {cap}-byte limit; refused")
    return bytes(buf)


def _parse_index(data: bytes) -> list[dict]:
    raw = strict_json(data, BUNDLE_INDEX, allow_constants=True)
    if not isinstance(raw, dict) or raw.get("schema") != BUNDLE_SCHEMA or not isinstance(raw.get("concepts"), list):
        raise IntegrityError(f"{BUNDLE_INDEX}: not a {BUNDLE_SCHEMA} document")
    out = []
    for e in raw["concepts"]:
        if not isinstance(e, dict) or not is_digest(e.get("manifest", "")):
            raise IntegrityError(f"{BUNDLE_INDEX}: malformed entry {str(e)[:80]}")
        try:
            validate_name(e.get("name"))
            parse_version(e.get("version"))
        except UsageError as err:
            raise IntegrityError(f"{BUNDLE_INDEX}: {str(err).splitlines()[0]}") from None
        out.append({"name": e["name"], "version": e["version"], "manifest": e["manifest"],
                    "yanked": bool(e.get("yanked", False))})
    return out


def open_source(path: str | os.PathLike):
    p = Path(path)
    if p.is_symlink() and not p.exists():
        raise NotFound(f"bundle {p} does not exist")
    if p.is_dir():
        return _DirSource(p.resolve())
    if p.is_file():
        return _TarSource(p)
    raise NotFound(f"bundle {p} does not exist", hint="give a folder or a .tar written by `pfx export`")


def import_bundle(home: Home, source: str | os.PathLike, *,
                  progress: Callable[[int], None] | None = None) -> dict:
    """Verify and install everything a bundle holds. All manifests are checked, and conflicts with
    installed versions detected, before any blob is written."""
    src = open_source(source)
    try:
        if src.exists(BUNDLE_INDEX):
            entries = _parse_index(_read_capped(src, BUNDLE_INDEX, MAX_INDEX_BYTES))
        else:  # a plain file:// registry tree: every manifest it holds
            entries = [{"name": None, "version": None, "manifest": "sha256:" + k.rsplit("/", 1)[1], "yanked": False}
                       for k in src.manifest_keys()]
        if not entries:
            raise NotFound(f"bundle {src.where} holds no concepts")
        manifests = []
        for e in entries:
            key = _hexkey("manifests", e["manifest"])
            if not src.exists(key):
                raise IntegrityError(f"bundle {src.where}: manifest {e['manifest']} listed but missing")
            m = parse_manifest(_read_capped(src, key, MAX_MANIFEST_BYTES), expect_digest=e["manifest"],
                               expect_name=e["name"], expect_version=e["version"])
            cur = home.find_installed(parse_ref(f"{m.name}@{m.version}"))
            if cur is not None and cur["manifest"] != m.digest:
                raise VersionExists(f"{m.ref()} is already installed with another manifest ({cur['manifest'][:19]}...)",
                                    hint=f"`pfx remove {m.ref()}` first to replace it with the bundle's")
            manifests.append((m, e["yanked"]))
        # Signatures, under the same per-namespace policy as install (Untrusted before any blob is written).
        def fetch_sig(key: str) -> bytes | None:
            return _read_capped(src, key, MAX_SIG_BYTES) if src.exists(key) else None

        trust = Trust.load(home)
        checks = [trust.check_with(fetch_sig, m, f"bundle {src.where}") for m, _ in manifests]
        warnings = [t.message for t in checks if t.status == "warn"]
        imported, skipped, written = [], [], 0
        for (m, yanked), t in zip(manifests, checks):
            with home.pending([b["digest"] for b in m.blobs()] + [m.digest]):
                for b in m.blobs():
                    if home.store.has(b["digest"]) and home.store.verify_blob(b["digest"]) == "ok":
                        continue
                    key = _hexkey("blobs", b["digest"])
                    if not src.exists(key):
                        raise IntegrityError(f"bundle {src.where}: {m.ref()} needs {b['role']} blob {b['digest']}, "
                                             "which the bundle lacks")
                    home.store.put_stream(src.chunks(key), expect_digest=b["digest"], expect_size=b["size"])
                    written += 1
                before = home.find_installed(parse_ref(f"{m.name}@{m.version}"))
                sigs = [(t.keyid, t.signature)] if t.status == "verified" and t.signature else []
                home.record_installs([InstallRecord(m, None, yanked=yanked, signatures=sigs)])
            (skipped if before else imported).append({"name": m.name, "version": m.version, "manifest": m.digest})
            if progress:
                progress(1)
        return {"bundle": src.where, "imported": imported, "already_installed": skipped, "blobs_written": written,
                "warnings": warnings}
    finally:
        src.close()
