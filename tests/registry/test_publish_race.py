"""Concurrent publishers (separate processes) against the single-threaded moto server and Ceph RGW, whose
conditional writes are atomic as on real S3: one winner per version, no version lost in the index."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

from registry.remotes import open_remote
from registry.resolve import fetch_package, read_claim
from tests.kit.runner import ROOT, pfx_env
from tests.kit.s3 import make_bucket

WORKER = "import sys; from tests.kit.concepts import publish_worker; publish_worker(*sys.argv[1:])"
pytestmark = pytest.mark.usefixtures("aws_env")
S3_SERVERS = ("moto", "rgw")  # each test using s3_url runs on both (tests/conftest.py)


def _run(tmp_path, s3_url, url, jobs):
    env = pfx_env(AWS_CONFIG_FILE=str(tmp_path / "none"))
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / f"h{i}"), name, version, str(seed), url,
                          s3_url], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i, (name, version, seed) in enumerate(jobs)
    ]
    out = []
    for p in procs:
        so, se = p.communicate(timeout=120)
        assert p.returncode == 0, se
        out.append(json.loads(so.strip().splitlines()[-1]))
    return out


def _remote(url, s3_url):
    return open_remote({"name": "r", "url": url, "endpoint_url": s3_url}, offline=False)


def test_four_publishers_same_version_exactly_one_wins(tmp_path, s3_url):
    bucket = f"race-{uuid.uuid4().hex[:10]}"
    make_bucket(s3_url, bucket)
    url = f"s3://{bucket}/reg"
    res = _run(tmp_path, s3_url, url, [("same", "1.0.0", seed) for seed in range(4)])
    winners = [r for r in res if r["ok"]]
    assert len(winners) == 1, res
    assert sorted(r["error"] for r in res if not r["ok"]) == ["VersionExists"] * 3
    assert all("same@1.0.0 already exists" in r["message"] for r in res if not r["ok"])
    rem = _remote(url, s3_url)
    assert read_claim(rem, "same", "1.0.0")["manifest"] == winners[0]["manifest"]
    assert fetch_package(rem, "same").versions["1.0.0"]["manifest"] == winners[0]["manifest"]


def test_four_publishers_different_versions_none_lost(tmp_path, s3_url):
    bucket = f"race-{uuid.uuid4().hex[:10]}"
    make_bucket(s3_url, bucket)
    url = f"s3://{bucket}/reg"
    versions = [f"1.{i}.0" for i in range(4)]
    res = _run(tmp_path, s3_url, url, [("many", v, i) for i, v in enumerate(versions)])
    assert all(r["ok"] for r in res), res
    pkg = fetch_package(_remote(url, s3_url), "many")
    assert sorted(pkg.versions) == versions
    assert pkg.tags["latest"] == "1.3.0"
