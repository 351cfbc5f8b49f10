"""Defects found by the engine review (issue 19), each pinned by the property it broke (CPU, toy base)."""

import pytest
import torch

from perfusion_hub.covariance import Covariance
from perfusion_hub.train import TrainConfig, train_concept
from tests.kit.engine import photo_folder, tiny_base


def _grads_of_first_step(base, cov, photos, out) -> torch.Tensor:
    """The value-target gradients the optimizer receives at the first step of a real training run."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    seen = []

    def values_grad(opt, args, kwargs):
        seen.append(torch.cat([p.grad.flatten() for p in opt.param_groups[1]["params"]]))

    handle = register_optimizer_step_pre_hook(values_grad)
    try:
        train_concept(base, photos, name="cat-tiny", superclass="cat", covariance=cov, out_path=out,
                      config=TrainConfig(steps=1, batch_size=4, previews=0, flip=False))
    finally:
        handle.remove()
    return seen[0].clone()


@pytest.fixture(scope="module")
def tiny_cov(toy_cov):
    """The toy base's covariance for the tiny bases (same text encoder), not tied to a base digest."""
    return Covariance(toy_cov.matrix, base_digest="", corpus_digest=toy_cov.corpus_digest,
                      count=toy_cov.count)


def test_fp16_training_gradients_match_fp32(toy_base, tiny_cov, tmp_path):
    """Item 1: the same one-step run on the same tiny base in fp32 and in fp16 gives the optimizer the same
    value-target gradients (up to fp16 rounding of the forward pass). Unscaled, the fp16 backward loses the
    small gradients (measured: cosine 0.97, 25% relative error); with loss scaling the error is ~0.4%."""
    photos = photo_folder(tmp_path / "photos", n=2)
    g32 = _grads_of_first_step(tiny_base(toy_base, torch.float32), tiny_cov, photos, tmp_path / "a.st")
    g16 = _grads_of_first_step(tiny_base(toy_base, torch.float16), tiny_cov, photos, tmp_path / "b.st")
    cos = float(torch.nn.functional.cosine_similarity(g16, g32, dim=0))
    rel = float((g16 - g32).norm() / g32.norm())
    print(f"fp16 vs fp32 value-target gradients: cosine {cos:.6f}, relative error {rel:.4f}")
    assert cos > 0.9999 and rel < 0.02, (cos, rel)


def test_fp16_resume_carries_the_loss_scale(toy_base, tiny_cov, tmp_path, monkeypatch):
    """Item 1: a resumed fp16 run equals the uninterrupted one. The scale starts low and doubles after every
    step here, so a resumed run that restarted the scale would see other gradients (more of them
    underflow)."""
    from perfusion_hub import train

    monkeypatch.setattr(train._LossScale, "INIT", 16.0)
    monkeypatch.setattr(train._LossScale, "GROWTH_INTERVAL", 1)
    base = tiny_base(toy_base, torch.float16)
    photos = photo_folder(tmp_path / "photos", n=2)
    cfg = TrainConfig(steps=3, batch_size=4, previews=0, flip=False, checkpoint_every=1)

    def run(out, **kw):
        return train_concept(base, photos, name="cat-tiny", superclass="cat", covariance=tiny_cov,
                             out_path=tmp_path / out, config=cfg, **kw)

    straight = run("s.safetensors")
    ckpt = tmp_path / "run.ckpt"

    def stop_at_2(step, total, loss):  # the checkpoint holds step 1
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run("r.safetensors", checkpoint_path=ckpt, progress=stop_at_2)
    resumed = run("r.safetensors", checkpoint_path=ckpt, resume=True)
    assert resumed.losses == straight.losses
    for k, t in straight.concept.tensors().items():
        assert torch.equal(resumed.concept.tensors()[k], t), k


def test_v_prediction_base_trains_towards_the_velocity(clean_base, toy_cov, tmp_path):
    """Item 6: with the scheduler switched to v_prediction, the first step's loss is the MSE between the
    UNet's prediction and the velocity sqrt(a) noise - sqrt(1 - a) x0, computed here by hand from what the
    step fed the scheduler and what the UNet returned; "sample" (or anything else) is refused before
    training starts."""
    from diffusers import DDIMScheduler

    from perfusion_hub.errors import BadInput

    pipe = clean_base.pipe
    fed, preds = [], []

    class Recording(DDIMScheduler):
        def add_noise(self, original_samples, noise, timesteps):
            fed.append((original_samples.clone(), noise.clone(), timesteps.clone()))
            return super().add_noise(original_samples, noise, timesteps)

    photos = photo_folder(tmp_path / "photos", n=2)
    one_step = TrainConfig(steps=1, batch_size=4, previews=0)
    saved = pipe.scheduler
    handle = pipe.unet.register_forward_hook(lambda m, a, out: preds.append(out.sample.detach().float()))
    try:
        pipe.scheduler = Recording.from_config(saved.config, prediction_type="v_prediction")
        res = train_concept(clean_base, photos, name="cat-v", superclass="cat", covariance=toy_cov,
                            out_path=tmp_path / "v.safetensors", config=one_step)
        pipe.scheduler = DDIMScheduler.from_config(saved.config, prediction_type="sample")
        vocab = len(pipe.tokenizer)
        with pytest.raises(BadInput, match="'sample'.*epsilon or v_prediction"):
            train_concept(clean_base, photos, name="cat-x", superclass="cat", covariance=toy_cov,
                          out_path=tmp_path / "x.safetensors", config=one_step)
        assert len(pipe.tokenizer) == vocab and not (tmp_path / "x.safetensors").exists()
    finally:
        pipe.scheduler = saved
        handle.remove()
    ((x0, noise, t),), (pred,) = fed, preds
    a = saved.alphas_cumprod[t].view(-1, 1, 1, 1).float()
    v = a.sqrt() * noise - (1 - a).sqrt() * x0
    assert res.losses[0] == pytest.approx(float(((pred - v) ** 2).mean()), rel=1e-5)
    assert res.losses[0] != pytest.approx(float(((pred - noise) ** 2).mean()), rel=1e-2)  # not the noise


def _encode(pipe, prompt: str) -> torch.Tensor:
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_global_lock_switch_is_seen_by_the_kv_cache(clean_base, toy_cov):
    """Item 2: the text K/V cache is keyed by the encodings tensor; switching key-locking mode for the same
    tensor must give the keys of the new mode (global: W_K of the superclass prompt's encodings; local: the
    edit), not the cached keys of the old one."""
    from perfusion_hub.loaders import load_concepts, runtime_of
    from tests.kit.engine import synthetic_concept

    pipe = clean_base.pipe
    cat = synthetic_concept(clean_base, toy_cov, "cat-mittens", "cat", seed=3)
    load_concepts(pipe, [cat], covariance=toy_cov)
    rt = runtime_of(pipe)
    ehs = _encode(pipe, "a photo of a <cat-mittens>")
    sup = _encode(pipe, "a photo of a cat")
    path, attn = next(iter(rt.layers.items()))
    rt.activate(["cat-mittens"])
    try:
        with torch.no_grad():
            local, _ = rt.key_value(path, attn, ehs, ["cat-mittens"])
            with rt.global_locked(sup):
                glob, _ = rt.key_value(path, attn, ehs, ["cat-mittens"])
            again, _ = rt.key_value(path, attn, ehs, ["cat-mittens"])
            wk_sup = attn.to_k(sup)
    finally:
        rt.activate(None)
    assert torch.equal(glob, wk_sup) and not torch.allclose(local, wk_sup, atol=1e-3)
    assert torch.equal(again, local) and not rt.global_lock and rt.key_states is None


def _pipeline_state(pipe) -> dict:
    """What loading concepts changes in a pipeline: processors, tokenizer, token embeddings, the runtime."""
    from perfusion_hub.loaders import loaded_concepts

    return {"processors": {p: type(m) for p, m in pipe.unet.attn_processors.items()},
            "vocab": len(pipe.tokenizer), "rows": pipe.text_encoder.get_input_embeddings().weight.shape[0],
            "loaded": loaded_concepts(pipe)}


def _variant(concept, name: str, target_input: torch.Tensor):
    """The same concept under another name and token, with another target input i*."""
    from perfusion_hub.concept import Concept

    meta = dict(concept.metadata, name=name, trigger=f"<{name}>")
    return Concept(meta, concept.token_embedding, target_input, concept.superclass_input,
                   concept.value_targets)


def test_more_concepts_than_text_dimensions_refused():
    """Item 3, the edit math: N >= D target inputs span every D-dimensional encoding, so the projector is the
    identity and the edit removes the base's own output W e everywhere; N = D - 1 is still composed."""
    from perfusion_hub.edit import inverse_and_root, make_basis
    from perfusion_hub.errors import IncompatibleConcepts

    d = 4
    c_inv, root = inverse_and_root(torch.eye(d, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)

    def basis(n):
        gates = torch.full((n,), 0.7), torch.full((n,), 0.15)
        return make_basis(torch.randn(n, d, generator=g), c_inv, root, *gates)

    for n in (d, d + 1):
        refusal = f"{n} concepts cannot be composed on a {d}-dimensional text encoder: at most {d - 1}"
        with pytest.raises(IncompatibleConcepts, match=refusal):
            basis(n)
    assert basis(d - 1).U.shape == (d, d - 1)


def test_more_concepts_than_text_dimensions_refused_at_load(clean_base, toy_cov):
    """Item 3 on the toy base (128-d encodings): 128 concepts with random (independent) target inputs are
    refused by load_concepts with the count in the error, and the pipeline is left as it was."""
    from perfusion_hub.errors import IncompatibleConcepts
    from perfusion_hub.loaders import load_concepts
    from tests.kit.engine import synthetic_concept

    d = clean_base.dim
    assert d == 128
    c = synthetic_concept(clean_base, toy_cov, "cat-mittens", "cat")
    g = torch.Generator().manual_seed(1)
    scale = c.target_input.norm() / d**0.5
    many = [_variant(c, f"cat-{k}", torch.randn(d, generator=g) * scale) for k in range(d)]
    before = _pipeline_state(clean_base.pipe)
    with pytest.raises(IncompatibleConcepts, match=f"{d} concepts cannot be composed on a {d}-dimensional"):
        load_concepts(clean_base.pipe, many, covariance=toy_cov)
    assert _pipeline_state(clean_base.pipe) == before
    assert load_concepts(clean_base.pipe, many[:3], covariance=toy_cov) == ["cat-0", "cat-1", "cat-2"]


def test_dependent_target_inputs_refused_at_load_naming_the_concepts(clean_base, toy_cov):
    """Item 4: two concepts with the same i* are refused by load_concepts, in one call or one after the other,
    with both names in the error and nothing in the pipeline changed; a runtime asked to compose such concepts
    refuses them when they are activated, naming them, not inside the UNet."""
    from perfusion_hub.errors import IncompatibleConcepts
    from perfusion_hub.loaders import load_concepts
    from perfusion_hub.processor import PerfusionRuntime
    from tests.kit.engine import synthetic_concept

    pipe = clean_base.pipe
    a = synthetic_concept(clean_base, toy_cov, "cat-a", "cat", seed=1)
    b = synthetic_concept(clean_base, toy_cov, "cat-b", "cat", seed=2)
    b.target_input = a.target_input.clone()
    chair = synthetic_concept(clean_base, toy_cov, "chair-eames", "chair", seed=3)
    before = _pipeline_state(pipe)
    with pytest.raises(IncompatibleConcepts, match="cat-a and cat-b have .*dependent target inputs"):
        load_concepts(pipe, [a, chair, b], covariance=toy_cov)
    assert _pipeline_state(pipe) == before
    load_concepts(pipe, [a], covariance=toy_cov)
    before = _pipeline_state(pipe)
    with pytest.raises(IncompatibleConcepts, match="cat-a and cat-b have .*dependent target inputs"):
        load_concepts(pipe, [b], covariance=toy_cov)
    assert _pipeline_state(pipe) == before
    # a concept reloaded under its own name is replaced, not composed with its old self
    assert load_concepts(pipe, [_variant(b, "cat-a", a.target_input)], covariance=toy_cov) == ["cat-a"]

    rt = PerfusionRuntime(pipe.unet, toy_cov.matrix)  # not installed: only its checks run
    rt.add(_state(a))
    rt.add(_state(b))
    with pytest.raises(IncompatibleConcepts, match="cat-a and cat-b have .*dependent target inputs"):
        rt.activate(["cat-a", "cat-b"])


def _state(c):
    from perfusion_hub.processor import ConceptState

    return ConceptState(c.name, c.trigger, None, c.target_input, c.superclass_input, dict(c.value_targets),
                        c.beta, c.tau)


def test_later_load_applies_exact_and_refuses_another_covariance(clean_base, toy_cov):
    """Item 5: a later load_concepts on a pipeline that already has concepts (a) applies `exact`: the
    pipeline's K/V then are those of the per-concept subtraction, as a runtime built with exact=False
    computes them, and a call without `exact` keeps that mode; (b) refuses another covariance, with nothing
    changed, while taking the same one (or a copy with the same base and corpus digests); after unloading,
    the other one loads."""
    from perfusion_hub.errors import IncompatibleConcepts
    from perfusion_hub.loaders import load_concepts, runtime_of, unload_concepts
    from perfusion_hub.processor import PerfusionRuntime
    from tests.kit.engine import synthetic_concept

    pipe = clean_base.pipe
    cat = synthetic_concept(clean_base, toy_cov, "cat-mittens", "cat", seed=1, target_shift=1.0)
    chair = synthetic_concept(clean_base, toy_cov, "chair-eames", "chair", seed=2, target_shift=1.0)
    dog = synthetic_concept(clean_base, toy_cov, "dog-rex", "dog", seed=4)
    names = ["cat-mittens", "chair-eames"]
    load_concepts(pipe, [cat], covariance=toy_cov)
    load_concepts(pipe, [chair], covariance=toy_cov, exact=False)
    rt = runtime_of(pipe)
    approx = PerfusionRuntime(pipe.unet, toy_cov.matrix, exact=False, gate_positions=rt.gate_positions)
    exact = PerfusionRuntime(pipe.unet, toy_cov.matrix, exact=True, gate_positions=rt.gate_positions)
    for other in (approx, exact):
        other.eos_id = rt.eos_id
        for n in names:
            other.add(rt.concepts[n])
    ids = pipe.tokenizer(["a photo of a <cat-mittens> on a <chair-eames>"], padding="max_length",
                         max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ehs = pipe.text_encoder(ids)[0]
    path, attn = next(iter(rt.layers.items()))

    def kv(runtime):
        runtime.position_masks = runtime.masks_from_ids(ids, names)  # the prompt's own positions ("span")
        try:
            with torch.no_grad():
                return torch.cat(runtime.key_value(path, attn, ehs, names), -1)
        finally:
            runtime.position_masks = None

    assert not torch.allclose(kv(approx), kv(exact), atol=1e-4)  # the modes differ for these two concepts
    assert torch.equal(kv(rt), kv(approx))
    load_concepts(pipe, [dog], covariance=toy_cov)  # no `exact`: the mode stays
    assert torch.equal(kv(rt), kv(approx))

    before = _pipeline_state(pipe)
    other = toy_cov.matrix * 2.0
    with pytest.raises(IncompatibleConcepts, match="another covariance.*unload"):
        load_concepts(pipe, [dog], covariance=other)
    assert _pipeline_state(pipe) == before and runtime_of(pipe) is rt
    copy = Covariance(toy_cov.matrix * (1 + 1e-7), base_digest=toy_cov.base_digest,
                      corpus_digest=toy_cov.corpus_digest, count=toy_cov.count)
    load_concepts(pipe, [dog], covariance=copy)  # a recomputed copy of the same C: the pipeline keeps its own
    load_concepts(pipe, [dog], covariance=toy_cov.matrix)  # the same matrix as a tensor
    assert runtime_of(pipe) is rt and rt.uses_covariance(toy_cov.matrix)
    unload_concepts(pipe)
    load_concepts(pipe, [dog], covariance=other)
    assert runtime_of(pipe).uses_covariance(other) and not runtime_of(pipe).uses_covariance(toy_cov.matrix)


def test_training_and_loading_leave_the_text_encoder_as_they_found_it(clean_base, toy_cov, tmp_path):
    """Item 7: a training run, and loading then unloading concepts, leave no trace in the text encoder beyond
    the documented freeze: the same token-embedding module and weight tensor (not diffusers' replacement:
    trainable, in training mode, viewing a storage that still holds the removed rows), the same
    config.vocab_size and tokenizer. Two runs in a row then start from the same state and give the same bits."""
    from perfusion_hub.loaders import load_concepts, unload_concepts
    from tests.kit.engine import synthetic_concept

    pipe = clean_base.pipe
    te = pipe.text_encoder
    te.requires_grad_(False)  # what every run does first
    photos = photo_folder(tmp_path / "photos", n=2)

    def state():
        e = te.get_input_embeddings()
        return {"module": e, "weight": (e.weight.data_ptr(), e.weight.untyped_storage().nbytes()),
                "trainable": [n for n, p in te.named_parameters() if p.requires_grad],
                "training": [n for n, m in te.named_modules() if m.training],
                "vocab_size": te.config.vocab_size, "tokens": len(pipe.tokenizer)}

    def run():
        return train_concept(clean_base, photos, name="cat-mittens", superclass="cat", covariance=toy_cov,
                             out_path=tmp_path / "c.safetensors",
                             config=TrainConfig(steps=1, batch_size=2, previews=0)).concept.tensors()

    before = state()
    first = run()
    assert state() == before
    load_concepts(pipe, [synthetic_concept(clean_base, toy_cov, "chair-eames", "chair")], covariance=toy_cov)
    second = run()  # with a concept loaded (training takes it out of the way and puts it back)
    unload_concepts(pipe)
    assert state() == before
    assert all(torch.equal(t, second[k]) for k, t in first.items())
