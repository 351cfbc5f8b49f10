"""Valid v1 concept files without torch (safetensors.numpy), for registry tests and bench/registry.py.

`dim=768, layers=16` gives a ~60 KB file shaped like an SD1.5 concept; tests use tiny ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

BASE_DIGEST = "sha256:" + "b" * 64
CORPUS_DIGEST = "sha256:" + "c" * 64
SD15_WIDTHS = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320]


def concept_bytes(name: str, version: str, *, seed: int = 0, dim: int = 8, layers: int = 2,
                  description: str = "", superclass: str = "cat", widths: list[int] | None = None) -> bytes:
    from safetensors.numpy import save

    rng = np.random.default_rng(seed)
    widths = widths or ([8] * layers)
    tensors = {
        "token_embedding": rng.standard_normal(dim, dtype=np.float32),
        "target_input": rng.standard_normal(dim, dtype=np.float32),
        "superclass_input": rng.standard_normal(dim, dtype=np.float32),
    }
    for i, w in enumerate(widths):
        tensors[f"value_target.down.{i}.attn2"] = rng.standard_normal(w, dtype=np.float32)
    meta = {
        "format": "pfx.concept", "format_version": "1", "name": name, "version": version,
        "superclass": superclass, "trigger": f"<{name.split('/')[-1]}>", "base_name": "toy",
        "base_digest": BASE_DIGEST, "covariance_digest": "sha256:" + "d" * 64, "corpus_digest": CORPUS_DIGEST,
        "beta": "0.7", "tau": "0.1", "key_lock": "superclass", "training": json.dumps({"steps": 10, "seed": seed}),
        "created": "2026-01-01T00:00:00Z", "pfx_version": "0.1.0", "description": description,
    }
    return save(tensors, metadata=meta)


def sd15_concept_bytes(name: str, version: str, seed: int = 0) -> bytes:
    return concept_bytes(name, version, seed=seed, dim=768, widths=SD15_WIDTHS)


def add_concept(home, tmp: str | os.PathLike, name: str, version: str, *, seed: int = 0,
                description: str = "", covariance: bytes | None = None, big: bool = False, tags=()):
    """Write a concept file and add it to `home` (as `pfx train` would); returns its Manifest."""
    data = sd15_concept_bytes(name, version, seed) if big else concept_bytes(name, version, seed=seed,
                                                                              description=description)
    p = Path(tmp) / f"{name.replace('/', '_')}-{version}-{seed}.safetensors"
    p.write_bytes(data)
    cov = None
    if covariance is not None:
        d, s = home.store.put_bytes(covariance)
        cov = {"digest": d, "size": s, "base_digest": BASE_DIGEST, "corpus_digest": CORPUS_DIGEST}
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
