"""Registry benchmarks (not a test): python -m bench.registry [--concepts 1000] [--sizes 10000,100000]

1. Install N ~60 KB concepts from a loopback moto S3 server with `pfx` (registry.install: resolve,
   verify while streaming, atomic store writes, SQLite records) vs a bare parallel boto3 download
   of exactly the objects pfx fetches (package doc, manifest, blob per concept) at the same
   concurrency, written to plain files without any checks. Goal: pfx <= 1.25x bare.
2. Resolve latency of an exact version in synthetic file:// registries of 10,000 and 100,000
   concepts written directly (package doc + manifest + claim per concept): must not grow with size.

Results go to bench/results/registry-<yyyy-mm-dd>.json with the machine described.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SERVER = """
import sys
from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import WSGIRequestHandler, make_server
class Q(WSGIRequestHandler):
    def log_request(self, *a, **k): pass
make_server("127.0.0.1", int(sys.argv[1]), DomainDispatcherApplication(create_backend_app), threaded=True,
            request_handler=Q).serve_forever()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server() -> tuple[subprocess.Popen, str]:
    """moto in its own process (threaded), so the server does not share the client's GIL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, url
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto server did not start")


def populate(url: str, bucket: str, n: int, tmp: Path, workers: int) -> list:
    from registry.home import Home
    from registry.publish import publish_manifest
    from registry.remotes import open_remote
    from tests.kit.concepts import add_concept

    home = Home.open(tmp / "publisher", offline=False)
    ms = [add_concept(home, tmp, f"bench-{i:05d}", "1.0.0", seed=i, big=True) for i in range(n)]
    rem = open_remote({"name": "b", "url": f"s3://{bucket}/reg", "endpoint_url": url}, offline=False, max_pool=workers)
    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(lambda m: publish_manifest(rem, m, home.store.read_bytes), ms))
    return ms


def bench_pfx(url: str, bucket: str, ms: list, tmp: Path, workers: int, run: int) -> dict:
    from registry.home import Home
    from registry.install import install
    from registry.remotes import open_remote

    home = Home.open(tmp / f"pfx-{run}", offline=False)
    rem = open_remote({"name": "b", "url": f"s3://{bucket}/reg", "endpoint_url": url}, offline=False,
                      max_pool=workers)
    t = time.perf_counter()
    res = install(home, [m.ref() for m in ms], workers=workers, remotes=[rem])
    dt = time.perf_counter() - t
    assert len(res) == len(ms) and all(r["status"] == "installed" for r in res)
    return {"seconds": dt, "requests": rem.requests}


def bench_bare(url: str, bucket: str, ms: list, tmp: Path, workers: int, run: int) -> dict:
    import boto3
    from botocore.config import Config

    from registry.remotes.base import blob_key, manifest_key, package_key

    out = tmp / f"bare-{run}"
    out.mkdir()
    s3 = boto3.client("s3", endpoint_url=url, config=Config(max_pool_connections=workers,
                                                            s3={"addressing_style": "path"}))
    keys = []
    for m in ms:
        keys += [package_key(m.name), manifest_key(m.digest), blob_key(m.concept["digest"])]

    def get(i_key):
        i, key = i_key
        body = s3.get_object(Bucket=bucket, Key="reg/" + key)["Body"].read()
        (out / str(i)).write_bytes(body)

    t = time.perf_counter()
    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(get, enumerate(keys)))
    return {"seconds": time.perf_counter() - t, "requests": len(keys)}


# --------------------------------------------------------------------------------------------------


def synthetic_registry(root: Path, n: int) -> None:
    """A file:// registry with n concepts, written directly (placeholder blob digests)."""
    import hashlib

    from registry.documents import PackageDoc, make_claim
    from registry.manifest import canonical_json, sha256_digest
    from registry.remotes.base import claim_key, manifest_key, package_key

    def write(key: str, data: bytes) -> None:
        p = root / key
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)

    for i in range(n):
        name = f"syn-{i:06d}"
        fake = "sha256:" + hashlib.sha256(name.encode()).hexdigest()
        raw = {
            "schema": "pfx.manifest/1", "name": name, "version": "1.0.0",
            "concept": {"digest": fake, "size": 60000, "media_type": "application/vnd.pfx.concept.v1+safetensors"},
            "previews": [], "companions": [], "base": {"name": "sd15", "digest": "sha256:" + "b" * 64},
            "covariance_digest": "sha256:" + "d" * 64, "corpus_digest": "sha256:" + "c" * 64,
            "trigger": f"<{name}>", "superclass": "cat", "beta": 0.7, "tau": 0.1, "key_lock": "superclass",
            "description": f"synthetic concept {i}", "tags": [], "license": "", "provenance": {},
            "created": "2026-01-01T00:00:00Z", "pfx_version": "0.1.0",
        }
        data = canonical_json(raw)
        d = sha256_digest(data)
        write(manifest_key(d), data)
        write(claim_key(name, "1.0.0"), make_claim(name, "1.0.0", d, "2026-01-01T00:00:00Z"))
        pkg = PackageDoc(name, {"1.0.0": {"manifest": d, "yanked": False, "published": "2026-01-01T00:00:00Z"}},
                         {"latest": "1.0.0"}, {"version": "1.0.0", "description": raw["description"]})
        write(package_key(name), pkg.to_bytes())


def bench_resolve(tmp: Path, n: int, samples: int = 300) -> dict:
    from registry.names import parse_ref
    from registry.remotes.file import FileRemote
    from registry.resolve import resolve_on

    root = tmp / f"syn-{n}"
    t = time.perf_counter()
    synthetic_registry(root, n)
    build_s = time.perf_counter() - t
    rem = FileRemote("syn", root)
    rng = random.Random(n)
    lat = []
    for _ in range(samples):
        ref = parse_ref(f"syn-{rng.randrange(n):06d}@1.0.0")
        t = time.perf_counter()
        resolve_on(rem, ref)
        lat.append((time.perf_counter() - t) * 1000)
    lat.sort()
    return {"concepts": n, "build_seconds": round(build_s, 1), "samples": samples,
            "p50_ms": round(statistics.median(lat), 3), "p95_ms": round(lat[int(0.95 * len(lat))], 3),
            "max_ms": round(lat[-1], 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concepts", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sizes", default="10000,100000")
    args = ap.parse_args()
    os.environ.update({"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"})
    import boto3
    import moto

    result: dict = {"date": date.today().isoformat(), "machine": {
        "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
        "boto3": boto3.__version__, "moto": moto.__version__,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "note": "2 cores shared with other work; runs alternate bare/pfx so load drift hits both"}}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        proc, url = start_server()
        try:
            bucket = "pfx-bench"
            boto3.client("s3", endpoint_url=url).create_bucket(Bucket=bucket)
            t = time.perf_counter()
            ms = populate(url, bucket, args.concepts, tmp, args.workers)
            populate_s = time.perf_counter() - t
            size = sum(m.concept["size"] for m in ms) / len(ms)
            runs = []
            for run in range(args.runs):  # alternate so drift hits both equally
                b = bench_bare(url, bucket, ms, tmp, args.workers, run)
                p = bench_pfx(url, bucket, ms, tmp, args.workers, run)
                runs.append({"pfx_s": round(p["seconds"], 3), "bare_s": round(b["seconds"], 3),
                             "ratio": round(p["seconds"] / b["seconds"], 3), "pfx_requests": p["requests"],
                             "bare_requests": b["requests"]})
                print(f"run {run}: pfx {p['seconds']:.2f}s ({p['requests']} req)  bare {b['seconds']:.2f}s "
                      f"({b['requests']} req)  ratio {p['seconds'] / b['seconds']:.2f}", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
        result["install"] = {
            "concepts": args.concepts, "concept_bytes_avg": int(size), "workers": args.workers,
            "server": "moto 5 (threaded werkzeug, separate process, loopback)", "publish_seconds": round(populate_s, 1),
            "runs": runs, "ratio_median": round(statistics.median(r["ratio"] for r in runs), 3),
            "goal": "pfx <= 1.25x bare",
        }
        result["resolve_exact"] = []
        for n in [int(x) for x in args.sizes.split(",") if x]:
            r = bench_resolve(tmp, n)
            print(f"resolve exact @ {n} concepts: p50 {r['p50_ms']} ms, p95 {r['p95_ms']} ms", flush=True)
            result["resolve_exact"].append(r)
    out = ROOT / "bench" / "results" / f"registry-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
