"""`pfx train`, `pfx render`, `pfx base` through click's CliRunner and real `pfx` subprocesses (toy base)."""

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from tests.kit.engine import photo_folder
from tests.kit.runner import pfx

TRAIN = ["--steps", "2", "--batch-size", "4", "--previews", "1"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    monkeypatch.setenv("PFX_HOME", str(h))
    monkeypatch.delenv("PFX_BASE", raising=False)
    return h


def run(*args, code=0):
    res = CliRunner().invoke(cli, list(args), catch_exceptions=False) if code == 0 else \
        CliRunner().invoke(cli, list(args))
    if code is not None:
        assert res.exit_code == code, res.output
    return res


def test_train_render_and_versions(home, tmp_path):
    photos = photo_folder(tmp_path / "photos")
    out = json.loads(run("train", str(photos), "--name", "cat-mittens", "--superclass", "cat", *TRAIN, "--json").stdout)
    assert out["version"] == "0.1.0" and out["manifest"].startswith("sha256:")
    again = json.loads(run("train", str(photos), "--name", "cat-mittens", "--superclass", "cat", *TRAIN,
                           "--embedding-norm", "0.5", "--json").stdout)
    assert again["version"] == "0.2.0"
    from perfusion_hub.concept import load_concept

    def trained_with(out):
        hexd = out["concept"]["digest"].split(":")[1]
        return load_concept(home / "blobs" / "sha256" / hexd[:2] / hexd).training()["embedding_norm"]

    assert (trained_with(out), trained_with(again)) == (1.0, 0.5)  # the toy base's pfx.json, then the option
    listed = json.loads(run("list", "--json").stdout)
    assert sorted(r["version"] for r in listed if r["name"] == "cat-mittens") == ["0.1.0", "0.2.0"]

    img = tmp_path / "out.png"
    res = json.loads(run("render", "a photo of cat-mittens on a chair", "--steps", "2", "-o", str(img),
                         "--json").stdout)
    assert res["concepts"] == ["cat-mittens"] and res["prompt"] == "a photo of <cat-mittens> on a chair"
    from PIL import Image

    meta = json.loads(Image.open(img).text["pfx"])
    assert meta["seed"] == 0 and meta["concepts"]["cat-mittens"]["version"] == "0.2.0"
    assert meta["base_digest"].startswith("sha256:")

    grid = tmp_path / "grid.png"
    run("render", "cat-mittens", "--steps", "2", "--sweep-beta", "0.5:0.9:3", "-o", str(grid))
    assert Image.open(grid).size[0] == 3 * 64

    dup = run("train", str(photos), "--name", "cat-mittens", "--superclass", "cat", "--version", "0.1.0", *TRAIN,
              code=2)
    assert "already exists" in dup.output


def test_embedded_base_notice_and_base_commands(home, tmp_path):
    res = pfx(home, "base", "prepare", "--json")
    assert res.returncode == 0, res.stderr
    assert "embedded 'toy' base" in res.stderr and "stable-diffusion-v1-5" in res.stderr
    info = json.loads(res.stdout)
    assert info["layers"] == 7 and info["dim"] == 128
    bases = json.loads(run("base", "list", "--json").stdout)
    assert [b["name"] for b in bases] == ["toy"] and bases[0]["default"]


def test_user_errors_are_short_with_stable_exit_codes(home, tmp_path):
    photos = photo_folder(tmp_path / "photos")
    bad = pfx(home, "train", str(photos), "--name", "cat-mittens", "--superclass", "teddy bear", *TRAIN)
    assert bad.returncode == 2 and "teddy + bear" in bad.stderr and "Traceback" not in bad.stderr
    name = pfx(home, "train", str(photos), "--name", "../etc", "--superclass", "cat", *TRAIN)
    assert name.returncode == 2 and "Traceback" not in name.stderr
    missing = pfx(home, "render", "a photo of <ghost-cat>", "--steps", "1", "-o", str(tmp_path / "x.png"))
    assert missing.returncode == 3 and "pfx install ghost-cat" in missing.stderr
    offline = pfx(home, "render", "a photo of <ghost-cat>", "--install", "-o", str(tmp_path / "x.png"),
                  env={"PFX_OFFLINE": "1"})
    assert offline.returncode == 8, offline.stderr
    assert not (tmp_path / "x.png").exists()
    nobase = pfx(home, "render", "a cat", "--base", str(tmp_path / "nowhere"), "-o", str(tmp_path / "x.png"))
    assert nobase.returncode == 3 and "not an embedded base" in nobase.stderr
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04.")
    refused = pfx(home, "render", "a cat", "--base", str(pickle), "-o", str(tmp_path / "x.png"))
    assert refused.returncode == 2 and "pickle" in refused.stderr


def test_concept_for_another_base_and_corrupt_blob_are_refused(home, tmp_path):
    import torch

    from perfusion_hub.bases import load_base

    photos = photo_folder(tmp_path / "photos")
    run("train", str(photos), "--name", "cat-mittens", "--superclass", "cat", *TRAIN)
    other = load_base("toy", device="cpu", dtype="fp32")
    with torch.no_grad():
        other.pipe.text_encoder.get_input_embeddings().weight[:100].mul_(1.5)  # a fine-tune: another base
    other.pipe.save_pretrained(tmp_path / "other-base")
    res = pfx(home, "render", "a photo of cat-mittens", "--base", str(tmp_path / "other-base"), "--steps", "1",
              "-o", str(tmp_path / "y.png"))
    assert res.returncode == 7, res.stderr
    assert "'toy'" in res.stderr and "other-base" in res.stderr

    from registry.home import Home

    h = Home.open(str(home))
    m = h.manifest(h.find_installed("cat-mittens")["manifest"])
    blob = h.store.blob_path(m.concept["digest"])
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    res = pfx(home, "render", "a photo of cat-mittens", "--steps", "1", "-o", str(tmp_path / "z.png"))
    assert res.returncode == 5 and "Traceback" not in res.stderr
    assert not Path(tmp_path / "z.png").exists()


def test_render_notes_uninstalled_names_and_installs_them_with_install(home, tmp_path):
    out = tmp_path / "x.png"
    plain = pfx(home, "render", "a close-up of cat-mittens", "--steps", "1", "-o", str(out))
    assert plain.returncode == 0 and "'cat-mittens' is not an installed concept" in plain.stderr
    assert "'close-up' is not an installed concept" in plain.stderr
    res = pfx(home, "render", "a close-up of cat-mittens on chair-eames", "--steps", "1", "--install", "-o", str(out),
              "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["concepts"] == ["cat-mittens", "chair-eames"]  # fetched from the sample registry
    assert "'close-up' is not an installed concept" in res.stderr
