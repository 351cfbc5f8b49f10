"""Helpers shared by the local-registry tests: real concept files (safetensors via numpy, no torch)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from perfusion_hub.concept import read_header_bytes

BASE = "sha256:" + "b" * 64
CORPUS = "sha256:" + "c" * 64
COV = "sha256:" + "d" * 64


def concept_bytes(name: str, version: str = "0.1.0", *, dim: int = 8, layers: int = 2, width: int = 4,
                  seed: int = 0, base_digest: str = BASE, **meta: str) -> bytes:
    rng = np.random.default_rng(seed)
    tensors = {k: rng.standard_normal(dim).astype(np.float32)
               for k in ("token_embedding", "target_input", "superclass_input")}
    for i in range(layers):
        tensors[f"value_target.down_blocks.{i}.attentions.0.transformer_blocks.0.attn2"] = (
            rng.standard_normal(width).astype(np.float32))
    md = {
        "format": "pfx.concept", "format_version": "1", "name": name, "version": version,
        "superclass": "cat", "trigger": f"<{name}>", "base_name": "toy", "base_digest": base_digest,
        "covariance_digest": COV, "corpus_digest": CORPUS, "beta": "0.7", "tau": "0.1",
        "key_lock": "superclass", "training": json.dumps({"steps": 10, "seed": seed}),
        "created": "2025-01-01T00:00:00Z", "pfx_version": "0.1.0", "description": f"a test concept {name}",
        "license": "cc-by-4.0",
    }
    md.update(meta)
    data = st_bytes(tensors, md)
    read_header_bytes(data)  # the fixture itself must be a valid concept
    return data


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


def write_concept(dirpath: Path, name: str, version: str = "0.1.0", **kw) -> Path:
    p = Path(dirpath) / f"{name.replace('/', '__')}-{version}.safetensors"
    p.write_bytes(concept_bytes(name, version, **kw))
    return p
