"""The local SQLite index (`pfx.sqlite`, WAL): installed versions, the blobs they reference, pending
downloads, cached remote documents, covariance companions, base digests, and an FTS5 search index.

Every write runs in `BEGIN IMMEDIATE` so that writers queue on SQLite's lock (busy timeout) instead of
failing on a stale read snapshot. gc deletes blob files only inside such a transaction, and
record_install checks its blobs inside one; together these make "an installed version lost its blob"
impossible, whatever processes run at once (see local_ops.gc).
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlite_utils

SCHEMA_VERSION = 2  # 2: signatures table (every statement is IF NOT EXISTS, so upgrading re-runs the DDL)
BUSY_TIMEOUT_MS = 60_000

_DDL = """
CREATE TABLE IF NOT EXISTS installed (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    manifest TEXT NOT NULL UNIQUE,
    remote TEXT,
    installed_at TEXT NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0,
    yanked INTEGER NOT NULL DEFAULT 0,
    concept TEXT NOT NULL,
    size INTEGER NOT NULL,
    base_name TEXT NOT NULL,
    base_digest TEXT NOT NULL,
    superclass TEXT NOT NULL,
    trigger TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    tags TEXT NOT NULL DEFAULT '',
    license TEXT NOT NULL DEFAULT '',
    UNIQUE (name, version)
);
CREATE TABLE IF NOT EXISTS blob_refs (
    manifest TEXT NOT NULL,
    digest TEXT NOT NULL,
    size INTEGER NOT NULL,
    role TEXT NOT NULL,
    PRIMARY KEY (manifest, digest, role)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blob_refs_digest ON blob_refs (digest);
CREATE TABLE IF NOT EXISTS pending (
    id INTEGER PRIMARY KEY,
    digest TEXT NOT NULL,
    pid INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS pending_digest ON pending (digest);
CREATE TABLE IF NOT EXISTS remote_cache (
    remote TEXT NOT NULL,
    key TEXT NOT NULL,
    etag TEXT,
    body NOT NULL,
    fetched_at REAL NOT NULL,
    PRIMARY KEY (remote, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS covariances (
    base_digest TEXT NOT NULL,
    corpus_digest TEXT NOT NULL,
    digest TEXT NOT NULL,
    added_at TEXT NOT NULL,
    PRIMARY KEY (base_digest, corpus_digest)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS signatures (
    manifest TEXT NOT NULL,
    keyid TEXT NOT NULL,
    body BLOB NOT NULL,
    added_at TEXT NOT NULL,
    PRIMARY KEY (manifest, keyid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS base_digests (
    key TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    digest TEXT NOT NULL,
    updated_at TEXT NOT NULL
) WITHOUT ROWID;
CREATE VIRTUAL TABLE IF NOT EXISTS installed_fts USING fts5 (
    name, description, tags, superclass, trigger,
    content='installed', content_rowid='id', prefix='2 3', tokenize='unicode61'
);
CREATE TRIGGER IF NOT EXISTS installed_ai AFTER INSERT ON installed BEGIN
    INSERT INTO installed_fts (rowid, name, description, tags, superclass, trigger)
    VALUES (new.id, new.name, new.description, new.tags, new.superclass, new.trigger);
END;
CREATE TRIGGER IF NOT EXISTS installed_ad AFTER DELETE ON installed BEGIN
    INSERT INTO installed_fts (installed_fts, rowid, name, description, tags, superclass, trigger)
    VALUES ('delete', old.id, old.name, old.description, old.tags, old.superclass, old.trigger);
END;
CREATE TRIGGER IF NOT EXISTS installed_au AFTER UPDATE ON installed BEGIN
    INSERT INTO installed_fts (installed_fts, rowid, name, description, tags, superclass, trigger)
    VALUES ('delete', old.id, old.name, old.description, old.tags, old.superclass, old.trigger);
    INSERT INTO installed_fts (rowid, name, description, tags, superclass, trigger)
    VALUES (new.id, new.name, new.description, new.tags, new.superclass, new.trigger);
END;
"""

INSTALLED_COLUMNS = (
    "name", "version", "manifest", "remote", "installed_at", "pinned", "yanked", "concept", "size",
    "base_name", "base_digest", "superclass", "trigger", "description", "tags", "license",
)


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def row_dict(row: sqlite3.Row | tuple, columns: tuple[str, ...] = INSTALLED_COLUMNS) -> dict:
    d = dict(zip(columns, row))
    if "pinned" in d:
        d["pinned"] = bool(d["pinned"])
    if "yanked" in d:
        d["yanked"] = bool(d["yanked"])
    if "tags" in d:
        d["tags"] = d["tags"].split() if d["tags"] else []
    return d


def fts_query(text: str) -> str | None:
    """User text -> an FTS5 query of quoted prefix terms, ANDed. No FTS syntax from users gets through."""
    words = re.findall(r"[0-9a-z]+", text.lower())
    if not words:
        return None
    return " ".join(f'"{w}"*' for w in words[:16])


class Index:
    """Owns the SQLite connection of one home. One instance per process (and per thread)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        conn = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_MS / 1000)
        self.db = sqlite_utils.Database(conn, execute_plugins=False)
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            self.db.enable_wal()
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across app crashes, fast
        if conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
            with self.write() as c:
                if c.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                    for stmt in _split_ddl(_DDL):
                        c.execute(stmt)
                    c.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @property
    def conn(self) -> sqlite3.Connection:
        return self.db.conn

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: take the write lock up front, commit or roll back as a whole."""
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            yield c
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise
        else:
            c.execute("COMMIT")

    # -- installed ---------------------------------------------------------------------------------

    def insert_installed(self, c: sqlite3.Connection, row: dict, blobs: list[dict]) -> None:
        cols = ", ".join(INSTALLED_COLUMNS)
        marks = ", ".join("?" for _ in INSTALLED_COLUMNS)
        c.execute(f"INSERT INTO installed ({cols}) VALUES ({marks})", [row[k] for k in INSTALLED_COLUMNS])
        c.executemany(
            "INSERT OR IGNORE INTO blob_refs (manifest, digest, size, role) VALUES (?, ?, ?, ?)",
            [(row["manifest"], b["digest"], b["size"], b["role"]) for b in blobs],
        )

    def insert_signatures(self, c: sqlite3.Connection, manifest: str, sigs: list[tuple[str, bytes]]) -> None:
        """Keep the detached signature documents of an installed manifest, so `pfx verify` can check
        them offline. Rows, not blobs: they are tiny and gc never has to know about them."""
        c.executemany(
            "INSERT OR REPLACE INTO signatures (manifest, keyid, body, added_at) VALUES (?, ?, ?, ?)",
            [(manifest, k, bytes(b), now_iso()) for k, b in sigs],
        )

    def signatures(self, manifest: str) -> list[tuple[str, bytes]]:
        return [(k, bytes(b)) for k, b in self.conn.execute(
            "SELECT keyid, body FROM signatures WHERE manifest = ? ORDER BY keyid", (manifest,))]

    def installed(self, name: str | None = None) -> list[dict]:
        cols = ", ".join(INSTALLED_COLUMNS)
        if name is None:
            rows = self.conn.execute(f"SELECT {cols} FROM installed ORDER BY name").fetchall()
        else:
            rows = self.conn.execute(f"SELECT {cols} FROM installed WHERE name = ?", (name,)).fetchall()
        return [row_dict(r) for r in rows]

    def installed_by_manifest(self, digest: str) -> dict | None:
        cols = ", ".join(INSTALLED_COLUMNS)
        r = self.conn.execute(f"SELECT {cols} FROM installed WHERE manifest = ?", (digest,)).fetchone()
        return row_dict(r) if r else None

    def delete_installed(self, c: sqlite3.Connection, manifest: str) -> None:
        c.execute("DELETE FROM installed WHERE manifest = ?", (manifest,))
        c.execute("DELETE FROM blob_refs WHERE manifest = ?", (manifest,))

    def referenced(self, c: sqlite3.Connection | None = None, *, pending_ttl: float) -> set[str]:
        """Every digest gc must keep: blobs of installs, their manifests, covariances, live pending rows."""
        c = c or self.conn
        keep = {r[0] for r in c.execute("SELECT digest FROM blob_refs")}
        keep.update(r[0] for r in c.execute("SELECT manifest FROM installed"))
        keep.update(r[0] for r in c.execute("SELECT digest FROM covariances"))
        keep.update(r[0] for r in c.execute("SELECT digest FROM pending WHERE created > ?", (time.time() - pending_ttl,)))
        return keep

    def search(self, query: str, limit: int = 20) -> list[dict]:
        q = fts_query(query)
        cols = ", ".join(f"i.{k}" for k in INSTALLED_COLUMNS)
        if q is None:
            rows = self.conn.execute(f"SELECT {cols} FROM installed i ORDER BY name LIMIT ?", (limit,)).fetchall()
            return [row_dict(r) for r in rows]
        rows = self.conn.execute(
            f"SELECT {cols}, bm25(installed_fts, 10.0, 1.0, 3.0, 3.0, 3.0) AS score "
            "FROM installed_fts JOIN installed i ON i.id = installed_fts.rowid "
            "WHERE installed_fts MATCH ? ORDER BY score LIMIT ?",
            (q, limit),
        ).fetchall()
        out = []
        for r in rows:
            d = row_dict(r[:-1])
            d["score"] = round(-r[-1], 4)
            out.append(d)
        return out

    # -- pending downloads -------------------------------------------------------------------------

    def add_pending(self, digests: list[str]) -> list[int]:
        with self.write() as c:
            now = time.time()
            ids = []
            for d in digests:
                cur = c.execute("INSERT INTO pending (digest, pid, created) VALUES (?, ?, ?)", (d, os.getpid(), now))
                ids.append(cur.lastrowid)
            return ids

    def drop_pending(self, ids: list[int]) -> None:
        if not ids:
            return
        with self.write() as c:
            c.executemany("DELETE FROM pending WHERE id = ?", [(i,) for i in ids])

    # -- key/value cache of remote documents -------------------------------------------------------

    def kv_get(self, key: str, remote: str = "") -> dict | None:
        """{'value', 'etag', 'fetched_at'}; bytes come back as bytes, anything else as parsed JSON."""
        r = self.conn.execute(
            "SELECT body, etag, fetched_at FROM remote_cache WHERE remote = ? AND key = ?", (remote, key)
        ).fetchone()
        if r is None:
            return None
        value = r[0] if isinstance(r[0], bytes) else json.loads(r[0])
        return {"value": value, "etag": r[1], "fetched_at": r[2]}

    def kv_set(self, key: str, value: Any, etag: str | None = None, remote: str = "") -> None:
        """Cache a remote document: raw bytes are kept verbatim (so callers can re-verify them),
        other values as JSON text."""
        if isinstance(value, bytes | bytearray | memoryview):
            body: Any = bytes(value)
        else:
            body = json.dumps(value, sort_keys=True, separators=(",", ":"))
        with self.write() as c:
            c.execute(
                "INSERT OR REPLACE INTO remote_cache (remote, key, etag, body, fetched_at) VALUES (?, ?, ?, ?, ?)",
                (remote, key, etag, body, time.time()),
            )

    def kv_delete(self, key: str | None = None, remote: str = "") -> None:
        with self.write() as c:
            if key is None:
                c.execute("DELETE FROM remote_cache WHERE remote = ?", (remote,))
            else:
                c.execute("DELETE FROM remote_cache WHERE remote = ? AND key = ?", (remote, key))


def _split_ddl(ddl: str) -> list[str]:
    """Split the schema into statements (triggers contain ';' inside BEGIN ... END)."""
    out, buf = [], []
    for line in ddl.strip().splitlines():
        buf.append(line)
        text = "\n".join(buf).strip()
        if text.endswith(";") and sqlite3.complete_statement(text):
            out.append(text)
            buf = []
    return out
