"""Valid v1 concept files without torch (numpy and a deterministic safetensors writer), and homes and
registries that hold them, for the registry and CLI tests and bench/.

`concept_bytes` is the one generator: `dim=768, widths=SD15_WIDTHS` (or `big=True` in `add_concept`)
gives a ~60 KB file shaped like an SD1.5 concept; tests use tiny ones. The same arguments always give
the same bytes (so the same digest).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from perfusion_hub.concept import read_header_bytes

BASE = "sha256:" + "b" * 64
CORPUS = "sha256:" + "c" * 64
COV = "sha256:" + "d" * 64
SD15_WIDTHS = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320]
# JSON nested deeply enough to exhaust Python's recursion, in a few KB (under every size cap).
DEEP = b"[" * 5000 + b"]" * 5000
DEEP_OBJ = b'{"a":' * 5000 + b"1" + b"}" * 5000


def st_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """Deterministic safetensors bytes (safetensors' own writer orders metadata at random, which
    would make every build of the same concept a different digest)."""
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    pos, blobs = 0, []
    for k, v in tensors.items():
        raw = np.ascontiguousarray(v, dtype="<f4").tobytes()
        header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [pos, pos + len(raw)]}
        pos += len(raw)
        blobs.append(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def concept_bytes(name: str, version: str = "0.1.0", *, seed: int = 0, dim: int = 8, layers: int = 2,
                  width: int = 8, widths: list[int] | None = None, superclass: str = "cat",
                  description: str | None = None, base_digest: str = BASE, **meta: str) -> bytes:
    """A valid concept: seeded random vectors, `layers` value targets of `width` (or one per `widths`
    entry); `description` defaults to "a test concept NAME"; `meta` overrides any other metadata field."""
    rng = np.random.default_rng(seed)
    tensors = {k: rng.standard_normal(dim).astype(np.float32)
               for k in ("token_embedding", "target_input", "superclass_input")}
    for i, w in enumerate(widths or [width] * layers):
        tensors[f"value_target.down_blocks.{i}.attentions.0.transformer_blocks.0.attn2"] = (
            rng.standard_normal(w).astype(np.float32))
    md = {
        "format": "pfx.concept", "format_version": "1", "name": name, "version": version,
        "superclass": superclass, "trigger": f"<{name.split('/')[-1]}>", "base_name": "toy",
        "base_digest": base_digest, "covariance_digest": COV, "corpus_digest": CORPUS, "beta": "0.7", "tau": "0.1",
        "key_lock": "superclass", "training": json.dumps({"steps": 10, "seed": seed}),
        "created": "2026-01-01T00:00:00Z", "pfx_version": "0.1.0",
        "description": f"a test concept {name}" if description is None else description, "license": "cc-by-4.0",
    }
    md.update(meta)
    data = st_bytes(tensors, md)
    read_header_bytes(data)  # the fixture itself must be a valid concept
    return data


def write_concept(dirpath: str | os.PathLike, name: str, version: str = "0.1.0", **kw) -> Path:
    """Write concept_bytes(name, version, **kw) to a file in `dirpath`; return its path."""
    p = Path(dirpath) / f"{name.replace('/', '__')}-{version}.safetensors"
    p.write_bytes(concept_bytes(name, version, **kw))
    return p


def add_concept(home, tmp: str | os.PathLike, name: str, version: str, *, seed: int = 0,
                description: str = "", covariance: bytes | None = None, big: bool = False, tags=()):
    """Write a concept file and add it to `home` (as `pfx train` would); returns its Manifest.
    `big`: SD1.5-sized (~60 KB); `covariance`: bytes stored and attached as the concept's covariance."""
    data = concept_bytes(name, version, seed=seed, description=description,
                         **({"dim": 768, "widths": SD15_WIDTHS} if big else {}))
    p = Path(tmp) / f"{name.replace('/', '_')}-{version}-{seed}.safetensors"
    p.write_bytes(data)
    cov = None
    if covariance is not None:
        d, s = home.store.put_bytes(covariance)
        cov = {"digest": d, "size": s, "base_digest": BASE, "corpus_digest": CORPUS}
    return home.add_concept_file(p, covariance=cov, description=description, tags=list(tags))


def publish_big_concepts(pub_dir: str | os.PathLike, tmp: str | os.PathLike, url: str, endpoint: str, n: int,
                         prefix: str = "obj"):
    """Open a publisher home at `pub_dir` with the s3 remote `url` (at `endpoint`), add `n` big concepts
    `{prefix}0`.. at 1.0.0 (seeds 0..) and publish them; returns (home, manifests). The home stays open."""
    from registry.home import Home
    from registry.publish import publish

    pub = Home.open(pub_dir, offline=False)
    pub.add_remote("s3", url, endpoint_url=endpoint)
    ms = [add_concept(pub, tmp, f"{prefix}{i}", "1.0.0", seed=i, big=True) for i in range(n)]
    for m in ms:
        publish(pub, m.ref())
    return pub, ms


def file_registry_with_cat(tmp_path: Path, *, big: bool = False):
    """A file:// registry at tmp_path/reg with cat@1.0.0 published from tmp_path/pub; returns (url,
    its remote, the manifest)."""
    from registry.home import Home
    from registry.publish import publish
    from registry.remotes import open_remote

    url = (tmp_path / "reg").as_uri()
    pub = Home.open(tmp_path / "pub", offline=False)
    pub.add_remote("r", url, default=True)
    m = add_concept(pub, tmp_path, "cat", "1.0.0", seed=1, big=big)
    publish(pub, "cat")
    remote = open_remote(pub.get_remote("r"), offline=False)
    pub.close()
    return url, remote, m


def publish_worker(home_dir: str, name: str, version: str, seed: str, url: str, endpoint: str) -> None:
    """Run in a subprocess by race tests: make a concept, publish it, print one JSON line."""
    import sys

    from registry.home import Home
    from registry.publish import publish

    home = Home.open(home_dir, offline=False)
    add_concept(home, home_dir, name, version, seed=int(seed))
    home.add_remote("race", url, endpoint_url=endpoint, single_writer=False)
    try:
        res = publish(home, f"{name}@{version}", to="race")
        print(json.dumps({"ok": True, "manifest": res["manifest"], "resumed": res["resumed"]}))
    except Exception as e:  # noqa: BLE001 - reported to the parent test
        print(json.dumps({"ok": False, "error": type(e).__name__, "message": str(e)}))
    sys.stdout.flush()
