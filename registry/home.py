"""The home folder: blob store + SQLite index + config.toml, and the operations that keep them consistent.

Layout (documented for users in the README):
    <home>/blobs/sha256/<ab>/<hex>   read-only blobs (concepts, previews, covariances, manifests)
    <home>/tmp/                      writers' unique temp files (same filesystem => atomic rename)
    <home>/pfx.sqlite                index (WAL): installed versions, refs, remotes cache, FTS
    <home>/config.toml               remotes, default remote, default base, defaults
    <home>/CACHEDIR.TAG              so backup tools skip the folder

The home is shared by any number of processes: blob writes are lock-free (store.py) and every index
change is one IMMEDIATE transaction (index.py).
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from registry.errors import Conflict, IntegrityError, NotFound, UsageError, VersionExists
from registry.index import Index, now_iso
from registry.manifest import Manifest, build_manifest, file_digest, parse_manifest
from registry.names import Ref, is_digest, parse_ref, validate_name
from registry.store import Store
from registry.versions import next_minor, parse_version, select_version, sort_versions

CACHEDIR_TAG = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file is a cache directory tag created by pfx.\n"
    "# For information about cache directory tags see https://bford.info/cachedir/\n"
)
SAMPLE_REMOTE = "sample"
PENDING_TTL_S = 3600.0
_REMOTE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}", re.ASCII)
_REMOTE_SCHEMES = ("s3://", "file://", "https://", "http://")
_PREVIEW_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}


def sample_registry_path() -> Path:
    """The read-only sample registry shipped inside the package (registry/sample_registry)."""
    return Path(__file__).resolve().parent / "sample_registry"


def env_offline() -> bool:
    return os.environ.get("PFX_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------------------------------
# A tiny TOML writer: enough for config.toml and pfx.lock (strings, bools, ints, floats, lists of
# scalars, lists of flat dicts as inline tables, nested tables, arrays of tables).


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_str(k)


def _toml_str(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError("TOML writer: non-finite float")
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None) + " }"
    if isinstance(v, list | tuple):
        if v and all(isinstance(x, dict) for x in v):
            return "[\n" + "".join(f"    {_toml_value(x)},\n" for x in v) + "]"
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"TOML writer: cannot write {type(v).__name__}")


def toml_dumps(doc: dict, _prefix: str = "") -> str:
    """Serialise `doc` (None values are skipped). Lists of dicts at top level become arrays of tables."""
    lines: list[str] = []
    tables: list[tuple[str, dict]] = []
    arrays: list[tuple[str, list]] = []
    for k, v in doc.items():
        if v is None:
            continue
        if isinstance(v, dict):
            tables.append((k, v))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v) and not _prefix:
            arrays.append((k, v))
        else:
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, t in tables:
        name = f"{_prefix}.{_toml_key(k)}" if _prefix else _toml_key(k)
        out += f"\n[{name}]\n" + toml_dumps(t, name)
    for k, items in arrays:
        for item in items:
            out += f"\n[[{_toml_key(k)}]]\n" + toml_dumps(item, _toml_key(k))
    return out


def atomic_write_text(path: Path, text: str) -> None:
    from perfusion_hub.concept import atomic_write_bytes  # light module: no torch at import

    atomic_write_bytes(path, text.encode("utf-8"))


# --------------------------------------------------------------------------------------------------


@dataclass
class InstallRecord:
    """One version for Home.record_installs: its manifest, where it came from, and what to keep with it
    (the detached signature documents that verified it, as (keyid, bytes))."""

    manifest: Manifest
    remote: str | None
    pinned: bool = False
    yanked: bool = False
    signatures: list[tuple[str, bytes]] = field(default_factory=list)


class Home:
    """One pfx home. Open with Home.open(); cheap enough to open per command."""

    def __init__(self, root: Path, *, offline: bool = False):
        self.root = root
        self.offline = offline
        self.store = Store(root)
        self.index = Index(root / "pfx.sqlite")
        self.config_path = root / "config.toml"

    @classmethod
    def open(cls, path: str | os.PathLike | None = None, *, offline: bool | None = None) -> Home:
        """path: the argument, else $PFX_HOME, else the platform's per-user data folder.
        offline: the argument if given, else $PFX_OFFLINE."""
        if path is None:
            path = os.environ.get("PFX_HOME") or None
        if path is None:
            import platformdirs

            path = platformdirs.user_data_dir("pfx", appauthor=False)
        root = Path(path).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        tag = root / "CACHEDIR.TAG"
        if not tag.exists():
            atomic_write_text(tag, CACHEDIR_TAG)
        return cls(root, offline=env_offline() if offline is None else bool(offline) or env_offline())

    @property
    def db(self):
        """The sqlite_utils.Database of the index."""
        return self.index.db

    def close(self) -> None:
        self.index.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- config ------------------------------------------------------------------------------------

    @property
    def config(self) -> dict:
        """config.toml as a dict (re-read each time: other processes may change it)."""
        try:
            text = self.config_path.read_text("utf-8")
        except FileNotFoundError:
            return {}
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise UsageError(f"{self.config_path}: invalid TOML ({e})", hint="fix or delete the file") from None

    @contextmanager
    def edit_config(self) -> Iterator[dict]:
        """Read-modify-write config.toml; the index's write lock serialises concurrent editors."""
        with self.index.write():
            cfg = self.config
            yield cfg
            atomic_write_text(self.config_path, toml_dumps(cfg))

    def set_config(self, key: str, value: Any) -> None:
        with self.edit_config() as cfg:
            if value is None:
                cfg.pop(key, None)
            else:
                cfg[key] = value

    # -- remotes -----------------------------------------------------------------------------------

    def _sample_remote(self) -> dict:
        return {
            "name": SAMPLE_REMOTE, "url": sample_registry_path().as_uri(), "endpoint_url": None, "profile": None,
            "single_writer": False, "read_only": True, "default": False,
        }

    def list_remotes(self) -> list[dict]:
        """The user's remotes in order, then the built-in read-only 'sample' remote last."""
        cfg = self.config
        default = cfg.get("default_remote")
        out = []
        for r in cfg.get("remotes", []):
            out.append({
                "name": r["name"], "url": r["url"], "endpoint_url": r.get("endpoint_url"),
                "profile": r.get("profile"), "single_writer": bool(r.get("single_writer", False)),
                "read_only": bool(r.get("read_only", False)), "default": r["name"] == default,
            })
        out.append(self._sample_remote())
        return out

    def get_remote(self, name: str) -> dict:
        for r in self.list_remotes():
            if r["name"] == name:
                return r
        known = ", ".join(r["name"] for r in self.list_remotes())
        raise NotFound(f"no remote named {name!r} (remotes: {known})", hint="add one with `pfx remote add NAME URL`")

    def default_remote(self) -> dict | None:
        """The user's default remote (never 'sample'), or None if the user has added none."""
        name = self.config.get("default_remote")
        if not name:
            return None
        return next((r for r in self.list_remotes() if r["name"] == name and r["name"] != SAMPLE_REMOTE), None)

    def add_remote(self, name: str, url: str, *, endpoint_url: str | None = None, profile: str | None = None,
                   single_writer: bool = False, default: bool = False, read_only: bool = False) -> dict:
        """Add a remote at the end of the list. The first remote a user adds becomes the default."""
        if not isinstance(name, str) or not _REMOTE_NAME.fullmatch(name) or name == SAMPLE_REMOTE:
            raise UsageError(f"invalid remote name {name!r}",
                             hint="use lowercase letters, digits, '-' or '_' (and not 'sample', which is built in)")
        if not isinstance(url, str) or not url.startswith(_REMOTE_SCHEMES):
            raise UsageError(f"unsupported remote URL {url!r}", hint="use s3://bucket/prefix or file:///absolute/path")
        if url.startswith("file://") and not url[len("file://"):].startswith("/"):
            raise UsageError(f"file remote {url!r} must be an absolute path: file:///path")
        entry = {"name": name, "url": url, "endpoint_url": endpoint_url, "profile": profile,
                 "single_writer": bool(single_writer), "read_only": bool(read_only)}
        with self.edit_config() as cfg:
            remotes = cfg.setdefault("remotes", [])
            if any(r.get("name") == name for r in remotes):
                raise Conflict(f"a remote named {name!r} already exists", hint=f"`pfx remote remove {name}` first")
            remotes.append({k: v for k, v in entry.items() if v is not None})
            if default or not cfg.get("default_remote"):
                cfg["default_remote"] = name
        return self.get_remote(name)

    def remove_remote(self, name: str) -> None:
        if name == SAMPLE_REMOTE:
            raise UsageError("the 'sample' remote is built in and cannot be removed")
        with self.edit_config() as cfg:
            remotes = cfg.get("remotes", [])
            if not any(r.get("name") == name for r in remotes):
                raise NotFound(f"no remote named {name!r}")
            cfg["remotes"] = [r for r in remotes if r.get("name") != name]
            if cfg.get("default_remote") == name:
                cfg.pop("default_remote")
        self.index.kv_delete(None, remote=name)

    # -- installs ----------------------------------------------------------------------------------

    @contextmanager
    def pending(self, digests: Iterable[str]) -> Iterator[None]:
        """Mark digests as being downloaded so a concurrent gc keeps them. Use around fetch + record_install.

        Rows older than PENDING_TTL_S are ignored by gc (a crashed installer cannot pin blobs forever).
        """
        ids = self.index.add_pending([d for d in digests if is_digest(d)])
        try:
            yield
        finally:
            self.index.drop_pending(ids)

    def record_install(self, manifest: Manifest, *, remote: str | None, pinned: bool = False) -> dict:
        """Record one installed version (see record_installs)."""
        return self.record_installs([InstallRecord(manifest, remote, pinned)])[0]

    def record_installs(self, records: list[InstallRecord]) -> list[dict]:
        """Record installed versions in ONE transaction. Every blob must already be in the store.

        The presence checks run inside the write transaction, and gc deletes only inside one too, so
        once this returns no gc can take the versions' blobs. The manifest is written only if the
        store lacks an intact copy (an install stores it beforehand, from its download workers,
        under a pending row): re-hashing ~1 KB is far cheaper than a rewrite with fsync, and the
        check is inside the transaction, so a gc cannot delete it between check and commit.
        Re-recording the same manifest is a no-op (it keeps the first install's remote and time);
        another manifest under the same name@version is refused (VersionExists) and the whole
        batch is rolled back.
        """
        with self.index.write() as c:
            for r in records:
                self._record_one(c, r)
        return [self.index.installed_by_manifest(r.manifest.digest) for r in records]  # type: ignore[misc]

    def _ensure_manifest(self, manifest: Manifest) -> None:
        try:
            if self.store.read_bytes(manifest.digest) == manifest.data:  # read_bytes re-hashes
                return
        except (NotFound, IntegrityError):
            pass
        self.store.put_bytes(manifest.data, expect_digest=manifest.digest)

    def _record_one(self, c, r: InstallRecord) -> None:
        manifest = r.manifest
        for b in manifest.blobs():
            try:
                size = self.store.size(b["digest"])
            except NotFound:
                raise NotFound(f"{manifest.ref()}: {b['role']} blob {b['digest']} is not in the store",
                               hint="fetch it first (install does this)") from None
            if size != b["size"]:
                raise IntegrityError(f"{manifest.ref()}: {b['role']} blob {b['digest']} has {size} bytes, "
                                     f"manifest says {b['size']}")
        self._ensure_manifest(manifest)
        cur = c.execute("SELECT manifest FROM installed WHERE name = ? AND version = ?",
                        (manifest.name, manifest.version)).fetchone()
        if cur is not None:
            if cur[0] != manifest.digest:
                raise VersionExists(
                    f"{manifest.ref()} is already installed with another manifest ({cur[0]}, not {manifest.digest})",
                    hint=f"`pfx remove {manifest.ref()}` first if you mean to replace it")
            if r.pinned:
                c.execute("UPDATE installed SET pinned = 1 WHERE manifest = ?", (manifest.digest,))
            if r.yanked:
                c.execute("UPDATE installed SET yanked = 1 WHERE manifest = ?", (manifest.digest,))
        else:
            row = {
                "name": manifest.name, "version": manifest.version, "manifest": manifest.digest,
                "remote": r.remote, "installed_at": now_iso(), "pinned": int(r.pinned), "yanked": int(r.yanked),
                "concept": manifest.concept["digest"], "size": manifest.total_size(),
                "base_name": manifest.base_name, "base_digest": manifest.base_digest,
                "superclass": manifest.superclass, "trigger": manifest.trigger,
                "description": manifest.description, "tags": " ".join(manifest.tags), "license": manifest.license,
            }
            self.index.insert_installed(c, row, manifest.blobs())
        if r.signatures:
            self.index.insert_signatures(c, manifest.digest, list(r.signatures))

    def installed(self, name: str | None = None) -> list[dict]:
        """Installed versions (dicts with name, version, manifest, remote, installed_at, yanked, pinned,
        concept, size, base_name, base_digest, superclass, trigger, description, tags, license), sorted
        by name then semver."""
        if name is not None:
            validate_name(name)
        rows = self.index.installed(name)
        out: list[dict] = []
        by_name: dict[str, list[dict]] = {}
        for r in rows:
            by_name.setdefault(r["name"], []).append(r)
        for n in sorted(by_name):
            out.extend(sort_versions(by_name[n]))
        return out

    def find_installed(self, ref: Ref | str) -> dict | None:
        """The installed row `ref` selects (same rules as a remote: yanked only by exact pin), or None.
        Tags other than 'latest' are remote-only and give None."""
        if isinstance(ref, str):
            ref = parse_ref(ref)
        rows = self.index.installed(ref.name)
        if not rows:
            return None
        if ref.kind == "tag":
            if ref.selector != "latest":
                return None
            ref = Ref(ref.name, "default", None)
        try:
            return select_version(rows, {}, ref)
        except NotFound:
            return None

    def manifest(self, digest: str) -> Manifest:
        """A stored manifest, re-verified (digest, schema) on every read."""
        return parse_manifest(self.store.read_bytes(digest), expect_digest=digest)

    def remove(self, name: str, version: str | None = None) -> list[dict]:
        """Forget installed versions (all of `name`, or one). Blobs stay until `gc`."""
        validate_name(name)
        rows = self.index.installed(name)
        if version is not None:
            want = parse_version(version)
            rows = [r for r in rows if parse_version(r["version"]) == want]
        if not rows:
            what = f"{name}@{version}" if version else name
            raise NotFound(f"{what} is not installed", hint="`pfx list` shows what is installed")
        with self.index.write() as c:
            for r in rows:
                self.index.delete_installed(c, r["manifest"])
        return sort_versions(rows)

    def set_yanked(self, name: str, version: str, yanked: bool = True) -> None:
        """Mirror a remote yank into the local index (the version stays installed and usable)."""
        with self.index.write() as c:
            c.execute("UPDATE installed SET yanked = ? WHERE name = ? AND version = ?", (int(yanked), name, version))

    def next_version(self, name: str) -> str:
        validate_name(name)
        return next_minor([r["version"] for r in self.index.installed(name)])

    def add_concept_file(
        self,
        path: str | os.PathLike,
        *,
        previews: Iterable[str | os.PathLike | tuple[str, int, str]] = (),
        covariance: dict | None = None,
        description: str = "",
        tags: Iterable[str] = (),
        license: str = "",
    ) -> Manifest:
        """Store a freshly trained concept file as `name@version` (from its header), with remote=None.

        `covariance` is {'digest','size','base_digest','corpus_digest'} (blob already stored) or has a
        'path' to store; without it, a covariance registered for the concept's base and corpus is used.
        Refuses (VersionExists) if name@version is installed with a different manifest.
        """
        from perfusion_hub.concept import read_header
        header = read_header(path)
        validate_name(header.name)
        parse_version(header.version)
        digest, _ = file_digest(path)
        preview_paths = [p for p in previews if not isinstance(p, tuple)]
        for p in preview_paths:
            if Path(p).suffix.lower() not in _PREVIEW_TYPES:
                raise UsageError(f"preview {p}: only .png, .jpg and .webp images are accepted")
        # Hash first so the pending rows can name every digest before any byte lands in the store.
        want = [digest] + [file_digest(p)[0] for p in preview_paths]
        if covariance is not None and "path" in covariance:
            want.append(file_digest(covariance["path"])[0])
        with self.pending(want):
            digest, size = self.store.put_file(path, expect_digest=digest)
            prev: list[tuple[str, int, str]] = [p for p in previews if isinstance(p, tuple)]
            for p in preview_paths:
                d, s = self.store.put_file(p)
                prev.append((d, s, _PREVIEW_TYPES[Path(p).suffix.lower()]))
            if covariance is not None and "path" in covariance:
                d, s = self.store.put_file(covariance["path"])
                covariance = {**{k: v for k, v in covariance.items() if k != "path"}, "digest": d, "size": s}
            if covariance is None:
                found = self.find_covariance(header.metadata["base_digest"], header.metadata["corpus_digest"])
                if found:
                    covariance = {"digest": found, "size": self.store.size(found),
                                  "base_digest": header.metadata["base_digest"],
                                  "corpus_digest": header.metadata["corpus_digest"]}
            m = build_manifest(header, digest, size, previews=prev, covariance=covariance,
                               description=description, tags=list(tags), license=license)
            self.record_install(m, remote=None)
        return m

    # -- search ------------------------------------------------------------------------------------

    def search(self, query: str, limit: int = 20, **filters: Any) -> list[dict]:
        """Full-text search (FTS5, prefix terms ANDed) over name, description, tags, superclass, trigger.

        `filters` (registry.cards.FILTER_KEYS; None = any): superclass, base_family, license (SPDX id,
        case-insensitive), allow_commercial / allow_derivatives / require_credit (the stated flag must
        equal the value), signed (a signature is stored for the version). Filtered rows carry their
        card's `title`, `base_family`, `permissions` and `signers`."""
        from registry.cards import matches

        filters = {k: v for k, v in filters.items() if v is not None}
        if not filters:
            return self.index.search(query, limit)
        out = []
        for r in self.index.search(query, 1 << 30):
            try:
                card = dict(self.manifest(r["manifest"]).card)
            except (NotFound, IntegrityError):
                continue  # a missing or rotten manifest: `pfx verify` reports it; search skips it
            card["signers"] = [k for k, _ in self.index.signatures(r["manifest"])]
            if matches(card, r["superclass"], filters):
                out.append({**r, **{k: card[k] for k in ("title", "base_family", "permissions", "signers")}})
                if len(out) >= limit:
                    break
        return out

    # -- cached remote documents -------------------------------------------------------------------

    def kv_get(self, key: str, *, remote: str = "") -> dict | None:
        """{'value': <JSON>, 'etag': str | None, 'fetched_at': unix time} or None."""
        return self.index.kv_get(key, remote)

    def kv_set(self, key: str, value: Any, etag: str | None = None, *, remote: str = "") -> None:
        self.index.kv_set(key, value, etag, remote)

    def kv_delete(self, key: str | None = None, *, remote: str = "") -> None:
        self.index.kv_delete(key, remote)

    # -- covariance companions and base digests ----------------------------------------------------

    def add_covariance(self, blob_digest: str, *, base_digest: str, corpus_digest: str) -> None:
        """Register a stored covariance blob as C for (base, corpus). gc keeps registered covariances."""
        if not self.store.has(blob_digest):
            raise NotFound(f"covariance blob {blob_digest} is not in the store")
        with self.index.write() as c:
            c.execute("INSERT OR REPLACE INTO covariances (base_digest, corpus_digest, digest, added_at) "
                      "VALUES (?, ?, ?, ?)", (base_digest, corpus_digest, blob_digest, now_iso()))

    def find_covariance(self, base_digest: str, corpus_digest: str) -> str | None:
        r = self.index.conn.execute("SELECT digest FROM covariances WHERE base_digest = ? AND corpus_digest = ?",
                                    (base_digest, corpus_digest)).fetchone()
        return r[0] if r and self.store.has(r[0]) else None

    def get_base_digest(self, key: str) -> str | None:
        r = self.index.conn.execute("SELECT digest FROM base_digests WHERE key = ?", (key,)).fetchone()
        return r[0] if r else None

    def set_base_digest(self, key: str, name: str, digest: str) -> None:
        with self.index.write() as c:
            c.execute("INSERT OR REPLACE INTO base_digests (key, name, digest, updated_at) VALUES (?, ?, ?, ?)",
                      (key, name, digest, now_iso()))
