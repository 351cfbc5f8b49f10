"""The remote-facing commands through click's CliRunner and as real `pfx` subprocesses against the
local S3 servers, moto and Ceph RGW (exit codes, --json, error hints)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from cli.main import cli
from registry.home import Home
from tests.kit.concepts import add_concept
from tests.kit.runner import pfx
from tests.kit.s3 import new_bucket

S3_SERVERS = ("moto", "rgw")  # each test using s3_url runs on both (tests/conftest.py)


def _invoke(home, *args):
    r = CliRunner().invoke(cli, ["--home", str(home), *args], catch_exceptions=True)
    return r


def test_cli_runner_file_remote_flow(tmp_path):
    reg = (tmp_path / "reg").as_uri()
    h1 = tmp_path / "h1"
    r = _invoke(h1, "remote", "add", "loc", reg, "--default")
    assert r.exit_code == 0, r.output
    assert "conditional writes: ok" in r.output
    r = _invoke(h1, "remote", "list", "--json")
    modes = {x["name"]: x["mode"] for x in json.loads(r.output)}
    assert modes == {"loc": "publish", "sample": "read-only"}
    add_concept(Home.open(h1, offline=False), tmp_path, "cat-mittens", "1.0.0", description="fluffy grey cat")
    r = _invoke(h1, "publish", "cat-mittens", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["version"] == "1.0.0"
    r = _invoke(h1, "registry", "compact", "--json")
    assert json.loads(r.output)["packages"] == 1
    r = _invoke(h1, "search", "fluffy", "--remote", "loc", "--json")
    assert [x["name"] for x in json.loads(r.output)] == ["cat-mittens"]
    r = _invoke(h1, "info", "cat-mittens", "--json")
    assert json.loads(r.output)["installed"] is True
    h2 = tmp_path / "h2"
    _invoke(h2, "remote", "add", "loc", reg)
    r = _invoke(h2, "info", "cat-mittens", "--json")
    d = json.loads(r.output)
    assert d["installed"] is False and d["dist_tags"] == {"latest": "1.0.0"}
    r = _invoke(h2, "install", "cat-mittens@^1", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)[0]["status"] == "installed"
    r = _invoke(h2, "search", "grey")
    assert "cat-mittens" in r.output and "installed" in r.output
    r = _invoke(h1, "tag", "cat-mittens@1.0.0", "stable")
    assert "cat-mittens@stable -> 1.0.0" in r.output
    r = _invoke(h1, "yank", "cat-mittens@1.0.0")
    assert "yanked cat-mittens@1.0.0" in r.output


def _pfx(home, *args, env, ok=True):
    return pfx(None, "--home", str(home), *args, env=env, timeout=60, check=ok)


def test_pfx_subprocess_against_s3(tmp_path, s3_url):
    bucket = new_bucket(s3_url, "cli")
    env = {"AWS_ENDPOINT_URL": s3_url, "AWS_CONFIG_FILE": str(tmp_path / "none")}
    pub, cons = tmp_path / "pub", tmp_path / "cons"
    # no remote yet: publish says how to add one (usage error, exit 2)
    add_concept(Home.open(pub, offline=False), tmp_path, "chair-eames", "1.0.0", description="a chair")
    p = _pfx(pub, "publish", "chair-eames", env=env, ok=False)
    assert p.returncode == 2 and "pfx remote add NAME s3://bucket/prefix --default" in p.stderr
    p = _pfx(pub, "remote", "add", "s3", f"s3://{bucket}/reg", "--default", env=env)
    assert "conditional writes: ok" in p.stdout
    p = _pfx(pub, "publish", "chair-eames@1.0.0", "--json", env=env)
    manifest = json.loads(p.stdout)["manifest"]
    p = _pfx(pub, "publish", "chair-eames@1.0.0", env=env)
    assert "completed an interrupted publish" in p.stdout or "published" in p.stdout
    _pfx(cons, "remote", "add", "s3", f"s3://{bucket}/reg", env=env)
    p = _pfx(cons, "install", "chair-eames@1.0.0", "--json", env=env)
    assert json.loads(p.stdout)[0]["manifest"] == manifest
    assert p.stderr == ""  # not a terminal: no progress bar
    p = _pfx(cons, "install", "no-such-thing@1.0.0", env=env, ok=False)
    assert p.returncode == 3 and "not found" in p.stderr
    p = _pfx(cons, "--offline", "install", "other-thing", env=env, ok=False)
    assert p.returncode == 8 and "offline" in p.stderr
    p = _pfx(cons, "--offline", "install", "chair-eames", "--json", env=env)
    assert json.loads(p.stdout)[0]["status"] == "present"
    p = _pfx(pub, "yank", "chair-eames@1.0.0", env=env)
    p = _pfx(tmp_path / "fresh", "install", "chair-eames@1.0.0", "--remote", "sample", env=env, ok=False)
    assert p.returncode == 3  # the sample registry ships chair-eames 0.1.0 only
    p = _pfx(pub, "publish", "chair-eames", "--to", "sample", env=env, ok=False)
    assert p.returncode == 6 and "read-only" in p.stderr
