"""The hardening scenarios: tests/registry/test_faults.py, test_crash.py and test_concurrency.py run them
with a few seeds, bench/hardening.py with many. Each returns figures and a list of every problem found
(a lost or corrupt item, an unclean failure, a failed rerun); the goal is an empty list.

  faults       run_publish_matrix: publish under every fault on every request it makes;
               run_cli_install_chaos: `pfx install` through a proxy failing requests at random
  kill -9      run_install_kills, run_publish_kills, run_gc_kills: seeded kill points in a measured
               unkilled run of the same command; run_train_kill: after the first checkpoint, then --resume
  concurrency  run_home_mix: workers running real `pfx` processes on one home (build_file_registry makes
               its registry, make_render_concept its renderable concept); run_publishers: `pfx publish`
               processes and a compactor on one remote through a failing proxy
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from pathlib import Path

from registry.errors import PfxError
from registry.home import Home
from registry.install import install
from registry.publish import publish
from tests.kit.checks import home_problems, remote_problems
from tests.kit.concepts import add_concept, publish_big_concepts
from tests.kit.proxy import Rule, fault_proxy, on
from tests.kit.runner import clean_error, kill9_after, pfx, start_pfx
from tests.kit.s3 import new_bucket

# --------------------------------------------------------------------------------------------------
# Faults between boto3 and S3

PUBLISH_REQUESTS = [("PUT", "config"), ("PUT", "blob"), ("PUT", "manifest"), ("PUT", "journal"), ("PUT", "claim"),
                    ("GET", "package"), ("PUT", "package")]
NET_ACTIONS = ("500", "503", "reset", "drop", "truncate", "corrupt")


def run_publish_matrix(s3_url: str, tmp: Path, requests=PUBLISH_REQUESTS, actions=NET_ACTIONS, *,
                       times: int = 1, seed: int = 0, per_request: int | None = None) -> dict:
    """Publish one fresh version per (request, action) with that fault injected `times` times
    (`per_request`: only that many actions per request, rotating, so every action is still used).

    Returns figures: cases, first-try successes, clean failures that a rerun completed, and every
    problem found (a non-PfxError, a failed rerun, an inconsistent remote, a bad install)."""
    bucket = new_bucket(s3_url, "hard")
    url = f"s3://{bucket}/reg"
    rng = random.Random(seed)
    out = {"cases": 0, "ok_first_try": 0, "clean_fail_then_rerun_ok": 0, "faults_injected": 0, "problems": []}
    with fault_proxy(s3_url) as (proxy, state):
        state.stall_s = 1.0
        home = Home.open(tmp / f"pub-{seed}", offline=False)
        home.add_remote("s3", url, endpoint_url=proxy)
        published = []
        n = per_request or len(actions)
        cases = [(r, actions[(j + k) % len(actions)]) for j, r in enumerate(requests) for k in range(n)]
        for i, ((method, kind), action) in enumerate(cases):
            name = f"f{seed}-{i}-{kind}-{action}".replace("503", "slow").replace("500", "ise")
            m = add_concept(home, tmp, name, "1.0.0", seed=rng.randrange(1 << 30), big=True)
            rule = Rule(on(method, kind), action, times)
            state.rules[:] = [rule]
            out["cases"] += 1
            try:
                publish(home, m.ref(), read_timeout=0.5)
                out["ok_first_try"] += 1
            except PfxError as e:
                state.rules.clear()
                try:
                    publish(home, m.ref(), read_timeout=0.5)
                    out["clean_fail_then_rerun_ok"] += 1
                except Exception as e2:  # noqa: BLE001
                    out["problems"].append(f"{name}: rerun after {type(e).__name__} failed: {e2!r}")
                    continue
            except Exception as e:  # noqa: BLE001 - anything but a PfxError is a bug
                out["problems"].append(f"{name}: {method} {kind} {action}: unclean {type(e).__name__}: {e}")
                continue
            if rule.times == times and kind != "config":
                out["problems"].append(f"{name}: fault {action} on {method} {kind} was never injected")
            out["faults_injected"] += times - rule.times
            published.append(m)
        state.rules.clear()
    out["problems"] += remote_problems(s3_url, bucket, "reg/", require_indexed=True)
    # Everything published installs, intact, into a fresh home (straight to the server).
    fresh = Home.open(tmp / f"fresh-{seed}", offline=False)
    fresh.add_remote("s3", url, endpoint_url=s3_url)
    try:
        install(fresh, [m.ref() for m in published])
    except Exception as e:  # noqa: BLE001
        out["problems"].append(f"install of everything published failed: {e!r}")
    fresh.close()
    out["problems"] += home_problems(tmp / f"fresh-{seed}")
    return out


def run_cli_install_chaos(s3_url: str, url: str, refs: list[str], home: Path, *, seed: int, rate: float = 0.3) -> dict:
    """`pfx install` through a proxy failing `rate` of all requests at random (seeded): it must succeed
    or fail cleanly; the home must verify either way; a rerun without faults must complete."""
    out = {"ok": False, "clean_fail": False, "faults_injected": 0, "problems": []}
    with fault_proxy(s3_url) as (proxy, state):
        state.chaos = (random.Random(seed), rate, ("500", "503", "reset", "drop", "truncate", "corrupt"))
        p = pfx(home, "remote", "add", "s3", url, "--endpoint-url", proxy)
        if p.returncode != 0:  # the probe itself may meet faults: a clean failure, then add it again
            if not clean_error(p):
                out["problems"].append(f"remote add: unclean failure {p.returncode}: {p.stderr[-600:]}")
            state.chaos = None
            pfx(home, "remote", "add", "s3", url, "--endpoint-url", proxy, check=True)
            state.chaos = (random.Random(seed + 1), rate, ("500", "503", "reset", "drop", "truncate", "corrupt"))
        p = pfx(home, "install", *refs)
        out["faults_injected"] = sum(state.injected().values())
        if p.returncode == 0:
            out["ok"] = True
        elif clean_error(p):
            out["clean_fail"] = True
        else:
            out["problems"].append(f"install: unclean exit {p.returncode}: {p.stderr[-800:]}")
        out["problems"] += home_problems(home)
        state.chaos = None
        p = pfx(home, "install", *refs)
        if p.returncode != 0:
            out["problems"].append(f"rerun failed {p.returncode}: {p.stderr[-400:]}")
    out["problems"] += home_problems(home)
    return out


# --------------------------------------------------------------------------------------------------
# kill -9 during install / publish / gc / training
#
# Kill points are seeded fractions of a measured unkilled run of the same command (measured on the
# spot, so the points stay spread over the whole run however loaded the machine is).


def make_registry(s3_url: str, tmp: Path, n: int, tag: str = "c") -> tuple[str, list]:
    bucket = new_bucket(s3_url, "crash")
    url = f"s3://{bucket}/reg"
    pub, ms = publish_big_concepts(tmp / f"pub-{bucket}", tmp, url, s3_url, n, prefix=tag)
    pub.close()
    return url, ms


def age_tmp_files(home: Path, seconds: float = 7200) -> int:
    """Backdate leftover temp files (as if the crash was hours ago) so gc may take them."""
    n = 0
    for f in (home / "tmp").iterdir():
        t = time.time() - seconds
        os.utime(f, (t, t))
        n += 1
    return n


def gc_cleans_tmp(home: Path) -> list[str]:
    """A crash may leave temp files; once stale, `pfx gc` must remove them all."""
    if not (home / "tmp").is_dir():
        return []
    left = age_tmp_files(home)
    p = pfx(home, "gc", "--json")
    if p.returncode != 0:
        return [f"gc failed: {p.stderr[-300:]}"]
    rest = list((home / "tmp").iterdir())
    return [f"gc left {len(rest)} of {left} stale temp files"] if rest else []


def timed(home, *args: str) -> float:
    t0 = time.perf_counter()
    pfx(home, *args, check=True)
    return time.perf_counter() - t0


def run_install_kills(s3_url: str, tmp: Path, seeds, *, n: int = 6, delay_s: float = 0.03) -> dict:
    url, ms = make_registry(s3_url, tmp, n, tag="ik")
    refs = [m.ref() for m in ms]
    out = {"kill_points": 0, "killed": 0, "problems": [], "delays": []}
    with fault_proxy(s3_url) as (proxy, state):
        state.delay_s = delay_s  # latency per request spreads the kill points over the downloads
        probe = tmp / "ik-baseline"
        pfx(probe, "remote", "add", "s3", url, "--endpoint-url", proxy, check=True)
        baseline = timed(probe, "install", "--workers", "2", *refs)
        out["baseline_s"] = round(baseline, 2)
        for seed in seeds:
            rng = random.Random(seed)
            home = tmp / f"ik-{seed}"
            pfx(home, "remote", "add", "s3", url, "--endpoint-url", proxy, check=True)
            # Some seeds start from a partly installed home, so kills also land beside existing data.
            pre = rng.randrange(0, 3)
            if pre:
                pfx(home, "install", *refs[:pre], check=True)
            delay = rng.uniform(0.1, 0.95) * baseline
            proc = start_pfx(home, "install", "--workers", str(rng.choice((1, 2, 4))), *refs)
            out["killed"] += kill9_after(proc, delay)
            out["kill_points"] += 1
            out["delays"].append(round(delay, 3))
            out["problems"] += [f"seed {seed} after kill: {p}" for p in home_problems(home)]
            p = pfx(home, "install", *refs)
            if p.returncode != 0:
                out["problems"].append(f"seed {seed}: rerun failed: {p.stderr[-300:]}")
            got = json.loads(pfx(home, "list", "--json").stdout)
            if sorted(r["manifest"] for r in got) != sorted(m.digest for m in ms):
                out["problems"].append(f"seed {seed}: installed set differs after rerun")
            out["problems"] += [f"seed {seed} after rerun: {p}" for p in home_problems(home) + gc_cleans_tmp(home)]
    return out


def run_publish_kills(s3_url: str, tmp: Path, seeds, *, delay_s: float = 0.05) -> dict:
    bucket = new_bucket(s3_url, "crash")
    url = f"s3://{bucket}/reg"
    out = {"kill_points": 0, "killed": 0, "resumed": 0, "problems": []}
    home = tmp / "publisher"
    with fault_proxy(s3_url) as (proxy, state):
        pfx(home, "remote", "add", "s3", url, "--endpoint-url", proxy, check=True)
        state.delay_s = delay_s
        h = Home.open(home, offline=False)
        add_concept(h, tmp, "warmup", "1.0.0", big=True)
        h.close()
        baseline = timed(home, "publish", "warmup@1.0.0")
        out["baseline_s"] = round(baseline, 2)
        for seed in seeds:
            rng = random.Random(seed)
            h = Home.open(home, offline=False)
            # Sometimes a new version of an existing package (the kill may land in the package CAS).
            name = f"pk{seed % 3}" if rng.random() < 0.5 else f"pn{seed}"
            version = f"1.{seed}.0"
            m = add_concept(h, tmp, name, version, seed=seed, big=True)
            h.close()
            proc = start_pfx(home, "publish", m.ref())
            out["killed"] += kill9_after(proc, rng.uniform(0.1, 0.95) * baseline)
            out["kill_points"] += 1
            out["problems"] += [f"seed {seed} after kill: {p}"
                                for p in remote_problems(s3_url, bucket, "reg/") + home_problems(home)]
            p = pfx(home, "publish", m.ref())
            if p.returncode != 0:
                out["problems"].append(f"seed {seed}: rerun failed {p.returncode}: {p.stderr[-300:]}")
            out["resumed"] += "completed an interrupted publish" in p.stdout
        state.delay_s = 0
    out["problems"] += remote_problems(s3_url, bucket, "reg/", require_indexed=True)
    # Everything published is installable from a fresh home, and verifies.
    fresh = tmp / "publish-check"
    pfx(fresh, "remote", "add", "s3", url, "--endpoint-url", s3_url, check=True)
    h = Home.open(home)
    refs = [f"{r['name']}@{r['version']}" for r in h.installed()]
    h.close()
    p = pfx(fresh, "install", *refs)
    if p.returncode != 0:
        out["problems"].append(f"install of all published failed: {p.stderr[-300:]}")
    out["problems"] += home_problems(fresh)
    return out


def _write_raw_blob(home: Path, data: bytes, age_s: float) -> str:
    hexd = hashlib.sha256(data).hexdigest()
    d = home / "blobs" / "sha256" / hexd[:2]
    d.mkdir(parents=True, exist_ok=True)
    (d / hexd).write_bytes(data)
    t = time.time() - age_s
    os.utime(d / hexd, (t, t))
    return "sha256:" + hexd


def _gc_home(tmp: Path, seed: int, garbage: int) -> tuple[Path, list]:
    home = tmp / f"gc-{seed}"
    h = Home.open(home)
    kept = [add_concept(h, tmp, f"keep{i}", "1.0.0", seed=seed * 10 + i) for i in range(3)]
    gone = [add_concept(h, tmp, f"gone{i}", "1.0.0", seed=seed * 10 + 5 + i) for i in range(3)]
    for m in gone:
        h.remove(m.name)
    h.close()
    for f in (home / "blobs" / "sha256").rglob("*"):
        if f.is_file():  # every blob is old enough for gc (grace 0 below anyway)
            os.utime(f, (time.time() - 7200,) * 2)
    for i in range(garbage):
        _write_raw_blob(home, f"garbage {seed} {i}".encode(), 7200)
    return home, kept


def run_gc_kills(tmp: Path, seeds, *, garbage: int = 4000) -> dict:
    out = {"kill_points": 0, "killed": 0, "problems": []}
    baseline = timed(_gc_home(tmp, 9999, garbage)[0], "gc", "--grace", "0")
    out["baseline_s"] = round(baseline, 2)
    for seed in seeds:
        rng = random.Random(seed)
        home, kept = _gc_home(tmp, seed, garbage)
        proc = start_pfx(home, "gc", "--grace", "0")
        out["killed"] += kill9_after(proc, rng.uniform(0.1, 0.95) * baseline)
        out["kill_points"] += 1
        out["problems"] += [f"seed {seed} after kill: {p}" for p in home_problems(home)]
        pfx(home, "gc", "--grace", "0", check=True)
        h = Home.open(home)
        left = {d for d, _ in h.store.iter_blobs()}
        want = {b["digest"] for m in kept for b in m.blobs()} | {m.digest for m in kept}
        if left != want:
            out["problems"].append(f"seed {seed}: after gc the store holds {len(left)} blobs, expected {len(want)}")
        if sorted(r["name"] for r in h.installed()) != ["keep0", "keep1", "keep2"]:
            out["problems"].append(f"seed {seed}: installed set changed")
        h.close()
        out["problems"] += [f"seed {seed} after rerun: {p}" for p in home_problems(home)]
    return out


def run_train_kill(tmp: Path, seed: int, *, steps: int = 120) -> dict:
    """Kill `pfx train` a seeded moment after its first checkpoint appears; resume must complete."""
    from tests.kit.engine import photo_folder

    rng = random.Random(seed)
    home = tmp / f"train-{seed}"
    photos = photo_folder(tmp / f"photos-{seed}", n=3, seed=seed % 5)
    args = ["train", str(photos), "--name", "crashcat", "--superclass", "cat", "--steps", str(steps),
            "--batch-size", "1", "--previews", "0", "--seed", str(seed), "--json"]
    ckpt = home / "work" / "crashcat-0.1.0.ckpt"
    out = {"kill_points": 0, "problems": [], "checkpoint_step": None}
    proc = start_pfx(home, *args)
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    if not ckpt.exists():
        proc.kill()
        proc.communicate()
        return {**out, "problems": [f"seed {seed}: no checkpoint appeared (rc {proc.returncode})"]}
    killed = kill9_after(proc, rng.uniform(0.0, 1.5))
    out["kill_points"] += 1
    if not killed:
        out["problems"].append(f"seed {seed}: training finished before the kill")
    out["problems"] += home_problems(home)
    if json.loads(pfx(home, "list", "--json").stdout) != []:
        out["problems"].append("a killed training run recorded a concept")
    from safetensors import safe_open

    with safe_open(str(ckpt), "pt") as f:  # the checkpoint on disk is always a whole one
        out["checkpoint_step"] = json.loads(f.metadata()["pfx_checkpoint"])["step"]
    p = pfx(home, *args, "--resume")
    if p.returncode != 0:
        return {**out, "problems": out["problems"] + [f"resume failed: {p.stderr[-500:]}"]}
    info = json.loads(p.stdout)
    if ckpt.exists():
        out["problems"].append("the checkpoint was not consumed by the completed run")
    h = Home.open(home)
    (row,) = h.installed()
    from perfusion_hub.concept import read_header_bytes

    header = read_header_bytes(h.store.read_bytes(h.manifest(row["manifest"]).concept["digest"]))
    if header.training()["steps"] != steps or info["steps"] != steps:
        out["problems"].append(f"resumed run recorded {header.training()['steps']} steps")
    h.close()
    out["problems"] += home_problems(home) + gc_cleans_tmp(home)
    return out


# --------------------------------------------------------------------------------------------------
# Concurrency: many processes on one home, several publishers on one remote

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


def make_render_concept(toy_base, toy_cov, tmp: Path):
    from perfusion_hub.concept import save_concept
    from tests.kit.engine import synthetic_concept

    def make(pub: Home):
        c = synthetic_concept(toy_base, toy_cov, "paintcat", "cat", seed=1)
        path = save_concept(c, tmp / "paintcat.safetensors")
        d, s = pub.store.put_bytes(toy_cov.to_bytes())
        return pub.add_concept_file(path, covariance={"digest": d, "size": s, "base_digest": toy_base.digest,
                                                      "corpus_digest": toy_cov.corpus_digest})
    return make


def run_publishers(s3_url: str, tmp: Path, *, seed: int = 0, rate: float = 0.15, same_package: int = 3,
                   other: int = 1) -> dict:
    bucket = new_bucket(s3_url, "pubs")
    url = f"s3://{bucket}/reg"
    jobs = [("shared", f"1.{i}.0") for i in range(same_package)] + [(f"solo{i}", "1.0.0") for i in range(other)]
    out = {"publishers": len(jobs), "operations": 0, "problems": [], "faults_injected": 0}
    with fault_proxy(s3_url) as (proxy, state):
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
