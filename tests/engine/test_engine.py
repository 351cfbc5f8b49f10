"""Engine properties on the embedded toy base (spec/perfusion.md section 8) and the loader API."""

import numpy as np
import pytest
import torch

from perfusion_hub import processor as processor_mod
from perfusion_hub.concept import (
    ConceptFormatError,
    ConceptMismatchError,
    concept_bytes,
    load_concept,
    read_header_bytes,
    save_concept,
)
from perfusion_hub.errors import BadInput, IncompatibleConcepts
from perfusion_hub.loaders import (
    load_concepts,
    loaded_concepts,
    runtime_of,
    set_concept_params,
    unload_concepts,
)
from perfusion_hub.processor import PerfusionAttnProcessor, cross_attention_modules
from perfusion_hub.render import render
from tests.kit.engine import synthetic_concept

PROMPT = "a photo of a cat on a chair"


def _pixels(img):
    return np.asarray(img, dtype=np.uint8)


def test_prompt_without_concepts_is_bit_identical_with_concepts_loaded(clean_base, toy_cov):
    base = clean_base
    originals = {p: type(m.processor) for p, m in cross_attention_modules(base.pipe.unet).items()}
    plain = _pixels(render(base, PROMPT, steps=3, seed=3).images[0])
    cat = synthetic_concept(base, toy_cov, "cat-mittens", "cat", seed=1)
    chair = synthetic_concept(base, toy_cov, "chair-eames", "chair", seed=2)
    load_concepts(base.pipe, [cat, chair], covariance=toy_cov)
    assert all(isinstance(m.processor, PerfusionAttnProcessor) for m in cross_attention_modules(base.pipe.unet).values())
    loaded = _pixels(render(base, PROMPT, steps=3, seed=3).images[0])
    direct = base.pipe(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(3),
                       height=64, width=64).images[0]
    assert np.array_equal(plain, loaded)
    assert np.array_equal(plain, _pixels(direct))
    used = _pixels(render(base, "a photo of <cat-mittens> on a chair", steps=3, seed=3).images[0])
    assert np.abs(used.astype(int) - plain.astype(int)).max() > 0  # the concept does change the image
    unload_concepts(base.pipe)
    assert {p: type(m.processor) for p, m in cross_attention_modules(base.pipe.unet).items()} == originals
    assert "<cat-mittens>" not in base.pipe.tokenizer.get_vocab()
    assert np.array_equal(plain, _pixels(render(base, PROMPT, steps=3, seed=3).images[0]))


def test_self_attention_is_never_replaced(clean_base, toy_cov):
    base = clean_base
    before = {n: p for n, p in base.pipe.unet.attn_processors.items() if ".attn1." in n}
    load_concepts(base.pipe, [synthetic_concept(base, toy_cov, "cat-mittens", "cat")], covariance=toy_cov)
    after = {n: p for n, p in base.pipe.unet.attn_processors.items() if ".attn1." in n}
    assert before == after


def test_plain_pipeline_call_detects_concepts_from_tokens(clean_base, toy_cov):
    base = clean_base
    load_concepts(base.pipe, [synthetic_concept(base, toy_cov, "cat-mittens", "cat", seed=4)], covariance=toy_cov)
    via_render = _pixels(render(base, "a photo of <cat-mittens>", steps=3, seed=5).images[0])
    direct = base.pipe("a photo of <cat-mittens>", num_inference_steps=3, generator=torch.Generator().manual_seed(5),
                       height=64, width=64).images[0]
    assert np.array_equal(via_render, _pixels(direct))


def test_key_lock_and_shut_gate_on_every_layer(clean_base, toy_cov):
    base = clean_base
    c = synthetic_concept(base, toy_cov, "cat-mittens", "cat", seed=6)
    load_concepts(base.pipe, [c], covariance=toy_cov)
    rt = runtime_of(base.pipe)
    dim = c.target_input.shape[0]
    e_star = c.target_input.expand(1, 77, dim).clone()
    rt.gate_override = torch.ones(1)
    try:
        for path, attn in rt.layers.items():
            k, v = rt.key_value(path, attn, e_star, ["cat-mittens"])
            torch.testing.assert_close(k[0, 5], attn.to_k.weight.float() @ c.superclass_input, rtol=1e-3, atol=1e-4)
            torch.testing.assert_close(v[0, 5], c.value_targets[path], rtol=1e-3, atol=1e-4)
        rt.gate_override = torch.zeros(1)
        rt.touch()
        e = torch.randn(2, 77, dim, generator=torch.Generator().manual_seed(0))
        c_inv = rt.c_inv.float()
        i = c.target_input
        e_perp = e - ((e @ (c_inv @ i)) / (i @ c_inv @ i))[..., None] * i
        for path, attn in rt.layers.items():
            k, v = rt.key_value(path, attn, e, ["cat-mittens"])
            torch.testing.assert_close(k, e_perp @ attn.to_k.weight.float().T, rtol=1e-3, atol=1e-3)
            torch.testing.assert_close(v, e_perp @ attn.to_v.weight.float().T, rtol=1e-3, atol=1e-3)
    finally:
        rt.gate_override = None


def test_text_kv_computed_once_per_prompt(clean_base, toy_cov, monkeypatch):
    base = clean_base
    load_concepts(base.pipe, [synthetic_concept(base, toy_cov, "cat-mittens", "cat")], covariance=toy_cov)
    calls = []
    real = processor_mod.edited_projection
    monkeypatch.setattr(processor_mod, "edited_projection", lambda *a, **k: calls.append(1) or real(*a, **k))
    render(base, "a photo of <cat-mittens>", steps=4, seed=0)
    layers = len(runtime_of(base.pipe).layers)
    assert len(calls) == 2 * layers  # K and V once per layer for the whole 4-step render


def test_gate_parameters_change_the_image_and_can_be_reset(clean_base, toy_cov):
    base = clean_base
    load_concepts(base.pipe, [synthetic_concept(base, toy_cov, "cat-mittens", "cat", scale=3.0)], covariance=toy_cov)
    p = "a photo of <cat-mittens>"
    default = _pixels(render(base, p, steps=3).images[0])
    strong = _pixels(render(base, p, steps=3, beta={"cat-mittens": 0.3}).images[0])
    assert not np.array_equal(default, strong)
    assert np.array_equal(default, _pixels(render(base, p, steps=3).images[0]))  # per-call override only
    set_concept_params(base.pipe, "cat-mittens", beta=0.3)
    assert np.array_equal(strong, _pixels(base.pipe(p, num_inference_steps=3, height=64, width=64,
                                                    generator=torch.Generator().manual_seed(0)).images[0]))


def test_global_lock_differs_from_local_and_leaves_plain_prompts_alone(clean_base, toy_cov):
    base = clean_base
    c = synthetic_concept(base, toy_cov, "cat-mittens", "cat", seed=8, scale=2.0)
    p = "a photo of <cat-mittens> on a chair"
    local = _pixels(render(base, p, concepts=[c], covariance=toy_cov, steps=3).images[0])
    glob = _pixels(render(base, p, concepts=[c], covariance=toy_cov, steps=3, global_lock=True).images[0])
    assert not np.array_equal(local, glob)
    assert runtime_of(base.pipe).key_states is None


def test_save_load_round_trip_is_exact(clean_base, toy_cov, tmp_path):
    c = synthetic_concept(clean_base, toy_cov, "cat-mittens", "cat", seed=9)
    path = save_concept(c, tmp_path / "c.safetensors")
    back = load_concept(path)
    assert back.metadata == c.metadata  # no card given, none added (a trained concept has one: tests/registry)
    assert save_concept(back, tmp_path / "again.safetensors").read_bytes() == path.read_bytes()
    for k, t in c.tensors().items():
        assert torch.equal(back.tensors()[k], t), k
    assert concept_bytes(back) == path.read_bytes()
    half = load_concept(concept_bytes(c, dtype="fp16"))
    torch.testing.assert_close(half.target_input, c.target_input, rtol=1e-3, atol=1e-3)


def test_concept_for_another_base_is_refused_naming_both(clean_base, toy_cov):
    base = clean_base
    c = synthetic_concept(base, toy_cov, "cat-mittens", "cat")
    c.metadata["base_name"] = "sd15"
    c.metadata["base_digest"] = "sha256:" + "ab" * 32
    with pytest.raises(ConceptMismatchError) as e:
        load_concepts(base.pipe, [c], covariance=toy_cov, base_name="toy")
    msg = str(e.value)
    assert "sd15" in msg and "sha256:abab" in msg and "toy" in msg and base.digest[:19] in msg
    assert loaded_concepts(base.pipe) == [] and "<cat-mittens>" not in base.pipe.tokenizer.get_vocab()
    # declared compatible: accepted
    load_concepts(base.pipe, [c], covariance=toy_cov, compatible_bases=["sha256:" + "ab" * 32])
    assert loaded_concepts(base.pipe) == ["cat-mittens"]


def test_wrong_shapes_and_corpus_refused(clean_base, toy_cov):
    base = clean_base
    c = synthetic_concept(base, toy_cov, "cat-mittens", "cat")
    path = next(iter(c.value_targets))
    c.value_targets[path] = c.value_targets[path][:-1]
    with pytest.raises(ConceptMismatchError, match=path.replace(".", r"\.")):
        load_concepts(base.pipe, [c], covariance=toy_cov)
    other = synthetic_concept(base, toy_cov, "chair-eames", "chair")
    other.metadata["corpus_digest"] = "sha256:" + "cd" * 32
    with pytest.raises(IncompatibleConcepts, match="corpora"):
        load_concepts(base.pipe, [synthetic_concept(base, toy_cov, "cat-mittens", "cat"), other],
                      covariance=toy_cov)
    assert loaded_concepts(base.pipe) == []


def test_dependent_concepts_refused(clean_base, toy_cov):
    base = clean_base
    a = synthetic_concept(base, toy_cov, "cat-a", "cat", seed=1)
    b = synthetic_concept(base, toy_cov, "cat-b", "cat", seed=2)
    b.target_input = a.target_input * 1.5
    with pytest.raises(IncompatibleConcepts, match="cat-a and cat-b .*dependent"):  # refused at load, named
        load_concepts(base.pipe, [a, b], covariance=toy_cov)
    assert runtime_of(base.pipe) is None  # nothing changed


def test_unload_one_of_two_keeps_the_other_working(clean_base, toy_cov):
    base = clean_base
    cat = synthetic_concept(base, toy_cov, "cat-mittens", "cat", seed=1)
    chair = synthetic_concept(base, toy_cov, "chair-eames", "chair", seed=2)
    load_concepts(base.pipe, [chair], covariance=toy_cov)
    alone = _pixels(render(base, "a photo of <chair-eames>", steps=3).images[0])
    load_concepts(base.pipe, [cat], covariance=toy_cov)
    unload_concepts(base.pipe, ["cat-mittens"])
    assert loaded_concepts(base.pipe) == ["chair-eames"]
    assert np.array_equal(alone, _pixels(render(base, "a photo of <chair-eames>", steps=3).images[0]))


@pytest.mark.parametrize("damage", ["truncate", "header", "size", "nan"])
def test_corrupt_concept_refused_before_any_tensor_is_used(clean_base, toy_cov, damage, monkeypatch):
    data = bytearray(concept_bytes(synthetic_concept(clean_base, toy_cov, "cat-mittens", "cat")))
    if damage == "truncate":
        data = data[: len(data) - 7]
    elif damage == "header":
        data[12] = 0xFF  # not UTF-8 inside the JSON header
    elif damage == "size":
        data[0:8] = (10**9).to_bytes(8, "little")
    else:
        meta_len = int.from_bytes(data[:8], "little")
        data[8 + meta_len : 8 + meta_len + 4] = np.array([np.nan], dtype=np.float32).tobytes()
    import safetensors.torch

    used = []
    real = safetensors.torch.load
    if damage != "nan":  # structural damage must be caught by the header check alone
        monkeypatch.setattr(safetensors.torch, "load", lambda *a, **k: used.append(1) or real(*a, **k))
    with pytest.raises(ConceptFormatError):
        load_concept(bytes(data))
    assert not used
    with pytest.raises(ConceptFormatError):
        load_concepts(clean_base.pipe, [bytes(data)], covariance=toy_cov)
    assert loaded_concepts(clean_base.pipe) == []


def test_header_readable_without_torch(tmp_path, clean_base, toy_cov):
    import subprocess
    import sys

    path = save_concept(synthetic_concept(clean_base, toy_cov, "cat-mittens", "cat"), tmp_path / "c.safetensors")
    code = ("import sys; from perfusion_hub.concept import read_header; h = read_header(sys.argv[1]); "
            "print(h.name, h.dim, len(h.layers)); assert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["cat-mittens", "128", "7"]
    assert read_header_bytes(path.read_bytes()).trigger == "<cat-mittens>"


def test_multi_token_superclass_refused_with_split(clean_base):
    from perfusion_hub.train import check_superclass

    tok = clean_base.pipe.tokenizer
    assert isinstance(check_superclass(tok, "cat"), int)
    with pytest.raises(BadInput) as e:
        check_superclass(tok, "teddy bear")
    assert "2 tokens" in str(e.value) and "teddy + bear" in str(e.value)


def test_single_file_checkpoint_errors_say_what_to_do(tmp_path, monkeypatch):
    """No SD1.5 weights exist here: the single-file path is checked up to where the weights are needed."""
    from safetensors.torch import save_file

    from perfusion_hub import bases
    from perfusion_hub.bases import load_base, resolve_spec
    from perfusion_hub.errors import BaseNotAvailable

    monkeypatch.setattr(bases, "TOKENIZER_CACHE_IDS", (("pfx-test/not-in-any-cache", None),))
    ckpt = tmp_path / "model.safetensors"
    save_file({"not.a.unet": torch.zeros(2)}, str(ckpt))
    assert resolve_spec(str(ckpt)).kind == "file"
    with pytest.raises(BaseNotAvailable, match="--tokenizer"):
        load_base(str(ckpt), device="cpu", offline=True)
    tok = resolve_spec("toy").location + "/tokenizer"
    with pytest.raises(BaseNotAvailable, match="cannot load base"):
        load_base(str(ckpt), device="cpu", tokenizer=tok, offline=True)
    with pytest.raises(BaseNotAvailable, match="holds no CLIP tokenizer"):
        load_base(str(ckpt), device="cpu", tokenizer=str(tmp_path), offline=True)
    with pytest.raises(BaseNotAvailable, match="offline"):
        load_base("someone/some-model", device="cpu", offline=True)


def test_toy_base_edits_only_the_prompts_own_positions(clean_base, toy_cov):
    """The toy base declares gate_positions "span" (data/toy/pfx.json), which edits only the prompt's own
    positions: K/V at padding positions stay the base's, the concept token's change; a runtime gating every
    position (the paper's rule) would also edit the padding, whose encodings copy the concept token in this
    small text encoder."""
    from perfusion_hub.processor import PerfusionRuntime, positions_from_ids

    base = clean_base
    assert base.pipe._pfx_gate_positions == "span"
    c = synthetic_concept(base, toy_cov, "cat-mittens", "cat", seed=6, scale=3.0, target_shift=0.0)
    load_concepts(base.pipe, [c], covariance=toy_cov)
    rt = runtime_of(base.pipe)
    assert rt.gate_positions == "span"
    tok, te = base.pipe.tokenizer, base.pipe.text_encoder
    ids = tok(["a photo of a <cat-mittens>"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    pos = positions_from_ids(ids, tok.eos_token_id)
    n = int(pos.sum())
    assert n == 7 and ids[0, n - 1] == tok.eos_token_id  # start, 5 words, end-of-text
    with torch.no_grad():
        ehs = te(ids)[0]
    path, attn = next(iter(cross_attention_modules(base.pipe.unet).items()))
    rt.activate(["cat-mittens"])
    rt.position_masks = rt.masks_from_ids(ids, ["cat-mittens"])
    with torch.no_grad():
        k, v = rt.key_value(path, attn, ehs, ["cat-mittens"])
        k0, v0 = attn.to_k(ehs), attn.to_v(ehs)
    assert torch.equal(k[0, n:], k0[0, n:]) and torch.equal(v[0, n:], v0[0, n:])
    concept_at = int((ids[0] == tok.convert_tokens_to_ids("<cat-mittens>")).nonzero())
    assert not torch.allclose(v[0, concept_at], v0[0, concept_at], atol=1e-3)
    every = PerfusionRuntime(base.pipe.unet, toy_cov.matrix)  # the paper's rule: all 77 positions
    every.add(rt.concepts["cat-mittens"])
    with torch.no_grad():
        _, v_all = every.key_value(path, attn, ehs, ["cat-mittens"])
    assert not torch.allclose(v_all[0, n:], v0[0, n:], atol=1e-3)
    rt.activate(None)
    rt.position_masks = None
    unload_concepts(base.pipe)


@pytest.mark.parametrize("mode", ["span", "prompt"])
def test_span_gates_keep_each_concept_to_its_part_of_the_prompt(clean_base, toy_cov, mode):
    """gate_positions "span" (the toy base): a concept's value targets reach the K/V only from its own token up
    to the next concept's token, so in "<cat-mittens> on a <chair-eames> ..." the cat's edit leaves the chair's
    position, and everything after it or before the cat, alone. Under "prompt" the cat's gate is also (partly)
    open at the chair's position: this causal text encoder carries the first concept into the second one's
    encoding."""
    from perfusion_hub.processor import PerfusionRuntime

    base = clean_base
    cat = synthetic_concept(base, toy_cov, "cat-mittens", "cat", seed=1)
    chair = synthetic_concept(base, toy_cov, "chair-eames", "chair", seed=2)
    load_concepts(base.pipe, [cat, chair], covariance=toy_cov)
    loaded = runtime_of(base.pipe)
    rt = PerfusionRuntime(base.pipe.unet, toy_cov.matrix, gate_positions=mode)
    rt.eos_id = loaded.eos_id
    for n in ("cat-mittens", "chair-eames"):
        rt.add(loaded.concepts[n])
    tok, te = base.pipe.tokenizer, base.pipe.text_encoder
    ids = tok(["a photo of a <cat-mittens> on a <chair-eames> on a green background"], padding="max_length",
              max_length=77, return_tensors="pt").input_ids
    at_cat, at_chair = (int((ids[0] == rt.concepts[n].token_id).nonzero()) for n in ("cat-mittens", "chair-eames"))
    names = ["cat-mittens", "chair-eames"]
    rt.position_masks = rt.masks_from_ids(ids, names)
    if mode == "span":
        spans = rt.position_masks[1][0]
        assert spans[:, 0].nonzero().flatten().tolist() == list(range(at_cat, at_chair))
        assert spans[:, 1].nonzero().flatten().tolist() == list(range(at_chair, 77))
    path, attn = next(iter(cross_attention_modules(base.pipe.unet).items()))
    state = rt.concepts["cat-mittens"]
    saved = dict(state.value_targets)
    try:
        with torch.no_grad():
            ehs = te(ids)[0]
            _, v = rt.key_value(path, attn, ehs, names)
            state.value_targets = {p: t + 100 * t.norm() for p, t in saved.items()}  # a very different cat
            rt.touch()
            _, v2 = rt.key_value(path, attn, ehs, names)
    finally:
        state.value_targets = saved
        unload_concepts(base.pipe)
    assert not torch.allclose(v[0, at_cat], v2[0, at_cat], atol=1e-3)
    outside = [j for j in range(77) if not at_cat <= j < at_chair]
    if mode == "span":
        assert torch.equal(v[0, outside], v2[0, outside])
    else:
        assert not torch.allclose(v[0, at_chair], v2[0, at_chair], atol=1e-3)
