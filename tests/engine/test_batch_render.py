"""Many concepts in one batch (issue 21): per-row concept sets and render_batch on the embedded toy base.

What "the same as rendering it alone" means is stated in perfusion_hub/batch.py: same text encodings, same
starting noise (each request's own seeded generator), the request's concept set on both of its CFG rows.
Proved here:
- a batch of one is bit-identical to render();
- in a batch, a request's image does not depend on the concepts of the other requests (bit-identical), and a
  request without concepts is bit-identical to the plain pipeline run on the same batch;
- against rendering each request alone, a batched request differs only by the CPU kernels' batch-size
  blocking: final latents within LATENT_TOL (max abs), pixels within 1 level of 255.
"""

import itertools

import numpy as np
import pytest
import torch

from perfusion_hub.batch import RenderRequest, RowSet, image_grid, render_batch
from perfusion_hub.errors import BadInput, IncompatibleConcepts
from perfusion_hub.loaders import load_concepts, runtime_of, unload_concepts
from perfusion_hub.processor import PerfusionAttnProcessor, cross_attention_modules
from perfusion_hub.render import render
from tests.kit.engine import synthetic_concept

STEPS = 2
LATENT_TOL = 1e-4  # measured: ~1e-5 after 2-3 steps; the blocking of a batch-16 vs batch-2 convolution


def _px(img):
    return np.asarray(img, dtype=np.int16)


@pytest.fixture(scope="module")
def loaded(toy_base, toy_cov):
    """Sixteen synthetic concepts c0..c15 (same superclass, independent target inputs) on the toy base, loaded
    once for the module (tests leave them as they found them) and unloaded after it."""
    unload_concepts(toy_base.pipe)
    cs = [synthetic_concept(toy_base, toy_cov, f"c{i}", "cat", seed=100 + i, scale=3.0) for i in range(16)]
    load_concepts(toy_base.pipe, cs, covariance=toy_cov)
    yield toy_base
    unload_concepts(toy_base.pipe)


def _alone(base, req, steps=STEPS):
    return render_batch(base, [req], steps=steps, output_type="latent")[0]


def test_batch_of_one_is_bit_identical_to_render(loaded):
    base = loaded
    for req in (RenderRequest("a photo of <c0> on a chair", seed=3),
                RenderRequest("<c1> and <c2> on a table", seed=4, beta={"c2": 0.5}, tau={"c1": 0.2}),
                RenderRequest("a photo of a dog", seed=5),
                RenderRequest("<c3> in a box", seed=6, count=2, negative_prompt="blurry")):
        batched = render_batch(base, [req], steps=STEPS)[0]
        single = render(base, req.prompt, seed=req.seed, steps=STEPS, beta=req.beta, tau=req.tau, count=req.count,
                        negative_prompt=req.negative_prompt)
        assert len(batched.images) == req.count
        for a, b in zip(batched.images, single.images):
            assert np.array_equal(_px(a), _px(b)), req.prompt
        assert batched.params == single.params
        assert batched.concepts == single.concepts


def test_disjoint_and_overlapping_sets_match_each_render_alone(loaded):
    """Disjoint sets, overlapping sets, the same concept with different beta in two images, and plain prompts,
    in one batch: every image is its lone render up to batch-size blocking, and the concepts visibly act."""
    base = loaded
    reqs = [RenderRequest("a photo of <c0> on a chair", seed=1),
            RenderRequest("a photo of a dog on a table", seed=2),
            RenderRequest("<c1> and <c2> on a table", seed=3),
            RenderRequest("<c2> and <c3>", seed=4, beta={"c2": 0.4}),
            RenderRequest("a photo of <c0> on a chair", seed=1, beta={"c0": 0.35}),
            RenderRequest("<c4> in a box", seed=5, count=2)]
    batched = render_batch(base, reqs, steps=STEPS, output_type="latent")
    worst = 0.0
    for req, got in zip(reqs, batched):
        alone = _alone(base, req)
        for a, b in zip(got.images, alone.images):
            worst = max(worst, float((a - b).abs().max()))
    assert worst <= LATENT_TOL, worst
    # the same concept at two betas gives two different images; the concept changes the plain prompt's image
    assert (batched[0].images[0] - batched[4].images[0]).abs().max() > 1e-2
    plain_prompt = render_batch(base, [RenderRequest("a photo of a cat on a chair", seed=1)], steps=STEPS,
                                output_type="latent")[0]
    assert (batched[0].images[0] - plain_prompt.images[0]).abs().max() > 1e-2
    assert batched[4].params["concepts"]["c0"]["beta"] == 0.35 and batched[0].params["concepts"]["c0"]["beta"] == 0.7
    pixels = render_batch(base, reqs[:3], steps=STEPS)
    for req, got in zip(reqs[:3:2], pixels[::2]):
        alone = render(base, req.prompt, seed=req.seed, steps=STEPS, beta=req.beta)
        assert np.abs(_px(got.images[0]) - _px(alone.images[0])).max() <= 1


def test_sixteen_concepts_in_one_batch(loaded):
    """Sixteen images, sixteen distinct concepts (four images also share one of them with a second concept):
    each matches its lone render (one denoising step: the per-row K/V are the same at every step)."""
    base = loaded
    reqs = [RenderRequest(f"a photo of <c{i}>" + (f" and <c{(i + 5) % 16}>" if i % 4 == 0 else ""), seed=i)
            for i in range(16)]
    batched = render_batch(base, reqs, steps=1, output_type="latent")
    assert [r.concepts for r in batched][:2] == [["c0", "c5"], ["c1"]]
    for req, got in zip(reqs, batched):
        alone = _alone(base, req, steps=1)
        assert float((got.images[0] - alone.images[0]).abs().max()) <= LATENT_TOL, req.prompt
    assert min(float((a.images[0] - b.images[0]).abs().max()) for a, b in itertools.pairwise(batched)) > 1e-3


def test_other_images_concepts_do_not_affect_an_image_bitwise(loaded):
    """Same batch shape, same prompts and seeds for images 0 and 2; the other rows change their concepts:
    images 0 and 2 are bit-identical. Image 2 (no concept) is bit-identical to the plain pipeline's batch."""
    base = loaded
    keep0 = RenderRequest("a photo of <c0> on a chair", seed=1)
    plain = RenderRequest("a photo of a dog on a table", seed=2)
    a = render_batch(base, [keep0, RenderRequest("<c1> and <c2>", seed=3), plain,
                            RenderRequest("<c5> on a chair", seed=9, beta={"c5": 0.3})], steps=STEPS)
    b = render_batch(base, [keep0, RenderRequest("<c3> and <c4> and <c6>", seed=3), plain,
                            RenderRequest("<c0> on a chair", seed=9, beta={"c0": 0.2})], steps=STEPS)
    assert np.array_equal(_px(a[0].images[0]), _px(b[0].images[0]))
    assert np.array_equal(_px(a[2].images[0]), _px(b[2].images[0]))
    # the plain pipeline (no concept loaded at all) on the same batch: prompt embeddings, noise, one call
    pipe = base.pipe
    texts = ["a photo of a cat on a chair", "a photo of a cat", "a photo of a dog on a table", "a cat on a chair"]
    embeds = [pipe.encode_prompt(t, "cpu", 1, True) for t in texts]
    from perfusion_hub.batch import initial_latents

    latents = torch.cat([initial_latents(pipe, 1, s, 64, torch.float32) for s in (1, 3, 2, 9)])
    out = pipe(prompt_embeds=torch.cat([e[0] for e in embeds]), negative_prompt_embeds=torch.cat([e[1] for e in embeds]),
               latents=latents, num_inference_steps=STEPS, guidance_scale=7.5, height=64, width=64).images
    assert np.array_equal(_px(a[2].images[0]), _px(out[2]))


def test_edited_kv_are_computed_once_per_batch_and_per_concept_set(loaded, monkeypatch):
    """Rows with the same concepts and gates are edited together, once per batch (not per step)."""
    import perfusion_hub.rows as rows_mod

    calls = []
    real = rows_mod.edited_projection
    monkeypatch.setattr(rows_mod, "edited_projection", lambda *a, **k: calls.append(a[1].shape[0]) or real(*a, **k))
    reqs = [RenderRequest("a photo of <c0>", seed=1), RenderRequest("<c0> on a chair", seed=2),
            RenderRequest("a photo of <c1>", seed=3), RenderRequest("a photo of a dog", seed=4)]
    got = render_batch(loaded, reqs, steps=3, output_type="latent")
    layers = len(runtime_of(loaded.pipe).layers)
    assert sorted(calls) == sorted([4] * 2 * layers + [2] * 2 * layers)  # c0: 2 images x 2 rows; c1: 1 x 2; K and V
    for req, g in zip(reqs[:2], got[:2]):
        assert float((g.images[0] - _alone(loaded, req, steps=3).images[0]).abs().max()) <= LATENT_TOL


def test_no_concept_anywhere_runs_the_stock_processors(loaded, monkeypatch):
    base = loaded
    calls = []
    for attn in cross_attention_modules(base.pipe.unet).values():
        proc = attn.processor
        assert isinstance(proc, PerfusionAttnProcessor)
        original = proc.original
        monkeypatch.setattr(proc, "original", lambda *a, _o=original, **k: calls.append(1) or _o(*a, **k))
    reqs = [RenderRequest("a photo of a cat", seed=1), RenderRequest("a red chair", seed=2)]
    render_batch(base, reqs, steps=1)
    assert len(calls) == len(cross_attention_modules(base.pipe.unet))  # every layer, the one step: stock


def test_row_sets_are_checked_before_any_unet_call(loaded):
    rt = runtime_of(loaded.pipe)
    with pytest.raises(KeyError, match="nope"):
        rt.activate_rows([RowSet.of({"nope": (0.7, 0.15)})])
    with pytest.raises(ValueError, match="tau"):
        rt.activate_rows([RowSet.of({"c0": (0.7, 0.0)})])
    with pytest.raises(ValueError, match="same length"):
        RowSet(("c0",), (0.7,), ())
    assert rt.row_plan() is None
    plan_rows = [RowSet.of({"c0": (0.7, 0.15)}), RowSet()]
    with rt.rows_activated(plan_rows):
        assert rt.row_plan().edits()
        attn = next(iter(rt.layers.values()))
        with pytest.raises(ValueError, match="2 rows"):
            rt.row_plan().key_value(next(iter(rt.layers)), attn, torch.zeros(3, 77, rt.dim))
    assert rt.row_plan() is None


def test_row_sets_refuse_dependent_concepts(loaded):
    rt = runtime_of(loaded.pipe)
    saved = rt.concepts["c15"].target_input
    rt.concepts["c15"].target_input = rt.concepts["c14"].target_input * 2.0  # made dependent after loading
    rt.touch()
    try:
        with pytest.raises(IncompatibleConcepts, match="c14 and c15"):
            rt.activate_rows([RowSet.of({"c14": (0.7, 0.15), "c15": (0.7, 0.15)})])
        rt.activate_rows([RowSet.of({"c14": (0.7, 0.15)}), RowSet.of({"c15": (0.7, 0.15)})])  # apart: fine
        rt.activate_rows(None)
    finally:
        rt.concepts["c15"].target_input = saved
        rt.touch()


def test_bad_requests_are_refused_with_render_messages(loaded):
    with pytest.raises(BadInput, match="not a known concept"):
        render_batch(loaded, [RenderRequest("a photo of <nope>")], steps=1)
    with pytest.raises(BadInput, match="does not use"):
        render_batch(loaded, [RenderRequest("a photo of <c0>", beta={"c1": 0.5})], steps=1)
    assert render_batch(loaded, [], steps=1) == []
    assert runtime_of(loaded.pipe).row_plan() is None


def test_image_grid_layout():
    from PIL import Image

    imgs = [Image.new("RGB", (8, 6), (i * 40, 0, 0)) for i in range(5)]
    g = image_grid(imgs)
    assert g.size == (3 * 8, 2 * 6)
    assert g.getpixel((8 + 1, 1)) == (40, 0, 0)
    g = image_grid(imgs, columns=5, labels=list("abcde"), max_side=4)
    assert g.size == (5 * 4, 3 + 14)
