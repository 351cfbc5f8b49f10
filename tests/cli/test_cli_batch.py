"""`pfx render --batch FILE` (JSON Lines, batches of --batch-size, contact sheet) and `pfx render -n N`'s grid,
through click's CliRunner on the toy base with the sample concepts (issue 21)."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli.main import cli


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    monkeypatch.setenv("PFX_HOME", str(h))
    monkeypatch.delenv("PFX_BASE", raising=False)
    monkeypatch.chdir(tmp_path)
    return h


def run(*args, code=0):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == code, res.output
    return res


def _px(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_batch_file_renders_every_line_with_its_own_concepts(home, tmp_path):
    run("install", "cat-mittens", "chair-eames")
    lines = [{"prompt": "a photo of cat-mittens on a chair", "seed": 1, "output": "out/mittens.png"},
             {"prompt": "a photo of a dog on a table", "seed": 2, "output": "out/dog.png"},
             {"prompt": "a cat on a chair", "concepts": {"chair-eames": {"beta": 0.6}}, "count": 2, "seed": 3},
             {"prompt": "<chair-eames> in a room", "beta": {"chair-eames": 0.8}, "negative": "blurry"}]
    batch = tmp_path / "jobs.jsonl"
    batch.write_text("\n".join(json.dumps(x) for x in lines[:2]) + "\n\n" + "\n".join(json.dumps(x) for x in lines[2:]))
    out = json.loads(run("render", "--batch", batch, "--batch-size", "3", "--steps", "2", "-o", "r.png",
                         "--contact-sheet", "sheet.png", "--json").stdout)
    assert out["files"] == ["out/mittens.png", "out/dog.png", "r-4-0.png", "r-4-1.png", "r-5.png"]
    assert (out["lines"], out["images"], out["batches"]) == (4, 5, 2)  # [1, 2] then [4 (2 images), 5]
    meta = [json.loads(Image.open(tmp_path / f).text["pfx"]) for f in out["files"]]
    assert meta[0]["concepts"]["cat-mittens"]["beta"] == 0.7 and meta[0]["seed"] == 1
    assert meta[1]["concepts"] == {} and meta[1]["seed"] == 2
    assert meta[2]["concepts"]["chair-eames"]["beta"] == 0.6 and meta[2]["text"] == "a cat on a <chair-eames>"
    assert meta[4]["concepts"]["chair-eames"]["beta"] == 0.8 and meta[4]["negative_prompt"] == "blurry"
    assert meta[4]["seed"] == 0  # the command's --seed
    sheet = Image.open(tmp_path / "sheet.png")
    assert sheet.size == (3 * 64, 2 * (64 + 14))
    assert json.loads(sheet.text["pfx"])["contact_sheet"] == out["files"]
    # each line as `pfx render` renders it alone: batch-size blocking only (see perfusion_hub/batch.py)
    alone = run("render", "a photo of cat-mittens on a chair", "--seed", "1", "--steps", "2", "-o", "alone.png")
    assert np.abs(_px(tmp_path / "alone.png") - _px(tmp_path / "out/mittens.png")).max() <= 1, alone.output
    run("render", "a cat on a chair", "--with", "chair-eames", "--beta", "chair-eames=0.6", "--seed", "3", "-n", "2",
        "--steps", "2", "-o", "alone2.png", "--no-grid")
    assert np.abs(_px(tmp_path / "alone2-1.png") - _px(tmp_path / "r-4-1.png")).max() <= 1


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a cat"}\n{"prompt": "a dog", }\n', "line 2: not valid JSON"),
    ('{"prompt": "a cat", "sed": 3}\n', "line 1: unknown field 'sed'"),
    ('\n{"prompt": "a cat", "count": 65}\n', "line 2: \"count\" must be between 1 and 64"),
    ('{"prompt": ""}\n', 'line 1: "prompt" must be a non-empty string'),
    ('["a cat"]\n', "line 1: expected a JSON object"),
    ('{"prompt": "a cat", "tau": {"cat-mittens": 0}}\n', "line 1: tau must be positive"),
    ('{"prompt": "a cat", "output": "a.png"}\n{"prompt": "a dog", "output": "a.png"}\n',
     "line 2: writes a.png, which line 1 writes too"),
    ('\n \n', "holds no requests"),
])
def test_batch_file_errors_name_the_line(home, tmp_path, content, message):
    batch = tmp_path / "bad.jsonl"
    batch.write_text(content)
    res = run("render", "--batch", batch, "--steps", "1", code=2)
    assert message in res.output and "Traceback" not in res.output
    assert not list(tmp_path.glob("*.png"))


def test_batch_file_engine_errors_name_the_line_before_rendering(home, tmp_path):
    run("install", "chair-eames")
    batch = tmp_path / "jobs.jsonl"
    batch.write_text('{"prompt": "a photo of chair-eames", "output": "ok.png"}\n'
                     '{"prompt": "a dog on a table", "concepts": ["chair-eames"], "output": "bad.png"}\n')
    res = run("render", "--batch", batch, "--steps", "1", code=2)
    assert "jobs.jsonl, line 2:" in res.output and "no 'chair'" in res.output
    batch.write_text('{"prompt": "a photo of <ghost-cat>"}\n')
    res = run("render", "--batch", batch, "--steps", "1", code=3)
    assert "pfx install ghost-cat" in res.output
    assert not list(tmp_path.glob("*.png"))
    res = run("render", "a cat", "--batch", batch, code=2)
    assert "drop PROMPT" in res.output
    assert "give a PROMPT" in run("render", code=2).output


def test_count_writes_the_images_and_a_grid(home, tmp_path):
    res = json.loads(run("render", "a photo of a cat", "-n", "3", "--steps", "1", "-o", "cats.png", "--json").stdout)
    assert res["files"] == ["cats-0.png", "cats-1.png", "cats-2.png"] and res["grid"] == "cats-grid.png"
    grid = Image.open(tmp_path / "cats-grid.png")
    assert grid.size == (2 * 64, 2 * 64)
    assert np.array_equal(np.asarray(grid.convert("RGB"))[64:, :64], _px(tmp_path / "cats-2.png"))
    assert json.loads(grid.text["pfx"])["grid"] == res["files"]
    res = json.loads(run("render", "a photo of a dog", "-n", "2", "--steps", "1", "-o", "dogs.png", "--no-grid",
                         "--json").stdout)
    assert "grid" not in res and not (tmp_path / "dogs-grid.png").exists()
    one = json.loads(run("render", "a photo of a dog", "--steps", "1", "-o", "one.png", "--json").stdout)
    assert one["files"] == ["one.png"] and "grid" not in one
