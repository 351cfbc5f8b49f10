"""Consistency checkers: the properties every hardening test asserts afterwards (empty list = clean).

  * `home_problems(home_dir)`: `pfx verify` is clean, every file in the blob store hashes to its
    name (no half-written file is visible, referenced or not), the SQLite file passes
    integrity_check, and every installed version has all of its blobs;
  * `remote_problems(endpoint, bucket, prefix)`: every version listed in a package document has a
    claim naming the same manifest, the manifest object hashes to its key and names that version,
    and every blob it names exists with the right size and digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
from pathlib import Path

from tests.kit.runner import pfx
from tests.kit.s3 import s3_client


def store_problems(home_dir: str | os.PathLike) -> list[str]:
    """Every file under blobs/ must be a complete blob: its sha256 equals its name."""
    out = []
    root = Path(home_dir) / "blobs" / "sha256"
    if not root.is_dir():
        return out
    for shard in root.iterdir():
        if not shard.is_dir():
            out.append(f"stray {shard}")
            continue
        for f in shard.iterdir():
            with open(f, "rb") as fh:
                got = hashlib.file_digest(fh, "sha256").hexdigest()
            if got != f.name:
                out.append(f"blob file {f} holds {got}")
    return out


def home_problems(home_dir: str | os.PathLike, *, run_verify: bool = True) -> list[str]:
    """Everything that would count as lost or corrupt in a home (empty list = clean)."""
    out = store_problems(home_dir)
    db = Path(home_dir) / "pfx.sqlite"
    if db.exists():
        c = sqlite3.connect(db, timeout=30)
        try:
            for (line,) in c.execute("PRAGMA integrity_check").fetchall():
                # SQLite 3.40 reports "NULL value in T.C" for NOT NULL columns of WITHOUT ROWID
                # tables that hold no NULL (a known false positive): confirm by querying.
                hit = re.fullmatch(r"NULL value in (\w+)\.(\w+)", line)
                if hit and c.execute(f"SELECT count(*) FROM {hit[1]} WHERE {hit[2]} IS NULL").fetchone()[0] == 0:
                    continue
                if line != "ok":
                    out.append(f"sqlite integrity_check: {line}")
            tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            # A home whose very first open failed (e.g. disk full) may hold an index without tables yet.
            rows = c.execute("SELECT manifest, digest, size FROM blob_refs").fetchall() if "blob_refs" in tables else []
            inst = c.execute("SELECT manifest, name, version FROM installed").fetchall() if "installed" in tables else []
        finally:
            c.close()
        blobs = Path(home_dir) / "blobs" / "sha256"
        for manifest, name, version in inst:
            p = blobs / manifest[7:9] / manifest[7:]
            if not p.is_file():
                out.append(f"{name}@{version}: manifest blob missing")
        for manifest, digest, size in rows:
            p = blobs / digest[7:9] / digest[7:]
            if not p.is_file() or p.stat().st_size != size:
                out.append(f"blob {digest} of {manifest[:19]} missing or wrong size")
    if run_verify:
        p = pfx(home_dir, "verify", "--json")
        if p.returncode != 0:
            out.append(f"pfx verify exit {p.returncode}: {p.stdout[-400:]} {p.stderr[-400:]}")
    return out


def remote_problems(endpoint: str, bucket: str, prefix: str = "reg/", *, require_indexed: bool = False) -> list[str]:
    """Check a remote's index against its immutable objects (straight to the server, no proxy).

    Every version a package document lists must have a claim naming the same manifest, the manifest
    must hash to its key and name that package and version, and its blobs must exist intact. With
    `require_indexed`, every claim must also be listed in its package document."""
    from registry.manifest import parse_manifest
    from registry.remotes.base import blob_key, claim_key, manifest_key

    # No response checksum validation: the checker must see (and report) stored bytes as they are.
    s3 = s3_client(endpoint, response_checksum_validation="when_required")
    out: list[str] = []

    def get(key: str) -> bytes | None:
        try:
            return s3.get_object(Bucket=bucket, Key=prefix + key)["Body"].read()
        except s3.exceptions.NoSuchKey:
            return None

    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"][len(prefix):] for o in page.get("Contents", [])]
    claims = {}
    for k in keys:
        if k.startswith("claims/"):
            try:
                doc = json.loads(get(k))
            except ValueError:
                out.append(f"claim {k} is not JSON")
                continue
            claims[(doc["name"], doc["version"])] = doc["manifest"]
    indexed = set()
    for k in keys:
        if not k.startswith("packages/"):
            continue
        try:
            pkg = json.loads(get(k))
        except ValueError:
            out.append(f"package document {k} is not JSON")
            continue
        for version, entry in pkg["versions"].items():
            indexed.add((pkg["name"], version))
            who = f"{pkg['name']}@{version}"
            try:
                ck = claim_key(pkg["name"], version)
            except Exception as e:  # noqa: BLE001
                out.append(f"{who}: bad version {e}")
                continue
            if claims.get((pkg["name"], version)) != entry["manifest"] or ck not in keys:
                out.append(f"{who}: indexed without a claim naming its manifest")
                continue
            data = get(manifest_key(entry["manifest"]))
            if data is None:
                out.append(f"{who}: manifest missing")
                continue
            try:
                m = parse_manifest(data, expect_digest=entry["manifest"], expect_name=pkg["name"],
                                   expect_version=version)
            except Exception as e:  # noqa: BLE001
                out.append(f"{who}: manifest bad: {e}")
                continue
            for b in m.blobs():
                blob = get(blob_key(b["digest"]))
                if blob is None:
                    out.append(f"{who}: blob {b['digest'][:19]} missing")
                elif len(blob) != b["size"] or "sha256:" + hashlib.sha256(blob).hexdigest() != b["digest"]:
                    out.append(f"{who}: blob {b['digest'][:19]} corrupt")
        for t, v in pkg.get("tags", {}).items():
            if v not in pkg["versions"]:
                out.append(f"{pkg['name']}: tag {t} -> {v} not listed")
    # Every immutable object must hash to its key, indexed or not (a stored corrupt object would
    # poison every later publish of the same bytes: put_if_absent never overwrites).
    for k in keys:
        if k.startswith(("blobs/sha256/", "manifests/sha256/")):
            data = get(k)
            if data is not None and hashlib.sha256(data).hexdigest() != k.rsplit("/", 1)[1]:
                out.append(f"immutable object {k} does not hash to its key")
    if require_indexed:
        for (name, version) in claims:
            if (name, version) not in indexed:
                out.append(f"{name}@{version}: claimed but not indexed")
    s3.close()
    return out
