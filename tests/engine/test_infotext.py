"""Rendered PNGs carry an A1111 `parameters` infotext that a maintained third-party parser reads.

The parser is sd-parsers (PyPI, a library that reads the metadata of images made by A1111, ComfyUI,
Fooocus, InvokeAI, NovelAI). It splits the key/value line naively on ',' and ':', so it cannot read the
JSON-quoted values A1111 itself writes for text with commas (our `Perfusion hashes`); it does read the
prompt, negative prompt, sampler, steps, CFG scale, seed, model name and hash, and the `Hashes` JSON,
which is where a site finds the concepts' file hashes. A second, strict reader below follows A1111's
documented grammar (modules/infotext_utils.py: prompt lines, `Negative prompt:`, then `Key: value`
pairs, JSON-quoted when they hold ',' ':' or a newline) and checks every field, the quoted ones too.
"""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from perfusion_hub.infotext import format_infotext, parse_infotext
from tests.kit.engine import needs_toy

sd_parsers = pytest.importorskip("sd_parsers", reason="sd-parsers is not installed (pip install -e '.[test]')")

BASE = "sha256:" + "1a2b3c4d5e" * 6 + "abcd"
MITTENS = "sha256:" + "0123456789" * 6 + "abcd"
EAMES = "sha256:" + "9876543210" * 6 + "abcd"
PARAMS = {
    "prompt": "a photo of cat-mittens on chair-eames", "text": "a photo of <cat-mittens> on <chair-eames>",
    "negative_prompt": "blurry, dark", "seed": 1, "steps": 25, "guidance": 7.5, "size": 64, "base": "toy",
    "base_digest": BASE, "sampler": "DDIMScheduler", "global_lock": False,
    "concepts": {"cat-mittens": {"beta": 0.7, "tau": 0.15, "version": "0.1.0", "digest": MITTENS},
                 "chair-eames": {"beta": 0.6, "tau": 0.1, "version": "0.2.1", "digest": EAMES}},
}


def a1111_read(text: str) -> dict:
    """A strict reader of A1111's infotext grammar (written for this test from the format's description,
    independent of perfusion_hub.infotext): the last line must hold at least 3 pairs; quoted values are
    JSON strings; the unquoted `Hashes` JSON object (A1111 extensions, Civitai) is taken first."""
    *lines, last = text.strip().split("\n")
    pair = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
    out: dict = {}
    h = re.search(r", Hashes: (\{[^{}]*\})$", last)
    if h:
        out["Hashes"] = json.loads(h.group(1))
        last = last[: h.start()]
    pairs = pair.findall(last)
    assert len(pairs) >= 3, "not an infotext parameter line"
    consumed = "".join(m.group(0) for m in pair.finditer(last))
    assert consumed == last, f"unparsed text in the parameter line: {last!r}"
    for k, v in pairs:
        out[k] = json.loads(v) if v.startswith('"') else v
    prompt, neg = [], []
    for ln in lines:
        (neg if ln.startswith("Negative prompt:") or neg else prompt).append(ln)
    out["prompt"] = "\n".join(prompt)
    out["negative"] = "\n".join(neg).removeprefix("Negative prompt:").strip()
    return out


def test_infotext_follows_the_a1111_grammar():
    text = format_infotext(PARAMS, "0.1.0")
    got = a1111_read(text)
    assert got["prompt"] == PARAMS["prompt"] and got["negative"] == "blurry, dark"
    assert (got["Steps"], got["Sampler"], got["CFG scale"], got["Seed"], got["Size"]) == ("25", "DDIM", "7.5", "1", "64x64")
    assert got["Model hash"] == "1a2b3c4d5e" and got["Model"] == "toy"
    assert got["Perfusion hashes"] == "cat-mittens: 0123456789, chair-eames: 9876543210"
    assert got["Perfusion params"] == ("cat-mittens: beta=0.7 tau=0.15 version=0.1.0, "
                                       "chair-eames: beta=0.6 tau=0.1 version=0.2.1")
    assert got["Hashes"] == {"model": "1a2b3c4d5e", "perfusion:cat-mittens": "0123456789",
                             "perfusion:chair-eames": "9876543210"}
    assert got["Version"] == "pfx 0.1.0"
    # pfx's own reader agrees, concept by concept
    mine = parse_infotext(text)["concepts"]
    assert mine["chair-eames"] == {"hash": "9876543210", "beta": "0.6", "tau": "0.1", "version": "0.2.1"}


def test_no_concepts_no_negative_and_odd_prompt_text():
    p = dict(PARAMS, concepts={}, negative_prompt="", prompt='a "quoted", odd\nprompt: yes')
    got = a1111_read(format_infotext(p))
    assert got["prompt"] == 'a "quoted", odd prompt: yes'  # one line: newlines would start a new field
    assert "Perfusion hashes" not in got and got["negative"] == "" and got["Hashes"] == {"model": "1a2b3c4d5e"}


def test_saved_png_is_read_by_sd_parsers(tmp_path):
    from perfusion_hub.render import RenderResult

    res = RenderResult([Image.new("RGB", (64, 64), "teal")], PARAMS["text"], list(PARAMS["concepts"]), PARAMS)
    (path,) = res.save(tmp_path / "out.png")
    img = Image.open(path)
    assert json.loads(img.text["pfx"])["concepts"]["cat-mittens"]["digest"] == MITTENS  # pfx's own chunk stays
    info = sd_parsers.ParserManager().parse(img)
    assert info is not None and info.generator.name == "AUTOMATIC1111"
    (sampler,) = info.samplers
    assert sampler.name == "DDIM"
    assert sampler.parameters == {"cfg_scale": "7.5", "seed": "1", "steps": "25"}
    assert (sampler.model.name, sampler.model.hash) == ("toy", "1a2b3c4d5e")
    assert [p.value for p in info.prompts] == [PARAMS["prompt"]]
    assert [p.value for p in info.negative_prompts] == ["blurry, dark"]
    assert info.metadata["Hashes"]["perfusion:cat-mittens"] == MITTENS.split(":")[1][:10]
    assert info.metadata["Size"] == "64x64"


@needs_toy
def test_real_render_names_its_concepts_by_file_hash(tmp_path, monkeypatch):
    """The README's render on the toy base: the PNG names the base and both sample concepts by the
    first 10 hex digits of their files' sha256 (the installed blob digests)."""
    from click.testing import CliRunner

    from cli.main import cli

    monkeypatch.setenv("PFX_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PFX_BASE", raising=False)
    r = CliRunner().invoke(cli, ["install", "cat-mittens", "chair-eames"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = tmp_path / "out.png"
    r = CliRunner().invoke(cli, ["render", "a photo of cat-mittens on chair-eames", "--seed", "1", "--steps", "2",
                                 "-o", str(out), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    listed = json.loads(CliRunner().invoke(cli, ["list", "--json"]).output)
    info = sd_parsers.ParserManager().parse(Image.open(out))
    hashes = info.metadata["Hashes"]
    for row in listed:
        assert hashes[f"perfusion:{row['name']}"] == row["concept"].split(":")[1][:10]
    pfx_chunk = json.loads(Image.open(out).text["pfx"])
    assert info.samplers[0].model.hash == pfx_chunk["base_digest"].split(":")[1][:10]
    got = a1111_read(Image.open(out).text["parameters"])
    assert got["Steps"] == "2" and got["Seed"] == "1" and set(parse_infotext(Image.open(out).text["parameters"])
                                                              ["concepts"]) == {"cat-mittens", "chair-eames"}
