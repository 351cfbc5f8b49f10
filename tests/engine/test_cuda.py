"""Mixed-precision paths on a CUDA device (skipped without one): the processor under fp16/bf16,
rendering against the fp32 CPU reference, bf16 training, the fast render mode against eager, and fast training's
recorded step against the compiled step it records."""

import numpy as np
import pytest
import torch

from perfusion_hub.bases import load_base
from perfusion_hub.loaders import load_concepts, runtime_of, unload_concepts
from perfusion_hub.render import render
from perfusion_hub.train import TrainConfig, train_concept
from tests.kit.engine import photo_folder, synthetic_concept

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module", params=["fp16", "bf16"])
def gpu_base(request):
    base = load_base("toy", device="cuda", dtype=request.param)
    yield base
    unload_concepts(base.pipe)


def test_processor_half_precision_matches_fp32(gpu_base, toy_base, toy_cov):
    c = synthetic_concept(toy_base, toy_cov, "cat-mittens", "cat", seed=3)
    load_concepts(gpu_base.pipe, [c], covariance=toy_cov)
    load_concepts(toy_base.pipe, [c], covariance=toy_cov)
    try:
        rt_gpu, rt_cpu = runtime_of(gpu_base.pipe), runtime_of(toy_base.pipe)
        e = torch.randn(2, 77, c.target_input.shape[0], generator=torch.Generator().manual_seed(0))
        e[0, 4] = c.target_input
        for path, attn in rt_gpu.layers.items():
            k, v = rt_gpu.key_value(path, attn, e.to("cuda", gpu_base.dtype), ["cat-mittens"])
            k32, v32 = rt_cpu.key_value(path, rt_cpu.layers[path], e, ["cat-mittens"])
            assert k.dtype == gpu_base.dtype and torch.isfinite(k).all() and torch.isfinite(v).all()
            tol = 3e-2 if gpu_base.dtype == torch.bfloat16 else 5e-3
            torch.testing.assert_close(k.float().cpu(), k32, rtol=tol, atol=tol * 4)
            torch.testing.assert_close(v.float().cpu(), v32, rtol=tol, atol=tol * 4)
    finally:
        unload_concepts(gpu_base.pipe)
        unload_concepts(toy_base.pipe)


def test_unet_step_with_concept_half_precision_close_to_cpu_fp32(gpu_base, toy_base, toy_cov):
    """One denoising prediction with a concept active (whole images of a random-weight UNet diverge
    chaotically over many steps under any rounding, so the comparison is per step)."""
    c = synthetic_concept(toy_base, toy_cov, "cat-mittens", "cat", seed=4)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([500, 100])
    preds = []
    for base in (gpu_base, toy_base):
        load_concepts(base.pipe, [c], covariance=toy_cov)
        try:
            pipe = base.pipe
            ids = pipe.tokenizer(["a photo of <cat-mittens> on a chair"] * 2, padding="max_length", max_length=77,
                                 return_tensors="pt").input_ids.to(base.device)
            with torch.no_grad():
                ehs = pipe.text_encoder(ids)[0]
                runtime_of(pipe).activate(["cat-mittens"])
                out = pipe.unet(latents.to(base.device, base.dtype), t.to(base.device), ehs).sample
            preds.append(out.float().cpu())
        finally:
            unload_concepts(base.pipe)
    err = (preds[0] - preds[1]).norm() / preds[1].norm()
    assert torch.isfinite(preds[0]).all()
    assert err < (3e-2 if gpu_base.dtype == torch.bfloat16 else 5e-3), err


def test_bf16_training_is_finite(tmp_path, toy_cov):
    base = load_base("toy", device="cuda", dtype="bf16")
    res = train_concept(base, photo_folder(tmp_path / "p"), name="cat-mittens", superclass="cat", covariance=toy_cov,
                        out_path=tmp_path / "c.safetensors", config=TrainConfig(steps=5, batch_size=8, previews=1,
                                                                                preview_steps=5))
    assert all(np.isfinite(res.losses))
    assert all(torch.isfinite(t).all() and t.dtype == torch.float32 for t in res.concept.tensors().values())
    assert res.previews and res.previews[0].exists()


def test_fast_render_matches_eager(toy_cov, toy_base):
    from perfusion_hub.fast import FastRenderer

    base = load_base("toy", device="cuda", dtype="fp16")
    c = synthetic_concept(toy_base, toy_cov, "cat-mittens", "cat", seed=5)
    load_concepts(base.pipe, [c], covariance=toy_cov)
    p = "a photo of <cat-mittens>"
    eager = np.asarray(render(base, p, steps=10).images[0], dtype=int)
    fr = FastRenderer(base.pipe)
    try:
        fast = np.asarray(render(base, p, steps=10, fast=fr).images[0], dtype=int)
        again = np.asarray(render(base, p, steps=10, fast=fr).images[0], dtype=int)
    finally:
        fr.close()
    # The compiled fp16 UNet's fused kernels round differently from eager's, and 10 denoising steps carry that
    # into a few pixels: so the whole image must agree closely, not every pixel exactly (figures per GPU:
    # bench/README.md; on an H200, max 5, mean 0.14, 0.03% of values above 3).
    diff = np.abs(fast - eager)
    report = f"fast vs eager: max {diff.max()}, mean {diff.mean():.3f}, values > 3: {(diff > 3).mean():.4f}"
    assert diff.mean() <= 0.5 and (diff > 3).mean() <= 0.005 and diff.max() <= 16, report
    assert np.array_equal(fast, again), f"fast twice differ: max {np.abs(fast - again).max()}"


def test_fast_training_replays_the_compiled_step_as_a_cuda_graph(tmp_path, toy_cov, monkeypatch):
    """fast=True records the whole step as a CUDA graph after CUDA_GRAPH_AFTER steps and replays it: the run computes
    what the same compiled step launched kernel by kernel computes (its inputs refilled, its state updated in place),
    and its checkpoints resume into a run that records its graph again.

    fp32 and a tolerance: on CUDA two identical fp32 runs differ by ~1e-4 (atomic reductions), and in bf16 the
    recorded step is bitwise reproducible but rounds ~5e-4 away from the unrecorded one (other GEMM kernels under
    capture); a replay that read one stale input (noise, plan row, i*, embedding) is off from its first step."""
    from perfusion_hub import train as train_mod

    base = load_base("toy", device="cuda", dtype="fp32")
    photos = photo_folder(tmp_path / "p")
    recorded, real_record = [], train_mod.record_step

    def run(out, **kw):
        seen = []
        res = train_concept(base, photos, name="cat-mittens", superclass="cat", covariance=toy_cov, warn=seen.append,
                            out_path=tmp_path / out, config=TrainConfig(steps=12, batch_size=8, previews=0,
                                                                        checkpoint_every=4), fast=True, **kw)
        assert seen == []
        return res

    def close(a, b):
        assert a.losses == pytest.approx(b.losses, rel=1e-3)
        flat = lambda r: torch.cat([t.flatten() for t in r.concept.tensors().values()])
        assert float((flat(a) - flat(b)).norm() / flat(b).norm()) < 1e-3

    monkeypatch.setattr(train_mod, "record_step", lambda *a: recorded.append(real_record(*a)) or recorded[-1])
    graphed = run("g.safetensors", checkpoint_path=tmp_path / "g.ckpt")
    assert len(recorded) == 1 and recorded[0] is not None
    monkeypatch.setattr(train_mod, "CUDA_GRAPH_AFTER", None)
    plain = run("p.safetensors")
    assert len(recorded) == 1
    close(graphed, plain)
    c = plain.concept  # i* moved from i_super by ~2.5e-2 in these 12 steps: 25x the tolerance above
    assert float((c.target_input - c.superclass_input).norm() / c.superclass_input.norm()) > 1e-2

    monkeypatch.setattr(train_mod, "CUDA_GRAPH_AFTER", 2)
    ckpt = tmp_path / "r.ckpt"

    def stop(step, total, loss):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run("r.safetensors", checkpoint_path=ckpt, progress=stop)
    resumed = run("r.safetensors", checkpoint_path=ckpt, resume=True)
    assert len(recorded) == 3 and all(g is not None for g in recorded)
    close(resumed, graphed)
