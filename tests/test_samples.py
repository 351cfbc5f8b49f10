"""cli.samples --from: the sample registry built from picked concept files (bench/sample_pick.py) publishes
exactly those files, with a preview each, into a registry that installs."""

from __future__ import annotations

import hashlib
import json

import pytest

from cli.samples import SAMPLES, build
from perfusion_hub.concept import save_concept
from registry.home import Home
from registry.install import install
from registry.names import parse_ref
from tests.enginekit import needs_toy, synthetic_concept


@needs_toy
def test_build_from_pick_publishes_the_picked_files(tmp_path, toy_base, toy_cov):
    draws = tmp_path / "draws"
    draws.mkdir()
    files = {}
    for i, (name, (superclass, _)) in enumerate(SAMPLES.items()):
        for seed in (0, 1):  # two draws each; the pick names the second Mittens and the first Eames
            save_concept(synthetic_concept(toy_base, toy_cov, name, superclass, seed=10 * i + seed),
                         draws / f"{name}-{seed}.safetensors")
        files[name] = f"{name}-{1 - i}.safetensors"
    pick = draws / "pick.json"
    pick.write_text(json.dumps({"pick": {"files": files}}))
    target = tmp_path / "registry"
    (target / "stale").mkdir(parents=True)  # a previous build is replaced, not merged
    build(target, pick=pick)
    assert not (target / "stale").exists()

    home = Home.open(tmp_path / "home")
    home.add_remote("built", target.as_uri())
    rows = install(home, list(SAMPLES), remote="built")
    assert [r["status"] for r in rows] == ["installed", "installed"]
    for name, file in files.items():
        m = home.manifest(home.find_installed(parse_ref(name))["manifest"])
        want = hashlib.sha256((draws / file).read_bytes()).hexdigest()
        assert m.concept["digest"] == f"sha256:{want}", name
        previews = [b for b in m.blobs() if b["role"] == "preview"]
        assert len(previews) == 1
        assert home.store.read_bytes(previews[0]["digest"])[:8] == b"\x89PNG\r\n\x1a\n"
    home.close()


def test_build_from_an_incomplete_pick_changes_nothing(tmp_path):
    (tmp_path / "cat-mittens-0.safetensors").write_bytes(b"x")
    pick = tmp_path / "pick.json"
    pick.write_text(json.dumps({"pick": {"files": {"cat-mittens": "cat-mittens-0.safetensors",
                                                   "chair-eames": "chair-eames-9.safetensors"}}}))
    target = tmp_path / "registry"
    (target / "kept").mkdir(parents=True)
    with pytest.raises(SystemExit, match="no concept file for chair-eames"):
        build(target, pick=pick)
    assert (target / "kept").is_dir()
