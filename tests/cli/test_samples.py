"""toyworld.samples --from: the sample registry built from picked concept files (toyworld/experiments/sample_pick.py) publishes
exactly those files, with a preview each, into a registry that installs; and the README's first command, as
written, installs the shipped samples and renders Mittens on the Eames chair."""

from __future__ import annotations

import hashlib
import json
import shlex

import pytest
from click.testing import CliRunner
from PIL import Image

from cli.main import cli
from perfusion_hub.concept import save_concept
from registry.home import Home
from registry.install import install
from registry.names import parse_ref
from tests.kit.engine import needs_toy, synthetic_concept
from tests.kit.runner import ROOT
from toyworld import evaluator
from toyworld.samples import SAMPLES, build


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


README = ROOT / "README.md"


def readme_first_command() -> list[list[str]]:
    """The pfx commands of the README's first command line (the first bash block), split as the shell would."""
    block = README.read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(part)[1:] for part in block.strip().split(" && ") if part.strip().startswith("pfx ")]


@needs_toy
def test_readme_first_command_renders_mittens_on_the_eames_chair(tmp_path, monkeypatch):
    monkeypatch.setenv("PFX_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PFX_BASE", raising=False)
    monkeypatch.chdir(tmp_path)
    commands = readme_first_command()
    assert [c[0] for c in commands] == ["install", "render"]
    for args in commands:
        res = CliRunner().invoke(cli, args, catch_exceptions=False)
        assert res.exit_code == 0, res.output
    image = Image.open(tmp_path / commands[1][commands[1].index("-o") + 1]).convert("RGB")
    spec = {"bg": None, "objects": [("cat", None), ("chair", None)], "position": None, "relation": "on"}
    r = evaluator.read(evaluator.load(), [image])
    verdict = evaluator.judge(spec, r, 0)
    assert r["mittens"][0] > 0.5 and r["eames"][0] > 0.5, "the evaluator finds no Mittens or no Eames chair"
    assert verdict["all_basic"] and verdict["relation"], verdict
