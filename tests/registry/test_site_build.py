"""The static catalogue without a browser: `pfx registry site` through the CLI, an S3 remote (served
content types), the read-only sample registry, compaction leaving registries without a site alone, and
the search index's shape (only shard files, only hashed page paths)."""

from __future__ import annotations

import json

import boto3
import pytest
from click.testing import CliRunner

from cli.main import cli
from registry.compact import compact
from registry.remotes import open_remote
from registry.site import SITE_STATE, build_site, has_site, page_dir, query_plan
from tests.kit.site import file_reader, no_fsync, publish_one, synthetic_registry

pytestmark = pytest.mark.usefixtures("aws_env")


def run(*args, code=0):
    res = CliRunner().invoke(cli, list(args))
    assert res.exit_code == code, res.output
    return res


def test_cli_writes_the_catalogue_of_a_file_remote(tmp_path, monkeypatch):
    monkeypatch.setenv("PFX_HOME", str(tmp_path / "home"))
    reg = tmp_path / "reg"
    with no_fsync():
        synthetic_registry(reg, 5)
    run("remote", "add", "team", reg.as_uri())
    out = json.loads(run("registry", "site", "team", "--json").stdout)
    assert out["packages"] == 7 and out["url"] == reg.as_uri() + "/site/index.html"
    assert (reg / "site" / "index.html").is_file() and (reg / SITE_STATE).is_file()
    human = run("registry", "site", "team").stdout
    assert "python3 -m http.server" in human  # fetch() needs http: the message says how to serve it
    for p in (reg / "site" / "p").rglob("*.html"):
        assert len(p.parent.name) == 64  # pages live under sha256(name), never under the name
    assert query_plan(file_reader(reg), "quokka")["names"] == ["zebra-quokka"]
    # compaction rewrites it: a new package appears
    with no_fsync():
        publish_one(open_remote({"name": "team", "url": reg.as_uri()}, offline=False), "yak-one", "1.0.0", 9,
                    edits={"title": "Yak"})
    assert "catalogue rewritten" in run("registry", "compact", "team").stdout
    assert query_plan(file_reader(reg), "yak")["names"] == ["yak-one"]


def test_the_sample_registry_is_read_only(tmp_path, monkeypatch):
    monkeypatch.setenv("PFX_HOME", str(tmp_path / "home"))
    res = run("registry", "site", "sample", code=6)
    assert "read-only" in res.output


def test_compact_does_not_create_a_site(tmp_path):
    with no_fsync():
        remote = synthetic_registry(tmp_path / "reg", 3, special=False)
        stats = compact(remote)
    assert "site" not in stats and not has_site(remote) and not (tmp_path / "reg" / "site").exists()


def test_catalogue_on_s3_is_served_with_content_types(s3_url, bucket):
    remote = open_remote({"name": "s3", "url": f"s3://{bucket}/reg", "endpoint_url": s3_url}, offline=False)
    publish_one(remote, "zebra-quokka", "1.0.0", 1, preview=True, edits={"title": "Zebra <Quokka>"})
    stats = build_site(remote)
    assert stats["packages"] == 1
    b, prefix = bucket, "reg"
    s3 = boto3.client("s3", endpoint_url=s3_url)

    def head(key):
        return s3.head_object(Bucket=b, Key=f"{prefix}/site/{key}".lstrip("/"))["ContentType"]

    assert head("index.html").startswith("text/html")
    assert head("search/meta.json") == "application/json"
    assert head(page_dir("zebra-quokka") + "1.0.0.html").startswith("text/html")
    css = next(k for k in remote.list_keys("site/assets/") if k.endswith(".css"))
    assert head(css.removeprefix("site/")).startswith("text/css")
    body = s3.get_object(Bucket=b, Key=f"{prefix}/site/{page_dir('zebra-quokka')}index.html")["Body"].read()
    assert b"Zebra &lt;Quokka&gt;" in body and b"<Quokka>" not in body
    build_site(remote)  # a second build overwrites plain objects (no conditional write needed)


@pytest.mark.parametrize("q", ["quokka", "cat", "orange cat", "c0"])
def test_a_query_touches_few_small_files(tmp_path, q):
    with no_fsync():
        remote = synthetic_registry(tmp_path / "reg", 300)
        build_site(remote)
    plan = query_plan(file_reader(tmp_path / "reg"), q)
    assert plan["requests"] <= 1 + len(q.split()) + 20 and plan["bytes"] < 100_000, plan
