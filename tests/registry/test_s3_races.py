"""Races between processes on real S3 servers (moto and Ceph RGW, via the parametrized `s3_url`):

* ten rounds of two publishers claiming the same version at the same moment (a barrier releases
  them): exactly one winner each round, the loser gets VersionExists, the claim and the index name
  the winner's manifest;
* four processes editing one package's index at once (a yank each, then four tags each): no edit
  lost, although their compare-and-swap writes collide (the losses are counted and reported).

On RGW both depend on If-Match being sent unquoted (the quoted form always answers 412 there: every
swap would fail) and RGW answering a lost race with 412 or 500 (ECANCELED), both safe to retry.
"""

from __future__ import annotations

import json

import pytest

from registry.remotes import open_remote
from registry.resolve import fetch_package, read_claim
from tests.kit.checks import remote_problems
from tests.kit.racers import run_rounds
from tests.kit.s3 import S3_ENV, new_bucket

pytestmark = pytest.mark.usefixtures("aws_env")

S3_SERVERS = ("moto", "rgw")  # each test using s3_url runs on both (tests/conftest.py)

ROUNDS = 10


def _env(tmp_path) -> dict:
    return {**S3_ENV, "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"), "PFX_OFFLINE": ""}


def _remote(url, endpoint):
    return open_remote({"name": "r", "url": url, "endpoint_url": endpoint}, offline=False)


def test_ten_two_publisher_races_have_exactly_one_winner_each(tmp_path, s3_url):
    bucket = new_bucket(s3_url, "duel")
    url = f"s3://{bucket}/reg"
    plans = [[("publish", "duel", f"1.{i}.0", 1000 * w + i) for i in range(ROUNDS)] for w in range(2)]
    recs = run_rounds(tmp_path, url, s3_url, plans, _env(tmp_path))
    rem = _remote(url, s3_url)
    pkg = fetch_package(rem, "duel")
    gaps = []
    for i in range(ROUNDS):
        v = f"1.{i}.0"
        rs = [r for r in recs if r["step"] == i]
        winners = [r for r in rs if r["ok"]]
        assert len(winners) == 1, rs
        [loser] = [r for r in rs if not r["ok"]]
        assert loser["error"] == "VersionExists" and f"duel@{v} already exists" in loser["message"], loser
        assert read_claim(rem, "duel", v)["manifest"] == winners[0]["manifest"]
        assert pkg.versions[v]["manifest"] == winners[0]["manifest"]
        if all(r["claim_at"] for r in rs):
            gaps.append(abs(rs[0]["claim_at"] - rs[1]["claim_at"]) * 1000)
    assert sorted(pkg.versions) == sorted(f"1.{i}.0" for i in range(ROUNDS))
    assert remote_problems(s3_url, bucket, "reg/", require_indexed=True) == []
    print(json.dumps({"server": s3_url.kind, "races": ROUNDS, "one_winner": ROUNDS,
                      "claim_put_gap_ms": sorted(round(g, 1) for g in gaps)}))


def test_concurrent_tag_and_yank_edits_from_four_processes_lose_nothing(tmp_path, s3_url):
    from registry.home import Home
    from registry.publish import publish
    from tests.kit.concepts import add_concept

    bucket = new_bucket(s3_url, "edits")
    url = f"s3://{bucket}/reg"
    pub = Home.open(tmp_path / "pub", offline=False)
    pub.add_remote("r", url, endpoint_url=s3_url)
    for i in range(5):
        add_concept(pub, tmp_path, "edits", f"1.{i}.0", seed=i)
        publish(pub, f"edits@1.{i}.0", to="r")
    pub.close()
    workers, tags_each = 4, 4
    plans = [[("yank", f"edits@1.{w + 1}.0")] + [("tag", "edits@1.0.0", f"w{w}-{k}") for k in range(tags_each)]
             for w in range(workers)]
    recs = run_rounds(tmp_path, url, s3_url, plans, _env(tmp_path))
    assert all(r["ok"] for r in recs), [r for r in recs if not r["ok"]]
    pkg = fetch_package(_remote(url, s3_url), "edits")
    assert {v: e["yanked"] for v, e in pkg.versions.items()} == {
        "1.0.0": False, "1.1.0": True, "1.2.0": True, "1.3.0": True, "1.4.0": True}
    want = {f"w{w}-{k}": "1.0.0" for w in range(workers) for k in range(tags_each)}
    assert pkg.tags == {**want, "latest": "1.0.0"}  # latest fell back past every yanked version
    lost = sum(r["cas_lost"] for r in recs)
    print(json.dumps({"server": s3_url.kind, "edits": len(recs), "lost_edits": 0, "cas_retries": lost,
                      "slowest_edit_s": round(max(r["seconds"] for r in recs), 2)}))
