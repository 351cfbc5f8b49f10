"""Local registry benchmarks: FTS search latency at 100,000 installed concepts, and `verify` of
10,000 installed concepts with real SD1.5-sized (~60 KB) concept blobs.

    python -m bench.registry_local [--concepts 100000] [--verify 10000] [--queries 300]

The search index is built by writing rows directly (placeholder digests: search never reads blobs).
The verify home holds real, distinct, valid concept files recorded through Home.record_install.
Results are printed and saved to bench/results/registry-local-<yyyy-mm-dd>.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import sqlite3
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

from perfusion_hub.concept import read_header_bytes
from registry.home import Home
from registry.index import now_iso
from registry.local_ops import verify
from registry.manifest import build_manifest
from tests.kit.concepts import SD15_WIDTHS, concept_bytes

ADJ = ["red", "grey", "fluffy", "tiny", "old", "rusty", "golden", "striped", "wooden", "vintage", "blue", "green", "happy", "sleepy", "neon", "marble", "velvet", "glass", "paper", "steel", "copper", "silver", "dark", "bright", "frozen", "sunny", "misty", "wild", "calm", "brave"]
NOUN = ["cat", "dog", "chair", "lamp", "teapot", "mug", "robot", "car", "bike", "house", "tree", "flower", "bird", "fish", "horse", "owl", "fox", "bear", "sofa", "vase", "clock", "guitar", "boot", "hat", "jacket", "bag", "cup", "bowl", "plant", "statue"]
WORDS = ["portrait", "studio", "photo", "painting", "sketch", "watercolor", "toy", "sculpture", "object", "pet", "animal", "furniture", "kitchen", "garden", "outdoor", "indoor", "retro", "modern", "minimal", "ornate", "handmade", "antique", "cartoon", "realistic"]
BASE = "sha256:" + hashlib.sha256(b"bench-base").hexdigest()


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version, "platform": platform.platform(),
            "load_avg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


# --------------------------------------------------------------------------------------------------
# search


def fake_digest(i: int, salt: str) -> str:
    return "sha256:" + hashlib.sha256(f"{salt}{i}".encode()).hexdigest()


def build_search_index(home: Home, n: int, rng: random.Random) -> float:
    t0 = time.perf_counter()
    with home.index.write() as c:
        for i in range(n):
            a, b = rng.choice(ADJ), rng.choice(NOUN)
            name = f"{a}-{b}-{i}" if i % 10 else f"user{i % 997}/{a}-{b}-{i}"
            manifest = fake_digest(i, "m")
            row = {
                "name": name, "version": f"0.{i % 7 + 1}.0", "manifest": manifest, "remote": "bench",
                "installed_at": now_iso(), "pinned": 0, "yanked": 0, "concept": fake_digest(i, "c"),
                "size": 60_000, "base_name": "sd15", "base_digest": BASE, "superclass": b,
                "trigger": f"<{a}-{b}-{i}>",
                "description": f"a {a} {b} " + " ".join(rng.sample(WORDS, 4)),
                "tags": " ".join(rng.sample(WORDS, 3)), "license": "cc-by-4.0",
            }
            home.index.insert_installed(c, row, [{"digest": row["concept"], "size": 60_000, "role": "concept"}])
    home.index.conn.execute("INSERT INTO installed_fts(installed_fts) VALUES ('optimize')")
    home.index.conn.commit()
    return time.perf_counter() - t0


def bench_search(home: Home, queries: int, rng: random.Random) -> dict:
    qs = []
    for i in range(queries):
        kind = i % 5
        if kind == 0:
            qs.append(rng.choice(NOUN))  # one common word: ~3% of the index matches
        elif kind == 1:
            qs.append(f"{rng.choice(ADJ)} {rng.choice(NOUN)}")
        elif kind == 2:
            qs.append(rng.choice(NOUN)[:3])  # prefix as typed
        elif kind == 3:
            qs.append(f"{rng.choice(ADJ)}-{rng.choice(NOUN)}-{rng.randrange(100_000)}")  # exact name
        else:
            qs.append(f"{rng.choice(WORDS)} {rng.choice(NOUN)}")
    for q in qs[:20]:
        home.search(q)  # warm the page cache
    times, hits = [], []
    for q in qs:
        t = time.perf_counter()
        r = home.search(q, limit=20)
        times.append((time.perf_counter() - t) * 1000)
        hits.append(len(r))
    worst = sorted(zip(times, qs), reverse=True)[:3]
    return {"queries": len(qs), "p50_ms": round(statistics.median(times), 3), "p95_ms": round(pct(times, 95), 3),
            "max_ms": round(max(times), 3), "mean_hits": round(statistics.mean(hits), 2),
            "slowest": [{"ms": round(t, 2), "query": q} for t, q in worst]}


# --------------------------------------------------------------------------------------------------
# verify


def concept_file(i: int) -> bytes:
    """A distinct, valid SD1.5-sized concept (the three 768-d vectors and 16 attn2 value targets, 14,784 fp32
    values in all, ~59 KB)."""
    return concept_bytes(f"bench-{i}", "1.0.0", seed=i, dim=768, widths=SD15_WIDTHS, base_digest=BASE,
                         base_name="sd15", covariance_digest=fake_digest(0, "cov"),
                         corpus_digest=fake_digest(0, "corpus"), training=json.dumps({"steps": 400, "seed": i}))


def build_verify_home(home: Home, n: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    total = 0
    for i in range(n):
        data = concept_file(i)
        total += len(data)
        digest, size = home.store.put_bytes(data)
        m = build_manifest(read_header_bytes(data), digest, size)
        home.record_install(m, remote="bench")
    return time.perf_counter() - t0, total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concepts", type=int, default=100_000)
    ap.add_argument("--verify", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rng = random.Random(1)
    result: dict = {"date": date.today().isoformat(), "machine": machine()}
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="pfx-bench-") as tmp:
        home = Home.open(Path(tmp) / "search-home")
        build_s = build_search_index(home, args.concepts, rng)
        result["search"] = {"indexed": args.concepts, "build_s": round(build_s, 2), **bench_search(home, args.queries, rng),
                            "goal_p50_ms": 10}
        print(json.dumps(result["search"], indent=2), flush=True)
        home.close()

        vhome = Home.open(Path(tmp) / "verify-home")
        build_s, total = build_verify_home(vhome, args.verify)
        runs = []
        for _ in range(3):
            rep = verify(vhome)
            assert rep["ok"], {k: rep[k][:3] for k in ("missing", "corrupt", "bad_manifest", "index_mismatch")}
            runs.append(rep["seconds"])
        result["verify"] = {
            "installed": args.verify, "objects_checked": rep["checked"], "bytes": rep["bytes"],
            "concept_blob_bytes": round(total / args.verify), "build_s": round(build_s, 2),
            "seconds_runs": runs, "seconds_best": min(runs), "seconds_median": statistics.median(runs),
            "goal_s": 5, "note": "page cache warm after the build (the common case right after installs)",
        }
        print(json.dumps(result["verify"], indent=2), flush=True)
        vhome.close()
    result["machine"]["load_avg_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"registry-local-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
