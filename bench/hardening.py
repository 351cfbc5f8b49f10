"""The big versions of the hardening tests: many kill seeds, long fuzzing, every fault scenario.

    python -m bench.hardening [--scale 1.0] [--out bench/results/hardening.json] [--only AREA ...]

Runs the scenarios that tests/registry/test_faults.py, test_crash.py, test_concurrency.py and
tests/engine/test_fuzz_concept.py run (tests/kit/scenarios.py, tests/kit/fuzz.py) with more seeds, and
writes one JSON document: per area, what was run (fault
scenarios, kill points, fuzz cases, concurrent operations) and how many lost or corrupt items were
found afterwards (the goal is zero), plus the machine. `--scale` multiplies every seed count.
Everything runs on this machine (moto's S3 server on 127.0.0.1, real `pfx` subprocesses).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def machine() -> dict:
    return {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine()}


def _env() -> None:
    from tests.kit.s3 import S3_ENV

    os.environ.update(S3_ENV)
    os.environ["AWS_CONFIG_FILE"] = "/nonexistent-pfx-test"
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "PFX_OFFLINE"):
        os.environ.pop(k, None)


def n(x: float, scale: float) -> int:
    return max(1, round(x * scale))


def fuzz(cases: int) -> dict:
    """The structured fuzzer of tests/kit/fuzz.py for `cases` examples (plus random bytes)."""
    import hypothesis.strategies as st
    from hypothesis import HealthCheck, given, settings

    from perfusion_hub.concept import ConceptFormatError, load_concept, read_header_bytes
    from tests.kit.fuzz import check_case, mutated, seed_file

    load_concept(seed_file(0))  # warm-up: the first load imports torch and safetensors, not a case's time
    counts = {"cases": 0, "accepted": 0, "refused": 0, "max_case_ms": 0.0}
    problems: list[str] = []

    @settings(max_examples=cases, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(mutated())
    def structured(data):
        t0 = time.perf_counter()
        try:
            counts[check_case(data)] += 1
        except AssertionError as e:
            problems.append(f"{e} ({data[:60]!r})")
        except Exception as e:  # noqa: BLE001 - another exception type is a finding
            problems.append(f"{type(e).__name__}: {e} ({data[:60]!r})")
        counts["cases"] += 1
        counts["max_case_ms"] = max(counts["max_case_ms"], (time.perf_counter() - t0) * 1000)

    @settings(max_examples=cases // 4, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=4096))
    def raw(data):
        counts["cases"] += 1
        try:
            read_header_bytes(data)
            problems.append(f"random bytes accepted: {data[:60]!r}")
        except ConceptFormatError:
            counts["refused"] += 1
        except Exception as e:  # noqa: BLE001
            problems.append(f"{type(e).__name__} on random bytes")

    structured()
    raw()
    counts["max_case_ms"] = round(counts["max_case_ms"], 2)
    return {**counts, "invalid_accepted_or_unclean": len(problems), "problems": problems[:20]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "hardening.json"))
    ap.add_argument("--only", nargs="*", help="faults crash train concurrency fuzz")
    args = ap.parse_args()
    _env()
    from tests.kit.s3 import moto_server

    areas = args.only or ["faults", "crash", "train", "concurrency", "fuzz"]
    s = args.scale
    doc = {"date": datetime.now(UTC).strftime("%Y-%m-%d"), "machine": machine(), "scale": s, "areas": {}}
    t_all = time.perf_counter()

    def save():
        doc["seconds_total"] = round(time.perf_counter() - t_all, 1)
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")

    def record(name: str, fn):
        t0 = time.perf_counter()
        try:
            r = fn()
        except Exception as e:  # noqa: BLE001 - a crash of the harness is reported, not hidden
            r = {"harness_error": f"{type(e).__name__}: {e}", "problems": [repr(e)]}
        r["seconds"] = round(time.perf_counter() - t0, 1)
        r["lost_or_corrupt_found"] = len(r.get("problems", []))
        r["problems"] = r.get("problems", [])[:20]
        doc["areas"][name] = r
        print(f"{name}: {json.dumps({k: v for k, v in r.items() if k != 'problems'})}", flush=True)
        for p in r["problems"][:5]:
            print("   ", p[:300], flush=True)
        save()

    with tempfile.TemporaryDirectory(prefix="pfx-hardening-") as tmp_s, moto_server() as s3:
        tmp = Path(tmp_s)
        if "faults" in areas:
            from tests.kit.scenarios import run_cli_install_chaos, run_publish_matrix

            def faults_publish():
                tot = {"fault_scenarios": 0, "faults_injected": 0, "ok_first_try": 0, "clean_fail_then_rerun_ok": 0,
                       "problems": []}
                for i, times in enumerate([1, 2, 3][: n(3, s)]):
                    r = run_publish_matrix(s3, tmp / f"pm{i}", times=times, seed=i)
                    tot["fault_scenarios"] += r["cases"]
                    for k in ("faults_injected", "ok_first_try", "clean_fail_then_rerun_ok"):
                        tot[k] += r[k]
                    tot["problems"] += r["problems"]
                return tot

            def faults_install():
                from registry.home import Home
                from registry.publish import publish
                from tests.kit.concepts import add_concept
                from tests.kit.s3 import make_bucket

                make_bucket(s3, "bench-install")
                pub = Home.open(tmp / "ipub", offline=False)
                pub.add_remote("s3", "s3://bench-install/reg", endpoint_url=s3)
                ms = [add_concept(pub, tmp, f"bi{i}", "1.0.0", seed=i, big=True) for i in range(6)]
                for m in ms:
                    publish(pub, m.ref())
                tot = {"fault_scenarios": 0, "faults_injected": 0, "installs_ok": 0, "clean_failures": 0, "problems": []}
                for seed in range(n(12, s)):
                    r = run_cli_install_chaos(s3, "s3://bench-install/reg", [m.ref() for m in ms], tmp / f"ic{seed}",
                                              seed=seed, rate=0.15 + 0.05 * (seed % 4))
                    tot["fault_scenarios"] += 1
                    tot["faults_injected"] += r["faults_injected"]
                    tot["installs_ok"] += r["ok"]
                    tot["clean_failures"] += r["clean_fail"]
                    tot["problems"] += r["problems"]
                return tot

            record("faults_publish_matrix", faults_publish)
            record("faults_cli_install_random", faults_install)

        if "crash" in areas:
            from tests.kit.scenarios import run_gc_kills, run_install_kills, run_publish_kills

            def k(fn, *a, **kw):
                r = fn(*a, **kw)
                r.pop("delays", None)
                return r

            record("kill9_install", lambda: k(run_install_kills, s3, tmp / "ki", seeds=range(100, 100 + n(20, s))))
            record("kill9_publish", lambda: k(run_publish_kills, s3, tmp / "kp", seeds=range(200, 200 + n(20, s))))
            record("kill9_gc", lambda: k(run_gc_kills, tmp / "kg", seeds=range(300, 300 + n(10, s))))

        if "train" in areas:
            from tests.kit.engine import TOY
            from tests.kit.scenarios import run_train_kill

            def train_kills():
                tot = {"kill_points": 0, "checkpoint_steps": [], "problems": []}
                if not (TOY / "unet").is_dir():
                    return {**tot, "skipped": "toy base not built"}
                for seed in range(n(3, s)):
                    r = run_train_kill(tmp / f"kt{seed}", seed=400 + seed)
                    tot["kill_points"] += r["kill_points"]
                    tot["checkpoint_steps"].append(r["checkpoint_step"])
                    tot["problems"] += r["problems"]
                return tot

            record("kill9_train_then_resume", train_kills)

        if "concurrency" in areas:
            from tests.kit.scenarios import build_file_registry, run_home_mix, run_publishers

            def home_mix():
                tot = {"concurrent_processes": 8, "operations": 0, "by_op": {}, "lost": 0, "renders_ok": 0,
                       "problems": []}
                render = None
                from tests.kit.engine import TOY

                if (TOY / "unet").is_dir():
                    import torch

                    from perfusion_hub.bases import load_base
                    from perfusion_hub.covariance import packaged_covariance
                    from tests.kit.scenarios import make_render_concept

                    torch.set_num_threads(2)
                    base = load_base("toy", device="cpu", dtype="fp32")
                    render = (base, packaged_covariance(base))
                for seed in range(n(3, s)):
                    d = tmp / f"mix{seed}"
                    d.mkdir()
                    rc = make_render_concept(*render, d) if render else None
                    url, churn, stable = build_file_registry(d, churn=8, stable=4, render_concept=rc)
                    r = run_home_mix(d, url, churn, stable, workers=8, ops=8, seed=seed, renders=2 if rc else 0,
                                     renderable="paintcat" if rc else None)
                    tot["operations"] += r["operations"]
                    tot["lost"] += r["lost"]
                    tot["renders_ok"] += r["renders_ok"]
                    for op, c in r["by_op"].items():
                        tot["by_op"][op] = tot["by_op"].get(op, 0) + c
                    tot["problems"] += r["problems"]
                return tot

            def publishers():
                tot = {"runs": 0, "publishers_per_run": 4, "operations": 0, "faults_injected": 0, "problems": []}
                for seed in range(n(6, s)):
                    r = run_publishers(s3, tmp / f"pubs{seed}", seed=seed, rate=0.1 + 0.05 * (seed % 3))
                    tot["runs"] += 1
                    tot["operations"] += r["operations"]
                    tot["faults_injected"] += r["faults_injected"]
                    tot["problems"] += r["problems"]
                return tot

            record("concurrency_one_home_8_processes", home_mix)
            record("concurrency_4_publishers_and_compactor", publishers)

        if "fuzz" in areas:
            record("fuzz_concept_reader", lambda: fuzz(n(20000, s)))

    doc["summary"] = {
        "fault_scenarios_run": sum(a.get("fault_scenarios", 0) for a in doc["areas"].values()),
        "kill_points_tried": sum(a.get("kill_points", 0) for a in doc["areas"].values()),
        "fuzz_cases_executed": doc["areas"].get("fuzz_concept_reader", {}).get("cases", 0),
        "concurrent_operations_performed": sum(a.get("operations", 0) for k, a in doc["areas"].items()
                                               if k.startswith("concurrency")),
        "lost_or_corrupt_found": {k: a["lost_or_corrupt_found"] for k, a in doc["areas"].items()},
    }
    save()
    print(json.dumps(doc["summary"], indent=2))


if __name__ == "__main__":
    main()
