"""Concept cards in the local store: edit a card (which makes a new version), show one, and the search
filters (superclass, base family, licence and permission flags, signed) that `pfx search` shares with
the remote search.

Editing never changes a stored or published version: `edit_card` writes a new concept file with the same
tensors (the data section is copied byte for byte, so modelspec.hash_sha256 stays the same), the new
metadata, `version` = the next patch of the edited version's major.minor line (a metadata-only change is a
patch; `pfx train` makes minors), `edited_from` = the edited file's digest, and records it like a
freshly trained concept. The previous version's blob and manifest stay byte-identical.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from perfusion_hub.card import (
    PERMISSION_FLAGS,
    CardError,
    apply_card,
    card_of,
    data_section,
    rewrite_metadata,
    stamp_hash,
)
from perfusion_hub.concept import read_header_bytes
from registry.errors import NotFound, UsageError, VersionExists
from registry.manifest import Manifest
from registry.names import parse_ref
from registry.versions import parse_version

FILTER_KEYS = ("superclass", "base_family", "license", "allow_commercial", "allow_derivatives",
               "require_credit", "signed")


def next_patch(existing: list[str], edited: str) -> str:
    """The next free patch version on the edited version's major.minor line."""
    v = parse_version(edited)
    top = v.patch
    for s in existing:
        try:
            o = parse_version(s)
        except UsageError:
            continue
        if (o.major, o.minor) == (v.major, v.minor):
            top = max(top, o.patch)
    return f"{v.major}.{v.minor}.{top + 1}"


def edit_card(home: Any, ref_text: str, edits: dict[str, Any], *, version: str | None = None) -> dict:
    """Write `name@<new version>` with the card of `ref_text` changed by `edits` (perfusion_hub.card.
    apply_card's keys). Returns {'name', 'version', 'edited_from', 'manifest', 'card'}."""
    ref = parse_ref(ref_text)
    row = home.find_installed(ref)
    if row is None:
        raise NotFound(f"{ref_text} is not installed", hint=f"`pfx install {ref_text}` first, or see `pfx list`")
    old = home.manifest(row["manifest"])
    data = home.store.read_bytes(old.concept["digest"])
    header = read_header_bytes(data)
    existing = [r["version"] for r in home.installed(old.name)]
    new_version = version or next_patch(existing, old.version)
    parse_version(new_version)
    if new_version in existing:
        raise VersionExists(f"{old.name}@{new_version} already exists", hint="pass another --version")
    meta = dict(header.metadata)
    # What the old manifest said but the file did not (description/licence/tags given at add time).
    base_edits: dict[str, Any] = {}
    if not meta.get("description") and old.description:
        base_edits["description"] = old.description
    if not meta.get("license") and old.license:
        base_edits["license"] = old.license
    if "modelspec.tags" not in meta and old.tags:
        base_edits["tags"] = list(old.tags)
    merged = {**base_edits, **{k: v for k, v in edits.items() if v is not None}}
    perms = merged.get("permissions")
    if perms is not None:
        merged["permissions"] = {k: v for k, v in perms.items() if k in PERMISSION_FLAGS}
    meta["version"] = new_version
    meta["edited_from"] = old.concept["digest"]
    meta.pop("modelspec.hash_sha256", None)
    try:
        meta = apply_card(meta, merged)
    except CardError as e:
        raise UsageError(str(e)) from None
    meta = stamp_hash(meta, data_section(data))
    new = rewrite_metadata(data, meta)
    read_header_bytes(new)  # never store a file we would refuse to read
    previews = [(p["digest"], p["size"], p["media_type"]) for p in old.previews]
    cov = old.covariance
    covariance = None if cov is None else {k: cov[k] for k in ("digest", "size", "base_digest", "corpus_digest")}
    tmpdir = home.root / "tmp"
    tmpdir.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tmpdir) as tmp:
        p = Path(tmp) / "concept.safetensors"
        p.write_bytes(new)
        m = home.add_concept_file(p, previews=previews, covariance=covariance)
    return {"name": m.name, "version": m.version, "edited_from": f"{old.name}@{old.version}",
            "manifest": m.digest, "card": m.card}


def card_view(home: Any, m: Manifest) -> dict:
    """The card of a stored manifest, with the concept file's own header card (thumbnail included)."""
    out = dict(m.card)
    try:
        header = read_header_bytes(home.store.read_bytes(m.concept["digest"]))
        out["thumbnail"] = card_of(header.metadata)["thumbnail"]
    except (NotFound, ValueError):
        out["thumbnail"] = ""
    return out


def matches(card: dict, superclass: str | None, filters: dict[str, Any]) -> bool:
    """Does a card (Manifest.card, or a package summary) pass the search filters? `filters` holds
    FILTER_KEYS with None for 'any'. Permission flags match only when stated with that value."""
    for k, want in filters.items():
        if want is None:
            continue
        if k == "superclass":
            if (superclass or "").lower() != str(want).lower():
                return False
        elif k == "base_family":
            if (card.get("base_family") or "sd1") != want:
                return False
        elif k == "license":
            if (card.get("license") or "").lower() != str(want).lower():
                return False
        elif k in PERMISSION_FLAGS:
            if card.get("permissions", {}).get(k) is not bool(want):
                return False
        elif k == "signed":
            if bool(card.get("signers")) != bool(want):
                return False
        else:
            raise UsageError(f"unknown search filter {k!r}")
    return True
