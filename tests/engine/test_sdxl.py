"""SDXL bases (issue 20) on a small random SDXL-shaped pipeline (tests/familykit.py) and the shipped SDXL configs.

Properties (spec/perfusion.md section 8, on the 160-d concatenated text space of two encoders): key lock and shut
gate on every attn2 layer, one concept through the multi-concept path equals the single-concept path, no concept
referenced -> bit-identical images, the pooled-embedding policy, save/load round trip of format v2, a concept of
another family refused (also through the CLI, exit 7), training finite and bitwise deterministic, the base digest
covers both text encoders, the joint covariance, and the SDXL architecture facts from the shipped configs.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from perfusion_hub import arch
from perfusion_hub.concept import (
    ConceptFormatError,
    ConceptMismatchError,
    concept_bytes,
    load_concept,
    read_header_bytes,
    save_concept,
)
from perfusion_hub.loaders import load_concepts, loaded_concepts, runtime_of, unload_concepts
from perfusion_hub.render import render
from perfusion_hub.text import TextEncoders, family_of
from tests.kit.engine import photo_folder
from tests.kit.family import small_covariance, synthetic_concept, tiny_sdxl_pipe

SDXL_CONFIGS = Path(__file__).resolve().parents[2] / "perfusion_hub" / "data" / "sdxl"


def _px(img):
    return np.asarray(img, dtype=np.uint8)


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """(base, covariance) of the tiny SDXL pipeline, saved as a diffusers folder and loaded through load_base."""
    from perfusion_hub.bases import load_base

    torch.set_num_threads(2)
    folder = tmp_path_factory.mktemp("xl") / "tiny-sdxl"
    tiny_sdxl_pipe().save_pretrained(str(folder))
    base = load_base(str(folder), device="cpu", dtype="fp32")
    return base, small_covariance(base)


@pytest.fixture
def clean_xl(xl):
    unload_concepts(xl[0].pipe)
    yield xl
    unload_concepts(xl[0].pipe)


def test_sdxl_attn2_layout_and_concept_size_from_the_shipped_config():
    """The issue's numbers from data/sdxl/unet/config.json alone (70 attn2: 10 x 640 + 60 x 1280 = 83,200), the same
    map as the UNet diffusers builds from that config (on the meta device: no 2.6 B weights), to_k/to_v 2048 -> width
    without bias; and an SDXL concept of those shapes: <= 180 KB in fp16 (what pfx writes), ~350 KB in fp32."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention

    from perfusion_hub.concept import Concept, family_metadata

    cfg = json.loads((SDXL_CONFIGS / "unet" / "config.json").read_text())
    widths = arch.attn2_widths_from_config(cfg)
    assert len(widths) == 70 and sum(widths.values()) == 83_200
    assert sorted(widths.values()).count(640) == 10 and sorted(widths.values()).count(1280) == 60
    assert arch.text_dim_from_config(cfg) == 2048
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
    real = {n: m for n, m in unet.named_modules() if isinstance(m, Attention) and m.is_cross_attention}
    assert list(widths.items()) == [(n, m.to_k.out_features) for n, m in real.items()]
    assert all(m.to_k.in_features == m.to_v.in_features == 2048 and m.to_k.bias is None and m.to_v.bias is None
               for m in real.values())
    dims = [json.loads((SDXL_CONFIGS / sub / "config.json").read_text())["hidden_size"]
            for sub in ("text_encoder", "text_encoder_2")]
    assert dims == [768, 1280]
    assert arch.concept_float_count(cfg, text_dims=dims) == 768 + 1280 + 2 * 2048 + 83_200 == 89_344

    meta = {
        **family_metadata("sdxl", dims), "format": "pfx.concept", "format_version": "2", "name": "mittens",
        "version": "1.0.0", "superclass": "cat", "trigger": "<mittens>", "base_name": "stable-diffusion-xl-base-1.0",
        "base_digest": "sha256:" + "ab" * 32, "covariance_digest": "sha256:" + "cd" * 32,
        "corpus_digest": "sha256:" + "ef" * 32, "beta": "0.7", "tau": "0.15", "key_lock": "local",
        "training": json.dumps({"steps": 400, "batch_size": 16, "lr_values": 0.03, "lr_embedding": 0.006, "seed": 0,
                                "num_images": 12, "image_digests": ["sha256:" + "0" * 64] * 12,
                                "pooled": "superclass"}),
        "created": "2026-01-01T00:00:00Z", "license": "CC-BY-4.0", "pfx_version": "0.1.0",
    }
    c = Concept(meta, torch.zeros(768), torch.zeros(2048), torch.zeros(2048),
                {k: torch.zeros(w) for k, w in widths.items()}, extra_embeddings={"token_embedding_2": torch.zeros(1280)})
    fp16, fp32 = concept_bytes(c, dtype="fp16"), concept_bytes(c)
    assert 89_344 * 2 < len(fp16) <= 180 * 1024, len(fp16)
    assert 89_344 * 4 < len(fp32) < 89_344 * 4 + 16 * 1024, len(fp32)
    h = read_header_bytes(fp16)
    assert (h.family, h.text_dims, h.dim, len(h.layers)) == ("sdxl", [768, 1280], 2048, 70)


def test_family_detection_and_text_side(xl):
    base, cov = xl
    assert type(base.pipe).__name__ == "StableDiffusionXLPipeline"
    assert family_of(base.pipe) == base.family == "sdxl"
    text = TextEncoders.of(base.pipe)
    assert text.widths == [64, 96] and base.dim == 160 and cov.matrix.shape == (160, 160)
    # the context is exactly what the pipeline's encode_prompt builds (concatenated penultimate states), and C is its
    # second moment over all 77 positions, jointly over both encoders
    ids = text.tokenize(["a photo of a cat"])
    enc, pooled = text.encode(ids, with_pooled=True)
    pos, _, pipe_pooled, _ = base.pipe.encode_prompt("a photo of a cat", device="cpu",
                                                     do_classifier_free_guidance=False)
    assert torch.equal(enc, pos) and torch.equal(pooled, pipe_pooled)
    from perfusion_hub.captions import load_captions

    lines = load_captions()[:64]
    e = torch.cat([text.encode(text.tokenize(lines[i:i + 32])) for i in (0, 32)]).reshape(-1, 160).double()
    torch.testing.assert_close(cov.matrix, (e.T @ e / e.shape[0]).float().double(), rtol=1e-5, atol=1e-6)
    assert cov.count == 64 * 77


def test_base_digest_covers_both_text_encoders(xl):
    from perfusion_hub.bases import compute_digest

    pipe = tiny_sdxl_pipe()
    d0 = compute_digest(pipe)
    assert d0 == xl[0].digest  # saved and reloaded: the same weights, the same digest
    pipe._pfx_base_digest = None
    with torch.no_grad():
        pipe.text_encoder_2.text_model.final_layer_norm.weight[0] += 0.5
    assert compute_digest(pipe) != d0


def test_concept_token_in_both_tokenizers_and_unload_restores(clean_xl):
    base, cov = clean_xl
    pipe = base.pipe
    def sizes_now():
        return (len(pipe.tokenizer), len(pipe.tokenizer_2), pipe.text_encoder.get_input_embeddings().weight.shape[0],
                pipe.text_encoder_2.get_input_embeddings().weight.shape[0])

    sizes = sizes_now()
    c = synthetic_concept(base, cov, "cat-mittens", "cat", seed=1)
    load_concepts(pipe, [c], covariance=cov)
    for tok, te, emb in ((pipe.tokenizer, pipe.text_encoder, c.token_embedding),
                         (pipe.tokenizer_2, pipe.text_encoder_2, c.extra_embeddings["token_embedding_2"])):
        tid = tok.convert_tokens_to_ids("<cat-mittens>")
        assert torch.equal(te.get_input_embeddings().weight[tid], emb)
    unload_concepts(pipe)
    assert sizes == sizes_now()
    assert not hasattr(pipe, "_pfx_pooled") and not pipe.text_encoder_2._forward_hooks


def test_no_concept_referenced_is_bit_identical_and_concepts_change_the_image(clean_xl):
    base, cov = clean_xl
    pipe = base.pipe
    direct = _px(pipe("a photo of a cat on a chair", num_inference_steps=2, height=32, width=32,
                      guidance_scale=7.5, generator=torch.Generator().manual_seed(3)).images[0])
    plain = _px(render(base, "a photo of a cat on a chair", steps=2, seed=3).images[0])
    load_concepts(pipe, [synthetic_concept(base, cov, "cat-mittens", "cat", seed=1, scale=3.0),
                         synthetic_concept(base, cov, "chair-eames", "chair", seed=2, scale=3.0)], covariance=cov)
    loaded = _px(render(base, "a photo of a cat on a chair", steps=2, seed=3).images[0])
    assert np.array_equal(plain, direct) and np.array_equal(plain, loaded)
    used = _px(render(base, "a photo of <cat-mittens> on a chair", steps=2, seed=3).images[0])
    assert np.abs(used.astype(int) - plain.astype(int)).max() > 0
    # a plain pipeline call detects the concept from its tokens and gives render()'s image
    again = _px(pipe("a photo of <cat-mittens> on a chair", num_inference_steps=2, height=32, width=32,
                     guidance_scale=7.5, generator=torch.Generator().manual_seed(3)).images[0])
    assert np.array_equal(used, again)
    unload_concepts(pipe)
    assert np.array_equal(plain, _px(render(base, "a photo of a cat on a chair", steps=2, seed=3).images[0]))


def test_pooled_embedding_is_the_superclass_prompts(clean_xl):
    """The pooled policy: with a concept in the prompt the UNet's add_embedding gets the pooled vector of the
    superclass prompt (concept token -> its superclass word), and the context keeps the concept token."""
    base, cov = clean_xl
    pipe = base.pipe
    c = synthetic_concept(base, cov, "cat-mittens", "cat", seed=1)
    load_concepts(pipe, [c], covariance=cov)
    seen = []
    h = pipe.unet.register_forward_pre_hook(lambda m, a, k: seen.append(k["added_cond_kwargs"]["text_embeds"].clone()),
                                            with_kwargs=True)
    try:
        render(base, "a photo of <cat-mittens> on a chair", steps=1, seed=0, guidance=1.0)
        render(base, "a photo of cat on a chair", steps=1, seed=0, guidance=1.0)  # the superclass prompt
        ctx, _, _, _ = pipe.encode_prompt("a photo of <cat-mittens>", device="cpu", do_classifier_free_guidance=False)
        sup_ctx, _, _, _ = pipe.encode_prompt("a photo of a cat", device="cpu", do_classifier_free_guidance=False)
    finally:
        h.remove()
    assert torch.equal(seen[0], seen[1])
    assert not torch.equal(ctx, sup_ctx)  # the context does see the concept token (both encoders' parts)
    assert not torch.equal(ctx[..., :64], sup_ctx[..., :64]) and not torch.equal(ctx[..., 64:], sup_ctx[..., 64:])


def test_key_lock_and_shut_gate_on_every_layer(clean_xl):
    base, cov = clean_xl
    c = synthetic_concept(base, cov, "cat-mittens", "cat", seed=6)
    load_concepts(base.pipe, [c], covariance=cov)
    rt = runtime_of(base.pipe)
    assert len(rt.layers) == 12 and rt.dim == 160
    e_star = c.target_input.expand(1, 77, 160).clone()
    rt.gate_override = torch.ones(1)
    try:
        for path, attn in rt.layers.items():
            k, v = rt.key_value(path, attn, e_star, ["cat-mittens"])
            torch.testing.assert_close(k[0, 5], attn.to_k.weight.float() @ c.superclass_input, rtol=1e-3, atol=1e-4)
            torch.testing.assert_close(v[0, 5], c.value_targets[path], rtol=1e-3, atol=1e-4)
        rt.gate_override = torch.zeros(1)
        rt.touch()
        e = torch.randn(2, 77, 160, generator=torch.Generator().manual_seed(0))
        c_inv, i = rt.c_inv.float(), c.target_input
        e_perp = e - ((e @ (c_inv @ i)) / (i @ c_inv @ i))[..., None] * i
        for path, attn in rt.layers.items():
            k, v = rt.key_value(path, attn, e, ["cat-mittens"])
            torch.testing.assert_close(k, e_perp @ attn.to_k.weight.float().T, rtol=1e-3, atol=1e-3)
            torch.testing.assert_close(v, e_perp @ attn.to_v.weight.float().T, rtol=1e-3, atol=1e-3)
    finally:
        rt.gate_override = None


def test_one_concept_through_the_multi_concept_path_equals_the_single_path(clean_xl):
    """The exact projector (whitening + QR, edit.make_basis) with one concept equals the single-concept formula the
    runtime uses (P e = s(e) i*), on every layer; and with a second concept loaded but not referenced, a prompt
    using the first one renders exactly as with it alone."""
    from perfusion_hub.edit import Basis, make_basis

    base, cov = clean_xl
    cat = synthetic_concept(base, cov, "cat-mittens", "cat", seed=1, scale=3.0)
    load_concepts(base.pipe, [cat], covariance=cov)
    alone = _px(render(base, "a photo of <cat-mittens>", steps=2, seed=1).images[0])
    rt = runtime_of(base.pipe)
    ehs = torch.randn(2, 77, 160, generator=torch.Generator().manual_seed(5)) + cat.target_input
    single = {p: rt.key_value(p, a, ehs, ["cat-mittens"]) for p, a in rt.layers.items()}
    s = rt.concepts["cat-mittens"]
    b = make_basis(s.target_input[None].double(), rt.c_inv, rt.root, torch.tensor([s.beta]), torch.tensor([s.tau]))
    rt._basis_cache = ((("cat-mittens",), str(ehs.device)), Basis(*b.__dict__.values()))
    rt._layer_cache.clear()
    rt._kv_cache.clear()
    for p, a in rt.layers.items():
        k, v = rt.key_value(p, a, ehs, ["cat-mittens"])
        torch.testing.assert_close(k, single[p][0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(v, single[p][1], rtol=1e-4, atol=1e-4)
    rt.touch()
    load_concepts(base.pipe, [synthetic_concept(base, cov, "chair-eames", "chair", seed=2, scale=3.0)], covariance=cov)
    assert np.array_equal(alone, _px(render(base, "a photo of <cat-mittens>", steps=2, seed=1).images[0]))
    both = _px(render(base, "a photo of <cat-mittens> on <chair-eames>", steps=2, seed=1).images[0])
    assert np.isfinite(both).all()


def test_format_v2_round_trip_and_header_without_torch(clean_xl, tmp_path):
    import subprocess
    import sys

    base, cov = clean_xl
    c = synthetic_concept(base, cov, "cat-mittens", "cat", seed=9)
    path = save_concept(c, tmp_path / "c.safetensors")
    back = load_concept(path)
    assert back.metadata == c.metadata and back.family == "sdxl" and back.text_dims == [64, 96]
    assert set(back.tensors()) == set(c.tensors())
    for k, t in c.tensors().items():
        assert torch.equal(back.tensors()[k], t), k
    assert concept_bytes(back) == path.read_bytes()
    half = load_concept(concept_bytes(c, dtype="fp16"))
    torch.testing.assert_close(half.extra_embeddings["token_embedding_2"], c.extra_embeddings["token_embedding_2"],
                               rtol=1e-3, atol=1e-3)
    code = ("import sys; from perfusion_hub.concept import read_header; h = read_header(sys.argv[1]); "
            "print(h.format_version, h.family, h.dim, *h.text_dims, len(h.layers)); assert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["2", "sdxl", "160", "64", "96", "12"]


@pytest.mark.parametrize("damage", ["no_second_embedding", "wrong_dims", "bad_family", "sum", "v1_with_extra"])
def test_v2_header_checks(clean_xl, damage):
    base, cov = clean_xl
    c = synthetic_concept(base, cov, "cat-mittens", "cat")
    if damage == "no_second_embedding":
        c.extra_embeddings = {}
    elif damage == "wrong_dims":
        c.metadata["text_dims"], c.metadata["text_dim"] = "[96, 64]", "160"
    elif damage == "bad_family":
        c.metadata["family"] = "sd3"
    elif damage == "sum":
        c.metadata["text_dim"] = "161"
    else:
        c.metadata["format_version"] = "1"
    with pytest.raises(ConceptFormatError):
        concept_bytes(c)  # never written, and (same check) never read


def test_wrong_family_refused_both_ways(clean_xl, clean_base, toy_cov):
    """An SDXL concept on the SD1-family toy base, and a toy (v1) concept on the SDXL base: ConceptMismatchError naming
    both families (exit 7 in the CLI), before anything in the pipeline changes."""
    from perfusion_hub.errors import IncompatibleConcepts
    from tests.kit.engine import synthetic_concept as toy_concept

    base, cov = clean_xl
    xl_concept = synthetic_concept(base, cov, "cat-mittens", "cat")
    with pytest.raises(ConceptMismatchError) as e:
        load_concepts(clean_base.pipe, [xl_concept], covariance=toy_cov, base_name="toy")
    msg = str(e.value)
    assert "SDXL" in msg and "SD1.x" in msg and "tiny-sdxl" in msg and "'toy'" in msg
    assert loaded_concepts(clean_base.pipe) == [] and "<cat-mittens>" not in clean_base.pipe.tokenizer.get_vocab()
    sd1 = toy_concept(clean_base, toy_cov, "chair-eames", "chair")
    with pytest.raises(ConceptMismatchError, match=r"SD1\.x .* is SDXL"):
        load_concepts(base.pipe, [sd1], covariance=cov, base_name="tiny-sdxl")
    # declaring the bases compatible does not make another family's concept fit
    with pytest.raises(ConceptMismatchError, match="family"):
        load_concepts(base.pipe, [sd1], covariance=cov, compatible_bases=[sd1.metadata["base_digest"]])
    assert loaded_concepts(base.pipe) == [] and "<chair-eames>" not in base.pipe.tokenizer_2.get_vocab()
    assert issubclass(ConceptMismatchError, ValueError) and not issubclass(ConceptMismatchError, IncompatibleConcepts)


def test_training_is_finite_deterministic_and_leaves_the_base_clean(clean_xl, tmp_path):
    from perfusion_hub.train import TrainConfig, train_concept

    base, cov = clean_xl
    pipe = base.pipe
    photos = photo_folder(tmp_path / "photos")
    cfg = TrainConfig(steps=2, batch_size=2, previews=0)
    vocab = (len(pipe.tokenizer), len(pipe.tokenizer_2))
    runs = [train_concept(base, photos, name="cat-mittens", superclass="cat", covariance=cov,
                          out_path=tmp_path / f"{i}.safetensors", config=cfg) for i in range(2)]
    a, b = runs
    assert all(np.isfinite(a.losses)) and len(a.losses) == 2
    for k, t in a.concept.tensors().items():
        assert torch.equal(t, b.concept.tensors()[k]), k
    assert a.concept.family == "sdxl" and json.loads(a.concept.metadata["training"])["pooled"] == "superclass"
    sup = TextEncoders.of(pipe).word_ids("cat")
    for key, te, tid in (("token_embedding", pipe.text_encoder, sup[0]),
                         ("token_embedding_2", pipe.text_encoder_2, sup[1])):  # both trained, from the superclass rows
        emb = a.concept.tensors()[key]
        assert not torch.allclose(emb, te.get_input_embeddings().weight[tid], atol=1e-4)
    assert not torch.equal(a.concept.target_input, a.concept.superclass_input)
    assert (len(pipe.tokenizer), len(pipe.tokenizer_2)) == vocab
    assert all(not p.requires_grad for m in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2) for p in m.parameters())
    header = read_header_bytes((tmp_path / "0.safetensors").read_bytes())
    assert header.format_version == "2" and {t.dtype for t in header.tensors.values()} == {"F16"}  # SDXL: fp16


def test_gradient_checkpointing_gives_the_same_training_step(clean_xl, tmp_path):
    """The memory option: a step with gradient checkpointing equals one without (up to recomputation rounding), and
    the UNet is left as it was."""
    from perfusion_hub.train import TrainConfig, train_concept

    base, cov = clean_xl
    photos = photo_folder(tmp_path / "photos", n=2)
    res = {ck: train_concept(base, photos, name="cat-mittens", superclass="cat", covariance=cov,
                             out_path=tmp_path / f"{ck}.safetensors",
                             config=TrainConfig(steps=1, batch_size=2, previews=0, gradient_checkpointing=ck))
           for ck in (False, True)}
    for k, t in res[False].concept.tensors().items():
        torch.testing.assert_close(res[True].concept.tensors()[k], t, rtol=1e-4, atol=1e-5)
    assert not base.pipe.unet.is_gradient_checkpointing
    assert json.loads(res[True].concept.metadata["training"])["gradient_checkpointing"] is True


def test_out_of_memory_retries_the_step_with_checkpointing_then_a_smaller_micro_batch(clean_xl, tmp_path, monkeypatch):
    """Auto memory mode: an out-of-memory error in a step turns gradient checkpointing on and retries the step; a second
    one halves the micro-batch. The retried run computes what a run with those settings from the start computes (the
    noise and plan do not depend on the micro-batch split)."""
    from perfusion_hub import train as train_mod
    from perfusion_hub.train import TrainConfig, train_concept

    base, cov = clean_xl
    photos = photo_folder(tmp_path / "photos", n=2)
    real, calls = train_mod.denoising_loss, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) in (1, 2):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "denoising_loss", flaky)
    seen = []
    auto = train_concept(base, photos, name="cat-mittens", superclass="cat", covariance=cov, warn=seen.append,
                         out_path=tmp_path / "a.safetensors", config=TrainConfig(steps=1, batch_size=2, previews=0))
    monkeypatch.setattr(train_mod, "denoising_loss", real)
    fixed = train_concept(base, photos, name="cat-mittens", superclass="cat", covariance=cov,
                          out_path=tmp_path / "b.safetensors",
                          config=TrainConfig(steps=1, batch_size=2, micro_batch=1, previews=0,
                                             gradient_checkpointing=True))
    assert "gradient checkpointing" in seen[0] and "micro-batch 1" in seen[1]
    training = json.loads(auto.concept.metadata["training"])
    assert training["gradient_checkpointing"] is True and training["micro_batch"] == 1
    for k, t in fixed.concept.tensors().items():
        torch.testing.assert_close(auto.concept.tensors()[k], t, rtol=1e-5, atol=1e-6)
    assert not base.pipe.unet.is_gradient_checkpointing


def test_cli_train_and_render_on_an_sdxl_folder_and_wrong_family_exit_7(xl, tmp_path, monkeypatch):
    """`pfx base add` shows the family; `pfx train` / `pfx render` run unchanged on an SDXL diffusers folder; the
    concept publishes to a file remote and installs into another home (its manifest records family sdxl) that renders
    it; an SDXL concept rendered on the toy base exits 7 naming both families."""
    from click.testing import CliRunner

    from cli.main import cli

    base, _ = xl
    monkeypatch.setenv("PFX_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PFX_BASE", raising=False)
    runner = CliRunner()

    def run(*args, code=0):
        res = runner.invoke(cli, list(args))
        assert res.exit_code == code, res.output + repr(res.exception)
        return res

    folder = base.spec.location
    assert "(sdxl)" in run("base", "add", "xl", folder).output
    rows = json.loads(run("base", "list", "--json").output)
    assert {r["name"]: r["family"] for r in rows} == {"toy": "sd1", "xl": "sdxl"}
    photos = photo_folder(tmp_path / "photos", n=2)
    from perfusion_hub.captions import load_captions

    captions = tmp_path / "captions.txt"  # a short corpus keeps the covariance cheap
    captions.write_text("\n".join(load_captions()[:64]) + "\n")
    out = json.loads(run("train", str(photos), "--name", "cat-mittens", "--superclass", "cat", "--base", "xl",
                         "--steps", "1", "--batch-size", "2", "--previews", "0", "--captions", str(captions),
                         "--json").output)
    assert out["family"] == "sdxl"
    img = tmp_path / "r.png"
    run("render", "a photo of cat-mittens", "--base", "xl", "--steps", "2", "-o", str(img))
    assert img.exists()
    # publish to a file remote, install into another home (the manifest records the family), render there
    reg = (tmp_path / "reg").as_uri()
    run("remote", "add", "loc", reg, "--default")
    run("publish", "cat-mittens", "--json")
    other = ["--home", str(tmp_path / "home2")]
    run(*other, "remote", "add", "loc", reg)
    installed = json.loads(run(*other, "install", "cat-mittens", "--json").output)
    assert installed[0]["status"] == "installed"
    from registry.home import Home
    from registry.names import parse_ref

    home2 = Home.open(tmp_path / "home2", offline=True)
    row = home2.find_installed(parse_ref("cat-mittens"))
    assert home2.manifest(row["manifest"]).family == "sdxl"
    run(*other, "render", "a photo of cat-mittens", "--base", folder, "--steps", "2", "-o", str(tmp_path / "r2.png"))
    res = run("render", "a photo of cat-mittens", "--base", "toy", "--steps", "2", "-o", str(tmp_path / "t.png"),
              code=7)
    assert "SDXL" in res.output and "SD1.x" in res.output


def test_single_file_sdxl_is_detected_and_needs_its_tokenizers(tmp_path, monkeypatch):
    """No SDXL weights here: the single-file path is checked up to where the weights are needed (family told from
    the tensor names, the shipped SDXL configs picked, clear errors for the missing tokenizers)."""
    from safetensors.torch import save_file

    from perfusion_hub import bases
    from perfusion_hub.bases import BaseSpec, detect_family, file_family, load_base
    from perfusion_hub.errors import BaseNotAvailable

    monkeypatch.setattr(bases, "SDXL_TOKENIZER_CACHE_IDS", (("pfx-test/not-in-any-cache", None),))
    monkeypatch.setattr(bases, "TOKENIZER_2_CACHE_IDS", (("pfx-test/not-in-any-cache", None),))
    monkeypatch.setattr(bases, "TOKENIZER_CACHE_IDS", (("pfx-test/not-in-any-cache", None),))
    ckpt = tmp_path / "xl.safetensors"
    save_file({bases._SDXL_KEY: torch.zeros(2)}, str(ckpt))
    v2 = tmp_path / "v2.safetensors"
    save_file({bases._V2_KEY: torch.zeros(2, 1024)}, str(v2))
    assert file_family(ckpt) == "sdxl" and file_family(v2) == "sd2"
    assert detect_family(BaseSpec("file", str(ckpt), "xl")) == "sdxl"
    with pytest.raises(BaseNotAvailable, match="--tokenizer FOLDER"):
        load_base(str(ckpt), device="cpu", offline=True)
    tok = str(Path(bases.DATA) / "toy" / "tokenizer")
    with pytest.raises(BaseNotAvailable, match="--tokenizer-2"):
        load_base(str(ckpt), device="cpu", tokenizer=tok, offline=True)
    seen = {}

    def fake_single_file(cls, path, **kw):
        seen.update(kw, cls=cls.__name__)
        raise OSError("stop here")

    from diffusers import StableDiffusionXLPipeline

    monkeypatch.setattr(StableDiffusionXLPipeline, "from_single_file", classmethod(fake_single_file))
    with pytest.raises(BaseNotAvailable, match="stop here"):
        load_base(str(ckpt), device="cpu", tokenizer=tok, tokenizer_2=tok, offline=True)
    assert seen["cls"] == "StableDiffusionXLPipeline" and Path(seen["config"]) == SDXL_CONFIGS
    assert seen["tokenizer_2"].pad_token == "<|endoftext|>"  # a folder's own tokenizer config is kept
