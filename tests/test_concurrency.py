"""Many real `pfx` processes on one home, and several publishers on one remote.

* 8 workers (threads, each running a seeded sequence of real `pfx` subprocesses, so up to 8 processes
  at once) mix install / remove / gc --grace 0 / verify / render on one home. Properties: every
  install succeeds even while gc deletes with no grace period (pending rows protect it), no process
  crashes, `stable` concepts (never removed) are all installed and intact at the end (zero lost),
  every render writes a valid PNG, and the home verifies clean.
* 4 `pfx publish` processes (three versions of one package, one other package) plus a concurrent
  `pfx registry compact`, through a proxy failing 15 % of requests: every version is published and
  indexed, and the remote index is consistent.
"""

from __future__ import annotations

import json
import random
import threading
import uuid
from pathlib import Path

import pytest

from registry.home import Home
from registry.publish import publish
from tests.conceptgen import add_concept
from tests.enginekit import needs_toy
from tests.faultproxy import chaos_proxy, home_problems, pfx, remote_problems, start_pfx
from tests.s3server import S3_ENV, make_bucket, moto_server

# Expected exit codes per operation under concurrency (3: a concurrent remove got there first).
ALLOWED = {"install": {0}, "remove": {0, 3}, "gc": {0}, "verify": {0}, "render": {0}}


def build_file_registry(tmp: Path, *, churn: int, stable: int, render_concept=None) -> tuple[str, list, list]:
    """A file:// registry with `churn` + `stable` small concepts (and a toy-base concept to render)."""
    reg = tmp / "registry"
    reg.mkdir()
    url = reg.as_uri()
    pub = Home.open(tmp / "pub")
    pub.add_remote("files", url)
    churn_ms = [add_concept(pub, tmp, f"churn{i}", "1.0.0", seed=i) for i in range(churn)]
    stable_ms = [add_concept(pub, tmp, f"stable{i}", "1.0.0", seed=100 + i) for i in range(stable)]
    if render_concept is not None:
        stable_ms.append(render_concept(pub))
    for m in churn_ms + stable_ms:
        publish(pub, m.ref(), to="files")
    pub.close()
    return url, churn_ms, stable_ms


def run_home_mix(tmp: Path, url: str, churn: list, stable: list, *, workers: int = 8, ops: int = 5,
                 seed: int = 0, renders: int = 2, renderable: str | None = None) -> dict:
    home = tmp / "shared-home"
    pfx(home, "remote", "add", "files", url, check=True)
    pfx(home, "install", *[m.ref() for m in stable], check=True)
    out = {"operations": 0, "by_op": {}, "problems": [], "renders_ok": 0}
    lock = threading.Lock()

    def worker(w: int) -> None:
        rng = random.Random(seed * 1000 + w)
        plan = []
        for _ in range(ops):
            plan.append(rng.choices(["install", "remove", "gc", "verify"], weights=[4, 3, 2, 1])[0])
        if renderable and w < renders:
            plan.insert(rng.randrange(len(plan) + 1), "render")
        for op in plan:
            if op == "install":
                names = rng.sample(churn, rng.randint(1, 3)) + rng.sample(stable, 1)
                args = ["install", *[m.ref() for m in names]]
            elif op == "remove":
                args = ["remove", rng.choice(churn).name]
            elif op == "gc":
                args = ["gc", "--grace", "0"]
            elif op == "verify":
                args = ["verify"]
            else:
                png = tmp / f"render-{w}.png"
                args = ["render", f"a photo of {renderable}", "--steps", "2", "-o", str(png)]
            p = pfx(home, *args, timeout=300)
            with lock:
                out["operations"] += 1
                out["by_op"][op] = out["by_op"].get(op, 0) + 1
                if p.returncode not in ALLOWED[op] or "Traceback" in p.stderr:
                    out["problems"].append(f"worker {w} {' '.join(args[:3])}: exit {p.returncode}: {p.stderr[-500:]}")
                elif op == "render":
                    data = png.read_bytes()
                    if data[:8] != b"\x89PNG\r\n\x1a\n":
                        out["problems"].append(f"worker {w}: render wrote no PNG")
                    else:
                        out["renders_ok"] += 1

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["problems"] += home_problems(home)
    got = {r["manifest"] for r in json.loads(pfx(home, "list", "--json", check=True).stdout)}
    lost = [m.ref() for m in stable if m.digest not in got]
    out["lost"] = len(lost)
    out["problems"] += [f"lost {r}" for r in lost]
    p = pfx(home, "install", *[m.ref() for m in churn + stable])
    if p.returncode != 0:
        out["problems"].append(f"final install failed: {p.stderr[-300:]}")
    out["problems"] += home_problems(home)
    return out


def _render_concept(toy_base, toy_cov, tmp: Path):
    from perfusion_hub.concept import save_concept
    from tests.enginekit import synthetic_concept

    def make(pub: Home):
        c = synthetic_concept(toy_base, toy_cov, "paintcat", "cat", seed=1)
        path = save_concept(c, tmp / "paintcat.safetensors")
        d, s = pub.store.put_bytes(toy_cov.to_bytes())
        return pub.add_concept_file(path, covariance={"digest": d, "size": s, "base_digest": toy_base.digest,
                                                      "corpus_digest": toy_cov.corpus_digest})
    return make


@needs_toy
def test_eight_processes_mix_install_remove_gc_render_on_one_home(tmp_path, toy_base, toy_cov):
    url, churn, stable = build_file_registry(tmp_path, churn=6, stable=3,
                                             render_concept=_render_concept(toy_base, toy_cov, tmp_path))
    r = run_home_mix(tmp_path, url, churn, stable, workers=8, ops=5, seed=0, renders=2, renderable="paintcat")
    assert r["problems"] == [], r["problems"]
    assert r["lost"] == 0 and r["renders_ok"] == 2
    assert r["by_op"].get("gc", 0) >= 2 and r["by_op"].get("remove", 0) >= 2, r["by_op"]


def test_reinstall_keeps_blobs_already_in_store_from_a_concurrent_gc(tmp_path, monkeypatch):
    """A removed version's blobs stay in the store until gc; reinstalling it skips their download.
    A gc landing between "the blob is here" and the record must not take them (the CI failure of
    the mix above: `concept blob ... is not in the store`). The gc runs at exactly that moment, from
    another Home on the same directory, as a second process would."""
    from registry.install import install
    from registry.local_ops import gc

    url, churn, _ = build_file_registry(tmp_path, churn=1, stable=0)
    home = Home.open(tmp_path / "h")
    home.add_remote("files", url)
    m = churn[0]
    install(home, [m.ref()])
    home.remove(m.name, m.version)
    digests = [b["digest"] for b in m.blobs()]
    assert all(home.store.has(d) for d in digests)
    other = Home.open(tmp_path / "h")
    real_has, ran = home.store.has, []

    def has_then_gc(digest):
        here = real_has(digest)
        if not ran:
            ran.append(gc(other, grace_s=0))
        return here

    monkeypatch.setattr(home.store, "has", has_then_gc)
    [row] = install(home, [m.ref()])
    assert ran and ran[0]["removed"] == 0, ran
    assert row["status"] == "installed" and all(real_has(d) for d in digests)
    other.close()
    home.close()


# --------------------------------------------------------------------------------------------------
# Publishers on one remote


@pytest.fixture(scope="module")
def s3_url():
    with moto_server() as url:
        yield url


@pytest.fixture
def aws_env(monkeypatch):
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent-pfx-test")


def run_publishers(s3_url: str, tmp: Path, *, seed: int = 0, rate: float = 0.15, same_package: int = 3,
                   other: int = 1) -> dict:
    bucket = f"pubs-{uuid.uuid4().hex[:12]}"
    make_bucket(s3_url, bucket)
    url = f"s3://{bucket}/reg"
    jobs = [("shared", f"1.{i}.0") for i in range(same_package)] + [(f"solo{i}", "1.0.0") for i in range(other)]
    out = {"publishers": len(jobs), "operations": 0, "problems": [], "faults_injected": 0}
    with chaos_proxy(s3_url) as (proxy, state):
        homes = []
        for i, (name, version) in enumerate(jobs):
            home = tmp / f"p{seed}-{i}"
            h = Home.open(home, offline=False)
            add_concept(h, home, name, version, seed=seed * 100 + i, big=True)
            h.close()
            pfx(home, "remote", "add", "s3", url, "--endpoint-url", proxy, check=True)
            homes.append(home)
        state.chaos = (random.Random(seed), rate, ("503", "500", "reset", "drop", "truncate", "corrupt"))
        state.chaos_match = lambda m, p: "/probe/" not in p
        procs = [start_pfx(h, "publish", f"{n}@{v}") for h, (n, v) in zip(homes, jobs)]
        procs.append(start_pfx(homes[0], "registry", "compact"))
        results = [(p, *p.communicate(timeout=300)) for p in procs]
        out["operations"] = len(procs)
        out["faults_injected"] = sum(state.injected().values())
        state.chaos = None
        for (p, so, se), (name, version), home in zip(results, jobs + [("compact", "")], homes + [homes[0]]):
            if p.returncode == 0:
                continue
            if "Traceback" in se or not se.strip():
                out["problems"].append(f"{name}@{version}: unclean exit {p.returncode}: {se[-500:]}")
            elif name != "compact":  # a clean failure under faults: a rerun must complete it
                r = pfx(home, "publish", f"{name}@{version}")
                if r.returncode != 0:
                    out["problems"].append(f"{name}@{version}: rerun failed: {r.stderr[-300:]}")
    out["problems"] += remote_problems(s3_url, bucket, "reg/", require_indexed=True)
    from registry.remotes import open_remote
    from registry.resolve import fetch_package

    rem = open_remote({"name": "r", "url": url, "endpoint_url": s3_url}, offline=False)
    for name in {n for n, _ in jobs}:
        want = sorted(v for n, v in jobs if n == name)
        pkg = fetch_package(rem, name)
        got = sorted(pkg.versions) if pkg else []
        if got != want:
            out["problems"].append(f"{name}: indexed versions {got}, published {want}")
    return out


def test_four_cli_publishers_and_a_compactor_under_faults_lose_nothing(s3_url, tmp_path, aws_env):
    r = run_publishers(s3_url, tmp_path, seed=0)
    assert r["problems"] == [], r["problems"]
    assert r["faults_injected"] > 0
