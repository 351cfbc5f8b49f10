"""`pfx list/remove/verify/gc/du/lock/export/import` through click's runner and one real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from cli.main import cli
from registry.home import Home
from tests.kit.concepts import write_concept
from tests.kit.runner import pfx, pfx_env


@pytest.fixture
def env(tmp_path):
    home = tmp_path / "home"
    h = Home.open(home)
    h.add_concept_file(write_concept(tmp_path, "cat-mittens", "0.1.0"), tags=["pet"])
    h.add_concept_file(write_concept(tmp_path, "cat-mittens", "0.2.0"))
    h.add_concept_file(write_concept(tmp_path, "chair-eames", "1.0.0"))
    h.close()
    return {"PFX_HOME": str(home)}, home


def run(env, *args, code=0):
    r = CliRunner().invoke(cli, list(args), env=env[0], catch_exceptions=True)
    if r.exit_code != code and r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    assert r.exit_code == code, r.output
    return r


def test_list_json_and_human(env):
    rows = json.loads(run(env, "list", "--json").output)
    assert [(r["name"], r["version"]) for r in rows] == [
        ("cat-mittens", "0.1.0"), ("cat-mittens", "0.2.0"), ("chair-eames", "1.0.0")]
    assert all(r["manifest"].startswith("sha256:") for r in rows)
    out = run(env, "list").output
    assert "NAME" in out and "chair-eames" in out and "local" in out
    assert len(json.loads(run(env, "list", "cat-mittens", "--json").output)) == 2


def test_remove_then_gc_then_du(env):
    out = json.loads(run(env, "remove", "cat-mittens@0.1.0", "--json").output)
    assert out[0]["version"] == "0.1.0"
    assert [r["version"] for r in json.loads(run(env, "list", "--json").output)] == ["0.2.0", "1.0.0"]
    dry = json.loads(run(env, "gc", "--dry-run", "--grace", "0", "--json").output)
    assert dry["dry_run"] and dry["removed"] == 2
    assert json.loads(run(env, "gc", "--json").output)["removed"] == 0  # default grace keeps new blobs
    res = json.loads(run(env, "gc", "--grace", "0", "--json").output)
    assert res["removed"] == 2 and res["bytes_freed"] > 0
    du = json.loads(run(env, "du", "--json").output)
    assert du["installed"] == 2 and du["bytes"]["unreferenced"] == 0 and du["blobs"]["concept"] == 2
    assert "KIND" in run(env, "du").output
    run(env, "remove", "chair-eames")
    assert [r["name"] for r in json.loads(run(env, "list", "--json").output)] == ["cat-mittens"]


def test_verify_ok_and_corrupt(env):
    rep = json.loads(run(env, "verify", "--json").output)
    assert rep["ok"] and rep["installed"] == 3
    assert run(env, "verify").output.strip().endswith("ok")
    h = Home.open(env[1])
    d = h.installed("chair-eames")[0]["concept"]
    p = h.store.blob_path(d)
    os.chmod(p, 0o644)
    p.write_bytes(b"garbage")
    p = pfx(env[1], "verify")
    assert p.returncode == 5
    assert "chair-eames@1.0.0" in p.stderr and "Traceback" not in p.stderr
    p = pfx(env[1], "verify", "--fix", "--json")
    assert p.returncode == 5 and json.loads(p.stdout)["fixed"] == [d]


def test_error_exit_codes(env):
    for args, code, text in (
        (["remove", "nope"], 3, "not installed"),
        (["remove", "Bad/../Name"], 2, "invalid name"),
        (["remove", "cat-mittens@^0.1"], 2, "range"),
        (["import", str(env[1] / "blobs")], 3, "no concepts"),
    ):
        p = pfx(env[1], *args)
        assert p.returncode == code, (args, p.stderr)
        assert text in p.stderr and "Traceback" not in p.stderr


def test_lock_export_import(env, tmp_path):
    lock = tmp_path / "pfx.lock"
    out = json.loads(run(env, "lock", "-o", str(lock), "--json").output)
    assert len(out["concepts"]) == 3 and lock.exists()
    from registry.lockfile import read_lock

    assert [e["manifest"] for e in read_lock(lock)] == [c["manifest"] for c in out["concepts"]]
    tar = tmp_path / "b.tar"
    exp = json.loads(run(env, "export", str(tar), "cat-mittens@0.2.0", "chair-eames", "--json").output)
    assert exp["format"] == "tar" and len(exp["concepts"]) == 2
    other = ({"PFX_HOME": str(tmp_path / "other")}, tmp_path / "other")
    imp = json.loads(run(other, "import", str(tar), "--json").output)
    assert sorted(e["name"] for e in imp["imported"]) == ["cat-mittens", "chair-eames"]
    assert "already installed" in run(other, "import", str(tar)).output
    mine = {(r["name"], r["version"]): r["manifest"] for r in json.loads(run(env, "list", "--json").output)}
    theirs = {(r["name"], r["version"]): r["manifest"] for r in json.loads(run(other, "list", "--json").output)}
    assert theirs.items() <= mine.items()


def test_real_subprocess_list_json_without_torch(env):
    code = ("import sys, runpy; sys.argv = ['pfx', 'list', '--json']\n"
            "from cli.main import main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'safetensors') if m in sys.modules]\n"
            "print('HEAVY=' + ','.join(heavy), file=sys.stderr)\n")
    p = subprocess.run([sys.executable, "-c", code], env=pfx_env(env[1]), check=False, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert [r["name"] for r in json.loads(p.stdout)] == ["cat-mittens", "cat-mittens", "chair-eames"]
    assert "HEAVY=\n" in p.stderr or p.stderr.strip().endswith("HEAVY=")
    # and the installed console script itself
    p = pfx(env[1], "list", "--json")
    assert p.returncode == 0 and len(json.loads(p.stdout)) == 3
