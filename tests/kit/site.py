"""Synthetic registries for the static-catalogue tests and bench/site.py: N small valid concepts with
cards, published straight into a file:// remote (no home, no SQLite: publish_manifest per concept)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import struct
from pathlib import Path

from perfusion_hub.card import apply_card, rewrite_metadata, stamp_hash
from perfusion_hub.concept import read_header_bytes
from registry.manifest import build_manifest, sha256_digest
from registry.publish import publish_manifest
from registry.remotes.file import FileRemote
from tests.kit.concepts import concept_bytes

ADJ = ["orange", "red", "blue", "green", "tabby", "spotted", "striped", "fluffy", "tiny", "giant", "old", "young", "shiny", "matte", "wooden", "velvet", "golden", "silver", "painted", "rusty", "calm", "wild", "sleepy", "happy", "grumpy", "curious", "brave", "shy", "noble", "quiet"]
NOUN = ["cat", "dog", "chair", "cup", "ball", "tree", "lamp", "sofa", "mug", "kitten", "puppy", "stool", "vase", "teapot", "bench", "crate", "bowl", "clock", "robot", "dragon", "bird", "fox", "owl", "rabbit"]
SUPER = ("cat", "dog", "chair", "cup", "ball", "tree")
LICENSES = ("MIT", "CC-BY-4.0", "CC-BY-NC-4.0", "Apache-2.0", "")
HOSTILE = ('<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"> & "quotes" '
           "</div></main><b>not bold</b>")


def png_bytes(seed: int) -> bytes:
    from PIL import Image

    img = Image.new("RGB", (32, 32), (seed * 37 % 256, seed * 91 % 256, 120))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def carded_bytes(name: str, version: str, seed: int, superclass: str, edits: dict) -> bytes:
    data = concept_bytes(name, version, seed=seed, superclass=superclass,
                         description=edits.get("description", ""))
    meta = apply_card(dict(read_header_bytes(data).metadata), edits)
    (n,) = struct.unpack("<Q", data[:8])
    return rewrite_metadata(data, stamp_hash(meta, data[8 + n:]))


def make_signer():
    """A throwaway ed25519 signer (registry.signing.Signer) for signed test publishes."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from registry.signing import Signer, _raw_public, keyid_of

    k = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    return Signer("test", keyid_of(_raw_public(k.public_key())), k)


def publish_one(remote, name: str, version: str, seed: int, *, superclass: str = "cat", edits: dict | None = None,
                preview: bool = False, signer=None):
    edits = dict(edits or {})
    data = carded_bytes(name, version, seed, superclass, edits)
    blobs = {sha256_digest(data): data}
    previews = []
    if preview:
        p = png_bytes(seed)
        blobs[sha256_digest(p)] = p
        previews.append((sha256_digest(p), len(p), "image/png"))
    m = build_manifest(read_header_bytes(data), sha256_digest(data), len(data), previews=previews)
    sigs = [(signer.keyid, signer.sign(m.digest))] if signer else []
    publish_manifest(remote, m, blobs.__getitem__, signatures=sigs)
    return m


def synthetic_registry(root: Path, n: int, *, seed: int = 0, special: bool = True) -> FileRemote:
    """`n` concepts (plus, with `special`, a findable 'zebra-quokka' with a preview and a hostile one)."""
    root.mkdir(parents=True, exist_ok=True)
    remote = FileRemote("synthetic", root)
    rng = random.Random(seed)
    for i in range(n):
        a, b = rng.choice(ADJ), rng.choice(NOUN)
        sup = rng.choice(SUPER)
        lic = rng.choice(LICENSES)
        perms = {"allow_commercial": rng.random() < 0.5, "require_credit": rng.random() < 0.5}
        edits = {"title": f"{a.title()} {b} no. {i}", "description": f"a {a} {b}, concept number {i} "
                 f"({rng.choice(ADJ)} {rng.choice(ADJ)} {sup})", "license": lic, "permissions": perms,
                 "tags": [a, b]}
        publish_one(remote, f"c{i:05d}-{a}-{b}", "1.0.0", i, superclass=sup, edits=edits, preview=False)
    if special:
        publish_one(remote, "zebra-quokka", "1.0.0", 10**6, superclass="cat", preview=True,
                    edits={"title": "Zebra Quokka", "description": "a striped marsupial, trained on six photos",
                           "license": "CC-BY-4.0", "permissions": {"allow_commercial": True,
                                                                    "allow_derivatives": False},
                           "trigger_phrase": "zebra-quokka", "author": "Ann"})
        publish_one(remote, "zebra-quokka", "1.1.0", 10**6 + 1, superclass="cat", preview=True, signer=make_signer(),
                    edits={"title": "Zebra Quokka", "description": "a striped marsupial, trained on nine photos",
                           "license": "CC-BY-4.0", "permissions": {"allow_commercial": True,
                                                                    "allow_derivatives": False}})
        publish_one(remote, "evil-html", "1.0.0", 10**6 + 2, superclass="cat",
                    edits={"title": "<i>Evil</i> <script>window.pwned = 3</script>", "description": HOSTILE,
                           "usage_hint": "<b>x</b>"})
    return remote


@contextlib.contextmanager
def no_fsync():
    """Tests and the bench's setup write thousands of small files; durability is not what they test."""
    real = os.fsync
    os.fsync = lambda fd: None
    try:
        yield
    finally:
        os.fsync = real


def file_reader(root: Path):
    """`get(path under site/)` for registry.site.query_plan over a file:// remote's folder."""
    def get(path: str) -> bytes | None:
        p = Path(root) / "site" / path
        return p.read_bytes() if p.is_file() else None

    return get


def dump(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
