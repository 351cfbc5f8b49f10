"""The concept card: what a model hub shows about a concept, stored in the concept file's header.

Keys follow Stability AI's model metadata standard ("SAI ModelSpec", github.com/Stability-AI/ModelSpec,
README.md, spec 1.0.x: every key prefixed `modelspec.`, string values in the safetensors `__metadata__`),
so A1111/ComfyUI-style model browsers and kohya-style tools show the title, trigger phrase, usage hint and
thumbnail of a pfx concept without knowing pfx. Written beside pfx's own keys (concept.REQUIRED_METADATA):

    modelspec.sai_model_spec   "1.0.0"
    modelspec.architecture     "<base architecture>/perfusion", the base's ModelSpec id from `base_family`
                               (ARCHITECTURES; absent family = sd1: "stable-diffusion-v1/perfusion"), using
                               the spec's adapter separator like "stable-diffusion-v1/lora"
    modelspec.implementation   "pfx" (tensor keys are pfx's concept format v1, spec/perfusion.md section 4)
    modelspec.title            default: the concept name
    modelspec.description      mirror of pfx's `description`
    modelspec.author           optional
    modelspec.date             mirror of pfx's `created`
    modelspec.license          mirror of pfx's `license` (an SPDX id or expression when set by pfx)
    modelspec.trigger_phrase   what to write in a prompt; default: the concept name
    modelspec.usage_hint       default: trigger, superclass and the default beta/tau
    modelspec.tags             comma-separated short lowercase tags (the manifest's tag rule)
    modelspec.thumbnail        optional `data:image/{jpeg,png,webp};base64,...`, at most MAX_THUMBNAIL_CHARS
    modelspec.hash_sha256      "0x" + sha256 of the file's data section: every byte after the 8-byte
                               header length and the JSON header, i.e. the tensors in file-offset order (the
                               header check makes them cover the section exactly). This is what the spec
                               defines ("all tensor content, excluding the header") and what its reference
                               example computes. It does not change when only metadata changes, so it names
                               the trained weights; the blob digest (sha256 of the whole file) names the file.

pfx's own card keys (no prefix, like the other pfx keys):

    permissions    JSON {"allow_commercial", "allow_derivatives", "require_credit"}: booleans, each optional
                   (absent = not stated). Civitai's flags: commercial use of generated images, sharing
                   derivatives (merges, fine-tunes), credit required when sharing.
    base_family    optional: sd1 | sd2-512 | sd2-768-v | sdxl (absent: sd1, the only family before it)
    edited_from    set by `pfx card`: the sha256 digest of the file this one's metadata was edited from

Only string values; sizes are capped by `check_card_metadata`, which the concept header check runs.
No torch here; Pillow only for making a thumbnail.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import struct
from typing import Any

MODELSPEC_VERSION = "1.0.0"
IMPLEMENTATION = "pfx"
ARCHITECTURES = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2",
    "sd2-512": "stable-diffusion-v2-512",
    "sd2-768-v": "stable-diffusion-v2-768-v",
    "sdxl": "stable-diffusion-xl-v1-base",
}
DEFAULT_FAMILY = "sd1"
ADAPTER = "perfusion"
PERMISSION_FLAGS = ("allow_commercial", "allow_derivatives", "require_credit")
MAX_THUMBNAIL_CHARS = 48 * 1024  # a 128x128 JPEG is 3-6 KB; the cap leaves room for a noisy PNG
MAX_TEXT = {"modelspec.title": 200, "modelspec.trigger_phrase": 200, "modelspec.usage_hint": 1000,
            "modelspec.author": 200, "modelspec.license": 200, "modelspec.description": 4096,
            "modelspec.tags": 32 * 33, "modelspec.date": 64, "modelspec.architecture": 128,
            "modelspec.implementation": 200, "modelspec.sai_model_spec": 16}
MAX_OTHER_MODELSPEC = 4096  # keys of the spec pfx does not write (resolution, merged_from, ...)
TAG = re.compile(r"[a-z0-9][a-z0-9-]{0,31}", re.ASCII)
FAMILY = re.compile(r"[a-z0-9][a-z0-9.-]{0,31}", re.ASCII)
SPDX = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+:()\- ]{0,127}", re.ASCII)
_THUMB = re.compile(r"data:image/(jpeg|png|webp);base64,([A-Za-z0-9+/]+={0,2})", re.ASCII)
_HASH = re.compile(r"0x[0-9a-f]{64}", re.ASCII)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class CardError(ValueError):
    """A card value that cannot go into a concept header; the message says which and why."""


# --------------------------------------------------------------------------------------------------
# Reading


def base_family(meta: dict[str, str]) -> str:
    """The concept's base family: the format's own `family` (v2: sd2, sdxl), else the card's `base_family`, else
    sd1 (every v1 file)."""
    return meta.get("family") or meta.get("base_family") or DEFAULT_FAMILY


def architecture(meta: dict[str, str]) -> str:
    """The ModelSpec architecture id of a concept for its base family (unknown families keep their name)."""
    fam = base_family(meta)
    return f"{ARCHITECTURES.get(fam, fam)}/{ADAPTER}"


def permissions(meta: dict[str, str]) -> dict[str, bool]:
    raw = meta.get("permissions")
    if not raw:
        return {}
    return {k: v for k, v in json.loads(raw).items() if k in PERMISSION_FLAGS}


def split_tags(text: str) -> list[str]:
    return sorted({t.strip().lower() for t in text.split(",") if t.strip()})


def default_usage_hint(meta: dict[str, str], trigger_phrase: str) -> str:
    return (f"Write {trigger_phrase} in the prompt (a {meta.get('superclass', '?')}); Perfusion gate "
            f"beta={meta.get('beta', '?')} tau={meta.get('tau', '?')} (lower beta: stronger)")


def card_of(meta: dict[str, str]) -> dict[str, Any]:
    """The card of a concept header, old files included (missing keys get their documented defaults)."""
    name = meta.get("name", "")
    trigger_phrase = meta.get("modelspec.trigger_phrase") or name
    thumb = meta.get("modelspec.thumbnail", "")
    return {
        "title": meta.get("modelspec.title") or name,
        "description": meta.get("description", meta.get("modelspec.description", "")),
        "trigger_phrase": trigger_phrase,
        "usage_hint": meta.get("modelspec.usage_hint") or default_usage_hint(meta, trigger_phrase),
        "author": meta.get("modelspec.author", ""),
        "tags": split_tags(meta.get("modelspec.tags", "")),
        "license": meta.get("license", meta.get("modelspec.license", "")),
        "permissions": permissions(meta),
        "base_family": base_family(meta),
        "architecture": meta.get("modelspec.architecture") or architecture(meta),
        "tensors_sha256": meta.get("modelspec.hash_sha256", ""),
        "thumbnail": thumb,
        "edited_from": meta.get("edited_from", ""),
        "modelspec": "modelspec.sai_model_spec" in meta,
    }


# --------------------------------------------------------------------------------------------------
# Checking (run by perfusion_hub.concept on every header)


def _text(meta: dict[str, str], key: str, cap: int) -> None:
    v = meta[key]
    if len(v) > cap:
        raise CardError(f"metadata {key} has {len(v)} characters, over the {cap}-character limit")
    if key != "modelspec.description" and _CONTROL.search(v):
        raise CardError(f"metadata {key} holds a control character")


def check_card_metadata(meta: dict[str, str]) -> None:
    """Check the card keys a header holds (all optional). Raises CardError naming the key."""
    for key in meta:
        if key.startswith("modelspec."):
            _text(meta, key, MAX_TEXT.get(key, MAX_OTHER_MODELSPEC if key != "modelspec.thumbnail" else 1 << 30))
    thumb = meta.get("modelspec.thumbnail")
    if thumb is not None:
        if len(thumb) > MAX_THUMBNAIL_CHARS:
            raise CardError(f"metadata modelspec.thumbnail has {len(thumb)} characters, over the "
                            f"{MAX_THUMBNAIL_CHARS}-character thumbnail limit")
        m = _THUMB.fullmatch(thumb)
        if not m:
            raise CardError("metadata modelspec.thumbnail must be data:image/jpeg|png|webp;base64,<data>")
    h = meta.get("modelspec.hash_sha256")
    if h is not None and not _HASH.fullmatch(h):
        raise CardError(f"metadata modelspec.hash_sha256 {h[:80]!r} is not 0x and 64 lowercase hex digits")
    tags = meta.get("modelspec.tags")
    if tags is not None:
        bad = [t for t in split_tags(tags) if not TAG.fullmatch(t)]
        if bad or len(split_tags(tags)) > 32:
            raise CardError(f"metadata modelspec.tags: at most 32 tags of a-z, 0-9 and '-' (bad: {bad[:3]})")
    if "permissions" in meta:
        try:
            raw = json.loads(meta["permissions"])
        except (json.JSONDecodeError, RecursionError):
            raise CardError("metadata permissions is not JSON") from None
        if not isinstance(raw, dict) or set(raw) - set(PERMISSION_FLAGS) or not all(
                isinstance(v, bool) for v in raw.values()):
            raise CardError(f"metadata permissions must map {', '.join(PERMISSION_FLAGS)} to true/false")
    fam = meta.get("base_family")
    if fam is not None and not FAMILY.fullmatch(fam):
        raise CardError(f"metadata base_family {fam[:40]!r} is not a short lowercase id (e.g. sd1, sdxl)")
    ef = meta.get("edited_from")
    if ef is not None and not re.fullmatch(r"sha256:[0-9a-f]{64}", ef):
        raise CardError("metadata edited_from is not a sha256 digest")


def data_section(data: bytes) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    return data[8 + n:]


def tensor_hash(data: bytes) -> str:
    """modelspec.hash_sha256 of a safetensors file held in memory (see the module docstring)."""
    return "0x" + hashlib.sha256(data_section(data)).hexdigest()


# --------------------------------------------------------------------------------------------------
# Writing


def validate_license(text: str) -> str:
    text = text.strip()
    if text and not SPDX.fullmatch(text):
        raise CardError(f"licence {text[:60]!r} is not an SPDX id or expression (e.g. MIT, CC-BY-4.0, "
                        "CC-BY-NC-SA-4.0 OR MIT, LicenseRef-my-terms)")
    return text


def normalize_tags(tags) -> list[str]:
    out = sorted({t.strip().lower() for t in tags if t.strip()})
    bad = [t for t in out if not TAG.fullmatch(t)]
    if bad:
        raise CardError(f"tag {bad[0]!r}: tags are 1-32 characters of a-z, 0-9 and '-'")
    if len(out) > 32:
        raise CardError(f"{len(out)} tags; at most 32")
    return out


def apply_card(meta: dict[str, str], edits: dict[str, Any] | None = None) -> dict[str, str]:
    """New metadata: `meta` with the card `edits` applied and every ModelSpec key pfx writes filled in.

    edits (all optional): title, description, trigger_phrase, usage_hint, author, tags (list),
    license, permissions ({flag: bool | None}; None removes the flag), thumbnail (data URI, "" removes),
    base_family. The hash is not set here (it needs the tensor bytes): see `stamp_hash`.
    """
    out = dict(meta)
    e = dict(edits or {})
    simple = {"title": "modelspec.title", "trigger_phrase": "modelspec.trigger_phrase",
              "usage_hint": "modelspec.usage_hint", "author": "modelspec.author",
              "thumbnail": "modelspec.thumbnail"}
    for k, key in simple.items():
        if e.get(k) is not None:
            if e[k] == "":
                out.pop(key, None)
            else:
                out[key] = str(e[k])
    if e.get("description") is not None:
        out["description"] = e["description"]
    if e.get("license") is not None:
        out["license"] = validate_license(e["license"])
    if e.get("tags") is not None:
        tags = normalize_tags(e["tags"])
        if tags:
            out["modelspec.tags"] = ",".join(tags)
        else:
            out.pop("modelspec.tags", None)
    if e.get("permissions"):
        perms = permissions(out)
        for flag, v in e["permissions"].items():
            if flag not in PERMISSION_FLAGS:
                raise CardError(f"unknown permission {flag!r} (known: {', '.join(PERMISSION_FLAGS)})")
            if v is None:
                perms.pop(flag, None)
            else:
                perms[flag] = bool(v)
        if perms:
            out["permissions"] = json.dumps(perms, sort_keys=True, separators=(",", ":"))
        else:
            out.pop("permissions", None)
    if e.get("base_family"):
        out["base_family"] = e["base_family"]
    # The keys pfx always writes: the spec's MUSTs, and mirrors of pfx's own keys.
    name = out.get("name", "")
    out["modelspec.sai_model_spec"] = MODELSPEC_VERSION
    out["modelspec.architecture"] = architecture(out)
    out["modelspec.implementation"] = IMPLEMENTATION
    out.setdefault("modelspec.title", name)
    out.setdefault("modelspec.trigger_phrase", name)
    out.setdefault("modelspec.usage_hint", default_usage_hint(out, out["modelspec.trigger_phrase"]))
    for pfx_key, ms_key in (("description", "modelspec.description"), ("license", "modelspec.license"),
                            ("created", "modelspec.date")):
        if out.get(pfx_key):
            out[ms_key] = out[pfx_key]
        else:
            out.pop(ms_key, None)
    try:
        check_card_metadata(out)
    except CardError as err:
        raise CardError(str(err).replace("metadata ", "card: ", 1)) from None
    return out


def stamp_hash(meta: dict[str, str], data_bytes: bytes) -> dict[str, str]:
    """`meta` with modelspec.hash_sha256 set for a data section (only once the file is a ModelSpec file)."""
    if "modelspec.sai_model_spec" not in meta:
        return meta
    return {**meta, "modelspec.hash_sha256": "0x" + hashlib.sha256(data_bytes).hexdigest()}


def rewrite_metadata(data: bytes, metadata: dict[str, str]) -> bytes:
    """The same safetensors file with another `__metadata__`: tensor entries and the data section are
    kept byte for byte (so modelspec.hash_sha256 still matches), the header is rewritten compactly
    with sorted metadata keys and padded to 8 bytes like concept.serialize_safetensors."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    new = {"__metadata__": dict(sorted(metadata.items()))}
    for k, v in sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"][0], kv[0])):
        new[k] = v
    text = json.dumps(new, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n:]


def thumbnail_data_uri(image, max_side: int = 128) -> str:
    """A small JPEG data URI of `image` (a path or a PIL image), at most MAX_THUMBNAIL_CHARS."""
    import io

    from PIL import Image

    img = Image.open(image) if not hasattr(image, "convert") else image
    img = img.convert("RGB")
    img.thumbnail((max_side, max_side))
    for quality in (85, 70, 50, 30):
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality, optimize=True)
        uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        if len(uri) <= MAX_THUMBNAIL_CHARS:
            return uri
        img.thumbnail((img.width // 2 or 1, img.height // 2 or 1))
    raise CardError("could not make a thumbnail small enough")


def thumbnail_bytes(uri: str) -> tuple[str, bytes]:
    """(media type, bytes) of a checked thumbnail data URI."""
    m = _THUMB.fullmatch(uri)
    if not m:
        raise CardError("not a thumbnail data URI")
    try:
        return f"image/{m.group(1)}", base64.b64decode(m.group(2), validate=True)
    except binascii.Error:
        raise CardError("thumbnail base64 is malformed") from None
