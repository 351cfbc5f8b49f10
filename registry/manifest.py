"""Manifests: the canonical JSON document that names every byte a concept version consists of.

The manifest digest (sha256 of its canonical bytes) is the version's identity. Canonical form is
enforced on parse, so one content has exactly one digest and a re-serialised copy cannot pass as
another version. A publisher signature (planned) will sign the manifest digest from a separate
object, so the manifest never has to change to carry one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry.errors import Incompatible, IntegrityError, MalformedDocument
from registry.names import is_digest, validate_name
from registry.versions import parse_version

SCHEMA = "pfx.manifest/1"
MAX_MANIFEST_BYTES = 64 * 1024
CONCEPT_MEDIA_TYPE = "application/vnd.pfx.concept.v1+safetensors"
CONCEPT_MEDIA_TYPE_V2 = "application/vnd.pfx.concept.v2+safetensors"
FAMILIES = frozenset({"sd1", "sd2", "sdxl"})  # perfusion_hub.concept.FAMILIES (the registry never imports torch)
COVARIANCE_MEDIA_TYPE = "application/vnd.pfx.covariance.v1+safetensors"
PREVIEW_MEDIA_TYPES = frozenset({"image/png", "image/jpeg", "image/webp"})
MAX_PREVIEWS = 16
MAX_TAGS = 32
_TAG = re.compile(r"[a-z0-9][a-z0-9-]{0,31}", re.ASCII)
CARD_ANNOTATION = "pfx.card"
# annotations["pfx.card"]: the concept header's card keys that the manifest does not already hold. An
# optional field of pfx.manifest/1 (readers before it accept any `annotations` object), so a manifest
# with a card is still readable by an older pfx, and a file without card keys builds the same manifest
# (same digest) as before.
CARD_FIELDS = {"title": str, "trigger_phrase": str, "usage_hint": str, "author": str, "permissions": dict,
               "base_family": str, "architecture": str, "tensors_sha256": str, "edited_from": str,
               "has_thumbnail": bool}


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8, no NaN/Infinity: the one byte form a manifest may take."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def sha256_digest(data: bytes) -> str:
    """'sha256:<64 hex>': the only digest form used anywhere in pfx."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_digest(path: str | os.PathLike) -> tuple[str, int]:
    with open(path, "rb") as f:
        h = hashlib.file_digest(f, "sha256")
        size = f.tell()
    return "sha256:" + h.hexdigest(), size


@dataclass
class Manifest:
    """A parsed, checked manifest. `data` are its exact canonical bytes; `digest` is sha256 of them."""

    raw: dict
    data: bytes
    digest: str

    name = property(lambda self: self.raw["name"])
    version = property(lambda self: self.raw["version"])
    concept = property(lambda self: self.raw["concept"])
    previews = property(lambda self: self.raw["previews"])
    companions = property(lambda self: self.raw["companions"])
    base_digest = property(lambda self: self.raw["base"]["digest"])
    base_name = property(lambda self: self.raw["base"]["name"])
    # the base family a concept needs: recorded for format v2 concepts (SD2.x, SDXL); v1 concepts are SD1.x
    family = property(lambda self: self.raw["base"].get("family", "sd1"))
    trigger = property(lambda self: self.raw["trigger"])
    superclass = property(lambda self: self.raw["superclass"])
    beta = property(lambda self: self.raw["beta"])
    tau = property(lambda self: self.raw["tau"])
    key_lock = property(lambda self: self.raw["key_lock"])
    description = property(lambda self: self.raw["description"])
    tags = property(lambda self: self.raw["tags"])
    license = property(lambda self: self.raw["license"])
    provenance = property(lambda self: self.raw["provenance"])
    created = property(lambda self: self.raw["created"])
    corpus_digest = property(lambda self: self.raw["corpus_digest"])
    covariance_digest = property(lambda self: self.raw["covariance_digest"])

    @property
    def card(self) -> dict:
        """The card (title, trigger phrase, usage hint, licence permissions, base family...), with the
        documented defaults for manifests built before cards existed (perfusion_hub.card)."""
        return card_of_manifest(self.raw)

    @property
    def covariance(self) -> dict | None:
        return next((c for c in self.companions if c["kind"] == "covariance"), None)

    def blobs(self) -> list[dict]:
        """Every blob this version needs besides the manifest itself: [{'digest','size','role'}]."""
        out = [{"digest": self.concept["digest"], "size": self.concept["size"], "role": "concept"}]
        out += [{"digest": p["digest"], "size": p["size"], "role": "preview"} for p in self.previews]
        out += [{"digest": c["digest"], "size": c["size"], "role": c["kind"]} for c in self.companions]
        return out

    def total_size(self) -> int:
        return len(self.data) + sum(b["size"] for b in self.blobs())

    def ref(self) -> str:
        return f"{self.name}@{self.version}"


# --------------------------------------------------------------------------------------------------
# Building


def _float(meta: dict[str, str], key: str) -> float:
    v = float(meta[key])
    if not math.isfinite(v):
        raise IntegrityError(f"concept metadata {key}={meta[key]!r} is not finite")
    return v


def _descriptor(d: dict, media_type: str | None = None) -> dict:
    out = {"digest": d["digest"], "size": int(d["size"])}
    if media_type:
        out["media_type"] = media_type
    return out


def build_manifest(
    header,
    concept_digest: str,
    concept_size: int,
    *,
    previews: list[tuple[str, int, str]] | tuple = (),
    covariance: dict | None = None,
    description: str = "",
    tags: list[str] | tuple = (),
    license: str = "",
) -> Manifest:
    """Build a manifest from a concept header (perfusion_hub.concept.ConceptHeader) and its blob digest.

    `previews` are (digest, size, media_type); `covariance` is {'digest','size','base_digest',
    'corpus_digest'} and must belong to the concept's base and corpus (Incompatible otherwise).
    Description and license default to the concept file's own metadata.
    """
    meta = header.metadata
    try:
        training = json.loads(meta["training"])
    except (KeyError, json.JSONDecodeError, RecursionError):
        raise IntegrityError(f"{meta.get('name')}@{meta.get('version')}: training metadata is not JSON") from None
    base = {"name": meta["base_name"], "digest": meta["base_digest"]}
    v2 = meta.get("format_version") == "2"
    if v2:  # v1 manifests stay byte-identical (and so keep their digests)
        base["family"] = meta["family"]
    companions = []
    if covariance is not None:
        for k in ("base_digest", "corpus_digest"):
            if covariance.get(k) != meta[k]:
                raise Incompatible(
                    f"covariance {covariance.get('digest')} has {k} {covariance.get(k)}, "
                    f"but {meta['name']}@{meta['version']} was trained with {meta[k]}"
                )
        companions.append({
            "kind": "covariance", "digest": covariance["digest"], "size": int(covariance["size"]),
            "media_type": COVARIANCE_MEDIA_TYPE,
            "base_digest": covariance["base_digest"], "corpus_digest": covariance["corpus_digest"],
        })
    from perfusion_hub.card import card_of

    card = card_of(meta)
    raw = {
        "schema": SCHEMA,
        "name": meta["name"],
        "version": meta["version"],
        "concept": {"digest": concept_digest, "size": int(concept_size),
                    "media_type": CONCEPT_MEDIA_TYPE_V2 if v2 else CONCEPT_MEDIA_TYPE},
        "previews": [{"digest": d, "size": int(s), "media_type": m} for d, s, m in previews],
        "companions": companions,
        "base": base,
        "covariance_digest": meta["covariance_digest"],
        "corpus_digest": meta["corpus_digest"],
        "trigger": meta["trigger"],
        "superclass": meta["superclass"],
        "beta": _float(meta, "beta"),
        "tau": _float(meta, "tau"),
        "key_lock": meta["key_lock"],
        "description": description or meta.get("description", ""),
        "tags": sorted(set(tags) if tags else set(card["tags"])),
        "license": license or meta.get("license", ""),
        "provenance": training if isinstance(training, dict) else {"training": training},
        "created": meta["created"],
        "pfx_version": meta["pfx_version"],
    }
    if card["modelspec"] or "permissions" in meta or "base_family" in meta:
        raw["annotations"] = {CARD_ANNOTATION: {
            "title": card["title"], "trigger_phrase": card["trigger_phrase"], "usage_hint": card["usage_hint"],
            "author": card["author"], "permissions": card["permissions"], "base_family": card["base_family"],
            "architecture": card["architecture"], "tensors_sha256": card["tensors_sha256"],
            "edited_from": card["edited_from"], "has_thumbnail": bool(card["thumbnail"]),
        }}
    data = canonical_json(raw)
    # Round-trip through the parser so that nothing we build could be refused by a reader.
    return parse_manifest(data)


def build_manifest_from_file(path: str | os.PathLike, **kw) -> Manifest:
    """Convenience: read the header of a concept file on disk, hash it, build its manifest."""
    from perfusion_hub.concept import read_header

    header = read_header(path)
    digest, size = file_digest(Path(path))
    return build_manifest(header, digest, size, **kw)


# --------------------------------------------------------------------------------------------------
# Parsing and checking


def _no_dup(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _reject_constant(c: str):
    raise ValueError(f"{c} is not allowed")


def strict_json(data: bytes, where: str, cap: int | None = None, *, allow_constants: bool = False) -> Any:
    """Parse UTF-8 JSON refusing duplicate keys (and NaN/Infinity unless `allow_constants`); any failure
    is an IntegrityError naming `where`. With `cap`, bytes over it are refused before parsing (every
    document read from a remote is capped: index documents and claims are the roots of trust)."""
    if cap is not None and len(data) > cap:
        raise IntegrityError(f"{where}: {len(data)} bytes, over the {cap}-byte limit; refused before parsing")
    try:
        return json.loads(bytes(data).decode("utf-8"), object_pairs_hook=_no_dup,
                          parse_constant=None if allow_constants else _reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:  # not JSON at all: maybe a torn read
        raise MalformedDocument(f"{where}: not valid JSON ({e})") from None
    except ValueError as e:  # JSON that breaks a rule (duplicate key, NaN): never a torn read
        raise IntegrityError(f"{where}: not valid JSON ({e})") from None
    except RecursionError:  # a few KB of '[' fit under any size cap
        raise IntegrityError(f"{where}: JSON nested too deeply; refused") from None


class _Checker:
    def __init__(self, where: str):
        self.where = where

    def fail(self, msg: str):
        raise IntegrityError(f"{self.where}: {msg}")

    def obj(self, d: Any, path: str, required: dict[str, type | tuple], optional: dict | None = None) -> dict:
        if not isinstance(d, dict):
            self.fail(f"{path} must be an object")
        optional = optional or {}
        extra = set(d) - set(required) - set(optional)
        if extra:
            self.fail(f"{path} has unknown field(s) {', '.join(sorted(extra))}")
        for k, t in required.items():
            if k not in d:
                self.fail(f"{path} lacks {k!r}")
        for k, t in {**required, **optional}.items():
            if k in d and (not isinstance(d[k], t) or (t is int and isinstance(d[k], bool))):
                self.fail(f"{path}.{k} has the wrong type")
        return d

    def digest(self, v: str, path: str) -> None:
        if not is_digest(v):
            self.fail(f"{path} is not a sha256 digest")

    def size(self, v: int, path: str) -> None:
        if v < 0 or v > 1 << 40:
            self.fail(f"{path} is out of range")

    def blob(self, d: dict, path: str, extra_required: dict | None = None) -> None:
        self.obj(d, path, {"digest": str, "size": int, **(extra_required or {})}, {"media_type": str})
        self.digest(d["digest"], path + ".digest")
        self.size(d["size"], path + ".size")


def _check(raw: Any, where: str) -> None:
    c = _Checker(where)
    c.obj(raw, "manifest", {
        "schema": str, "name": str, "version": str, "concept": dict, "previews": list, "companions": list,
        "base": dict, "covariance_digest": str, "corpus_digest": str, "trigger": str, "superclass": str,
        "beta": (int, float), "tau": (int, float), "key_lock": str, "description": str, "tags": list,
        "license": str, "provenance": dict, "created": str, "pfx_version": str,
    }, {"annotations": dict})
    if raw["schema"] != SCHEMA:
        c.fail(f"schema {raw['schema']!r} is not {SCHEMA!r} (a newer pfx may be needed)")
    try:
        validate_name(raw["name"])
        parse_version(raw["version"])
    except Exception as e:  # noqa: BLE001 - InvalidName/UsageError both become integrity failures here
        c.fail(str(e).splitlines()[0])
    c.blob(raw["concept"], "concept")
    if len(raw["previews"]) > MAX_PREVIEWS:
        c.fail(f"more than {MAX_PREVIEWS} previews")
    for i, p in enumerate(raw["previews"]):
        c.blob(p, f"previews[{i}]")
        if p.get("media_type") not in PREVIEW_MEDIA_TYPES:
            c.fail(f"previews[{i}].media_type must be one of {', '.join(sorted(PREVIEW_MEDIA_TYPES))}")
    kinds = set()
    for i, comp in enumerate(raw["companions"]):
        c.blob(comp, f"companions[{i}]", {"kind": str, "base_digest": str, "corpus_digest": str})
        if comp["kind"] != "covariance" or comp["kind"] in kinds:
            c.fail(f"companions[{i}].kind {comp['kind']!r} is unknown or repeated")
        kinds.add(comp["kind"])
        if comp["base_digest"] != raw["base"].get("digest"):
            c.fail(f"companions[{i}] belongs to another base")
    c.obj(raw["base"], "base", {"name": str, "digest": str}, {"family": str})
    c.digest(raw["base"]["digest"], "base.digest")
    if raw["base"].get("family", "sd1") not in FAMILIES:
        c.fail(f"base.family must be one of {', '.join(sorted(FAMILIES))}")
    for k in ("beta", "tau"):
        if isinstance(raw[k], bool) or not math.isfinite(raw[k]):
            c.fail(f"{k} is not a finite number")
    if raw["tau"] <= 0:
        c.fail("tau must be positive")
    if len(raw["tags"]) > MAX_TAGS or not all(isinstance(t, str) and _TAG.fullmatch(t) for t in raw["tags"]):
        c.fail("tags must be at most 32 short lowercase words")
    if len(raw["description"]) > 4096:
        c.fail("description over 4096 characters")
    card = raw.get("annotations", {}).get(CARD_ANNOTATION)
    if card is not None:
        c.obj(card, f"annotations.{CARD_ANNOTATION}", {}, CARD_FIELDS)
        for k, v in card.items():
            if isinstance(v, str) and len(v) > 1000:
                c.fail(f"annotations.{CARD_ANNOTATION}.{k} is over 1000 characters")
        perms = card.get("permissions", {})
        from perfusion_hub.card import PERMISSION_FLAGS

        if set(perms) - set(PERMISSION_FLAGS) or not all(isinstance(v, bool) for v in perms.values()):
            c.fail(f"annotations.{CARD_ANNOTATION}.permissions must map {', '.join(PERMISSION_FLAGS)} to booleans")


def card_of_manifest(raw: dict) -> dict:
    """A manifest's card with defaults for what it lacks (the same defaults as perfusion_hub.card)."""
    from perfusion_hub.card import ARCHITECTURES, DEFAULT_FAMILY

    got = dict(raw.get("annotations", {}).get(CARD_ANNOTATION, {}))
    fam = got.get("base_family") or DEFAULT_FAMILY
    card = {
        "title": raw["name"], "trigger_phrase": raw["name"], "author": "", "permissions": {},
        "usage_hint": (f"Write {raw['name']} in the prompt (a {raw['superclass']}); Perfusion gate "
                       f"beta={raw['beta']} tau={raw['tau']} (lower beta: stronger)"),
        "base_family": fam, "architecture": f"{ARCHITECTURES.get(fam, fam)}/perfusion", "tensors_sha256": "",
        "edited_from": "", "has_thumbnail": False,
    }
    card.update({k: v for k, v in got.items() if v not in ("", None) or k == "author"})
    card.update({"description": raw["description"], "license": raw["license"], "tags": list(raw["tags"])})
    return card


def parse_manifest(
    data: bytes,
    *,
    expect_digest: str | None = None,
    expect_name: str | None = None,
    expect_version: str | None = None,
) -> Manifest:
    """Check and parse manifest bytes. Every failure is an IntegrityError that names the object.

    Order matters: size cap first (before any parsing), then the digest (cheap, and the strongest
    check), then strict JSON (no duplicate keys, no NaN), canonical form, schema, and finally that the
    name/version inside agree with where the manifest was found.
    """
    where = f"manifest {expect_digest}" if expect_digest else "manifest"
    if expect_name:
        where += f" ({expect_name}{'@' + expect_version if expect_version else ''})"
    if not isinstance(data, bytes | bytearray):
        raise IntegrityError(f"{where}: not bytes")
    data = bytes(data)
    if len(data) > MAX_MANIFEST_BYTES:
        raise IntegrityError(f"{where}: {len(data)} bytes, over the {MAX_MANIFEST_BYTES}-byte limit")
    digest = sha256_digest(data)
    if expect_digest is not None and digest != expect_digest:
        raise IntegrityError(f"{where}: content has digest {digest}, expected {expect_digest}")
    raw = strict_json(data, where)
    _check(raw, where)
    try:
        canonical = canonical_json(raw)
    except RecursionError:  # parsed just under the limit, one frame deeper to re-encode
        raise IntegrityError(f"{where}: JSON nested too deeply; refused") from None
    if canonical != data:
        raise IntegrityError(f"{where}: not in canonical form (sorted keys, no whitespace)")
    if expect_name is not None and raw["name"] != expect_name:
        raise IntegrityError(f"{where}: names {raw['name']!r}, expected {expect_name!r}")
    if expect_version is not None and raw["version"] != expect_version:
        raise IntegrityError(f"{where}: is version {raw['version']!r}, expected {expect_version!r}")
    return Manifest(raw, data, digest)
