"""Engine speed at Stable Diffusion 1.5 scale (issue 5). One GPU run, the baseline in the same run.

Builds the SD1.5 architecture from the shipped configs (perfusion_hub/data/sd15) with random weights
(speed does not depend on the weights' values) and measures:
  1. plain diffusers StableDiffusionPipeline, 512x512, 50 DDIM steps, guidance 7.5, batch 1 (median of N)
  2. pfx render with 0, 1, 3, 5 concepts through the same pipeline, ratio to 1
  3. the fast render mode (compiled UNet + CUDA graphs + static concept K/V) with 1 concept, and its
     images against the eager path
  4. default-recipe training (400 steps, batch 16, 512x512, 8 photos) from photos on disk to the saved
     concept file: steady state (compiled, warm) and cold (fresh process: load + first compile)
  5. load + compose time for 1, 4 and 16 concepts
Results go to bench/results/engine-<device>-<date>.json, written after every stage.

  python -m bench.engine               # the GPU run (from the repository root)
  python -m bench.engine --toy         # a CPU smoke run of the same code on the toy configs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

DATA = Path(__file__).resolve().parents[1] / "perfusion_hub" / "data"


def log(*a):
    print(*a, flush=True)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_base(toy: bool, device: str, dtype):
    """A Base around a random-weight pipeline built from shipped configs (PFX_BENCH_CONFIGS overrides)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from perfusion_hub.bases import Base, BaseSpec

    cfg_dir = Path(os.environ.get("PFX_BENCH_CONFIGS") or DATA / ("toy" if toy else "sd15"))
    tok = CLIPTokenizer.from_pretrained(str(DATA / "toy" / "tokenizer"))
    load = lambda sub: json.loads((cfg_dir / sub / "config.json").read_text())
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(load("unet"))
        vae = AutoencoderKL.from_config(load("vae"))
        te_cfg = {k: v for k, v in load("text_encoder").items() if not k.startswith("_")}
        te_cfg.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
        te = CLIPTextModel(CLIPTextConfig(**te_cfg))
    sched = DDIMScheduler.from_config(json.loads((cfg_dir / "scheduler" / "scheduler_config.json").read_text()))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, image_encoder=None,
                                   requires_safety_checker=False)
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return Base(BaseSpec("embedded", str(cfg_dir), "sd15-random" if not toy else "toy-random"), pipe, device, dtype)


def synthetic_concepts(base, cov, n: int, seed: int = 0):
    from perfusion_hub.concept import FORMAT, FORMAT_VERSION, Concept
    from perfusion_hub.processor import cross_attention_modules

    layers = cross_attention_modules(base.pipe.unet)
    dim = base.dim
    out = []
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        i_super = torch.randn(dim, generator=g)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "name": f"c{i}", "version": "0.1.0",
                "superclass": "cat", "trigger": f"<c{i}>", "base_name": base.name, "base_digest": base.digest,
                "covariance_digest": cov.digest, "corpus_digest": cov.corpus_digest, "beta": "0.7", "tau": "0.15",
                "key_lock": "local", "training": "{}", "created": "2026-01-01T00:00:00+00:00", "pfx_version": "bench"}
        values = {p: (a.to_v.weight.detach().float().cpu() @ i_super) for p, a in layers.items()}
        out.append(Concept(meta, torch.randn(dim, generator=g) * 0.01, i_super + 0.1 * torch.randn(dim, generator=g),
                           i_super, values))
    return out


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def make_photos(folder: Path, n: int, size: int):
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", (size + 37 * i, size), (30 + 20 * i, 90, 200))
        d = ImageDraw.Draw(im)
        d.ellipse((40 + 9 * i, 60, 300 + 9 * i, 330), fill=(250, 140, 20))
        im.save(folder / f"p{i}.jpg", quality=92)
    return folder


def train_once(base, cov, photos: Path, out: Path, steps: int, fast: bool):
    from perfusion_hub.train import TrainConfig, train_concept

    cfg = TrainConfig(steps=steps, batch_size=16, previews=0, checkpoint_every=10**9)
    sync()
    t = time.perf_counter()
    res = train_concept(base, photos, name="bench-cat", superclass="cat", covariance=cov, out_path=out, config=cfg,
                        fast=fast)
    sync()
    return time.perf_counter() - t, res


def compare_runs(ref, other) -> dict:
    """How far `other`'s concept and losses are from `ref`'s (same seed and steps)."""
    flat = lambda c: torch.cat([*(v.flatten() for v in c.value_targets.values()), c.token_embedding, c.target_input])
    a, b = flat(ref.concept), flat(other.concept)
    return {
        "concept_rel_diff": round(float((a - b).norm() / a.norm()), 7),
        "losses_max_abs_diff": round(max(abs(x - y) for x, y in zip(ref.losses, other.losses)), 6),
        "losses_mean": round(sum(ref.losses) / len(ref.losses), 6),
    }


def attention_backends(device: str, dtype) -> dict:
    """Forward + backward time of SD1.5's attention shapes at batch 16 (512x512) for each SDPA backend, weighted
    by how often the UNet runs each (self- and cross-attention per transformer block)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    shapes = [(4096, 40, 5), (1024, 80, 5), (256, 160, 5), (64, 160, 1)]  # (tokens, head dim, blocks)
    out = {}
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        total = 0.0
        try:
            for n, d, count in shapes:
                for kv in (n, 77):
                    q = torch.randn(16, 8, n, d, device=device, dtype=dtype, requires_grad=True)
                    k = torch.randn(16, 8, kv, d, device=device, dtype=dtype, requires_grad=True)
                    v = torch.randn(16, 8, kv, d, device=device, dtype=dtype, requires_grad=True)
                    g = torch.randn(16, 8, n, d, device=device, dtype=dtype)

                    def run(q=q, k=k, v=v, g=g, be=be):
                        with sdpa_kernel(be):
                            F.scaled_dot_product_attention(q, k, v).backward(g)

                    s, _ = timed(run, 10)
                    total += s * count
            out[name] = round(1000 * total, 3)
        except RuntimeError as e:
            out[name] = f"unavailable: {str(e).splitlines()[0][:120]}"
        log("attention", name, out[name])
    return out


def cold_train(args) -> dict:
    """The training run of a fresh process: base construction, first compile, training, saving."""
    code = ("import sys, json; sys.argv=['engine.py'] + json.loads(sys.argv[1]); "
            "from bench import engine; engine.cold_child()")
    extra = ["--toy"] if args.toy else []
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(extra + ["--steps", str(args.steps)])],
                          capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("COLD ")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr or proc.stdout)[-800:]}
    info = json.loads(lines[-1][5:])
    info["process_wall_s"] = round(wall, 2)
    return info


def cold_child():
    args = parse()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t0 = time.perf_counter()
    base = build_base(args.toy, device, dtype)
    cov = covariance(base, 512)
    with tempfile.TemporaryDirectory() as tmp:
        photos = make_photos(Path(tmp) / "photos", 8, base.resolution)
        setup = time.perf_counter() - t0
        secs, _ = train_once(base, cov, photos, Path(tmp) / "c.safetensors", args.steps, fast=True)
    print("COLD " + json.dumps({"setup_s": round(setup, 2), "train_s": round(secs, 2)}), flush=True)


def covariance(base, n: int):
    from perfusion_hub.captions import corpus_digest, load_captions
    from perfusion_hub.covariance import estimate

    lines = load_captions()[:n]
    return estimate(base.pipe.tokenizer, base.pipe.text_encoder, lines, base_digest=base.digest,
                    corpus_digest=corpus_digest(lines), batch_size=256)


def parse():
    ap = argparse.ArgumentParser()
    ap.add_argument("--toy", action="store_true", help="CPU smoke run on the toy configs")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=400, help="training steps (default recipe: 400)")
    ap.add_argument("--render-steps", type=int, default=50)
    ap.add_argument("--only", default="render,fast,compose,train,cold", help="stages to run")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    return ap.parse_args()


def main():
    args = parse()
    stages = set(args.only.split(","))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    import diffusers

    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    short = "h100" if "H100" in name else ("h200" if "H200" in name else name.split()[0].lower())
    out_path = Path(args.out) / f"engine-{short}{'-toy' if args.toy else ''}-{date.today().isoformat()}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    res = {"device": name, "torch": torch.__version__, "diffusers": diffusers.__version__,
           "date": date.today().isoformat(), "arch": "toy" if args.toy else "sd15 (random weights)",
           "render_steps": args.render_steps, "repeats": args.repeats,
           "env": {k: os.environ[k] for k in ("PFX_SDPA_BACKEND", "PFX_CUDA_GRAPHS", "PFX_COMPILE_BACKEND")
                   if k in os.environ}}

    def save():
        out_path.write_text(json.dumps(res, indent=2))

    render_dtype = torch.float16 if device == "cuda" else torch.float32
    base = build_base(args.toy, device, render_dtype)
    from perfusion_hub.loaders import load_concepts, unload_concepts
    from perfusion_hub.render import render

    cov = covariance(base, 512)
    pipe = base.pipe
    size = base.resolution
    prompt = "a photo of a cat on a chair"
    gen = lambda: torch.Generator("cpu").manual_seed(0)
    check = pipe(prompt, num_inference_steps=2, guidance_scale=7.5, generator=gen(), height=size, width=size,
                 output_type="latent").images
    if not torch.isfinite(check).all():
        log("fp16 latents not finite with random weights: using bf16 for render")
        render_dtype = torch.bfloat16
        pipe.to(dtype=render_dtype)
    res["render_dtype"] = str(render_dtype).replace("torch.", "")
    concepts = synthetic_concepts(base, cov, 16)

    if "render" in stages:
        # All five concepts stay loaded; a variant's prompt uses n of them (n=0: loaded but unused).
        # Rounds interleave the baseline and every variant so clock and thermal drift hit all alike.
        load_concepts(pipe, concepts[:5], covariance=cov)
        variants = {"baseline": lambda: pipe(prompt, num_inference_steps=args.render_steps, guidance_scale=7.5,
                                             generator=gen(), height=size, width=size)}
        for n in (0, 1, 3, 5):
            p = prompt if n == 0 else "a photo of " + " and ".join(f"<c{i}>" for i in range(n))
            variants[str(n)] = (lambda p=p: render(base, p, steps=args.render_steps, guidance=7.5, seed=0))
        times = {k: [] for k in variants}
        for fn in variants.values():
            fn()  # warm-up
        import gc

        gc.disable()  # a collection inside one timed call is noise, not a cost of that variant
        for _ in range(args.repeats):
            for k, fn in variants.items():
                sync()
                t = time.perf_counter()
                fn()
                sync()
                times[k].append(time.perf_counter() - t)
        gc.enable()
        base_s = statistics.median(times["baseline"])
        res["baseline_render_s"] = round(base_s, 4)
        res["baseline_render_all_s"] = [round(t, 4) for t in times["baseline"]]
        res["render_s"] = {k: round(statistics.median(v), 4) for k, v in times.items() if k != "baseline"}
        res["render_ratio"] = {k: round(statistics.median(v) / base_s, 4) for k, v in times.items() if k != "baseline"}
        res["render_ratio_of_minimums"] = {
            k: round(min(v) / min(times["baseline"]), 4) for k, v in times.items() if k != "baseline"}
        res["render_ratio_paired"] = {  # per round, variant / that round's baseline, then the median
            k: round(statistics.median(a / b for a, b in zip(v, times["baseline"])), 4)
            for k, v in times.items() if k != "baseline"}
        log("render", res["render_s"], res["render_ratio"], res["render_ratio_paired"], res["render_ratio_of_minimums"])
        unload_concepts(pipe)
        save()

    if "attention" in stages and device == "cuda":
        res["attention_fwd_bwd_ms"] = attention_backends(device, torch.bfloat16)
        save()

    if "compose" in stages:
        from perfusion_hub.concept import concept_bytes, load_concept
        from perfusion_hub.loaders import runtime_of

        blobs = [concept_bytes(c) for c in concepts]
        res["compose_ms"] = {}
        for n in (1, 4, 16):
            times = []
            for _ in range(max(3, args.repeats)):
                unload_concepts(pipe)
                sync()
                t = time.perf_counter()
                cs = [load_concept(b) for b in blobs[:n]]
                load_concepts(pipe, cs, covariance=cov)
                rt = runtime_of(pipe)
                names = [c.name for c in cs]
                basis = rt.basis(names, pipe.unet.device)
                for path, attn in rt.layers.items():
                    rt.layer_terms(path, attn, names, basis)
                sync()
                times.append(time.perf_counter() - t)
            res["compose_ms"][str(n)] = round(1000 * statistics.median(times), 2)
            log("compose", n, res["compose_ms"][str(n)])
        unload_concepts(pipe)
        save()

    if "fast" in stages:
        from perfusion_hub.fast import FastRenderer

        load_concepts(pipe, concepts[:1], covariance=cov)
        p = "a photo of <c0> on a chair"
        eager = render(base, p, steps=args.render_steps, seed=0)
        t = time.perf_counter()
        fr = FastRenderer(pipe)
        first = render(base, p, steps=args.render_steps, seed=0, fast=fr)
        res["fast_first_call_s"] = round(time.perf_counter() - t, 2)
        s, _ = timed(lambda: render(base, p, steps=args.render_steps, seed=0, fast=fr), args.repeats)
        fast_img = render(base, p, steps=args.render_steps, seed=0, fast=fr).images[0]
        fr.close()
        import numpy as np

        a = np.asarray(eager.images[0], dtype=np.int16)
        b = np.asarray(fast_img, dtype=np.int16)
        res["fast_render_s"] = round(s, 4)
        if "baseline_render_s" in res:
            res["fast_render_ratio"] = round(s / res["baseline_render_s"], 4)
        res["fast_vs_eager_max_abs_px"] = int(np.abs(a - b).max())
        res["fast_vs_eager_mean_abs_px"] = round(float(np.abs(a - b).mean()), 4)
        del first
        log("fast", s, res.get("fast_render_ratio"), res["fast_vs_eager_max_abs_px"])
        unload_concepts(pipe)
        save()

    if "train" in stages:
        del pipe, base
        torch.cuda.empty_cache() if device == "cuda" else None
        tdtype = torch.bfloat16 if device == "cuda" else torch.float32
        tbase = build_base(args.toy, device, tdtype)
        tcov = covariance(tbase, 512)
        with tempfile.TemporaryDirectory() as tmp:
            photos = make_photos(Path(tmp) / "photos", 8, tbase.resolution)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            warm_s, _ = train_once(tbase, tcov, photos, Path(tmp) / "w.safetensors", 3, fast=True)
            res["train_warmup_3_steps_s"] = round(warm_s, 2)
            log("train warm-up (compile)", warm_s)
            secs, result = train_once(tbase, tcov, photos, Path(tmp) / "c.safetensors", args.steps, fast=True)
            res["train_default_recipe_s"] = round(secs, 2)
            res["train_steps"] = args.steps
            res["train_samples_per_s"] = round(args.steps * 16 / secs, 1)
            res["train_final_loss"] = round(result.losses[-1], 5)
            res["train_losses_finite"] = all(math.isfinite(v) for v in result.losses)
            if device == "cuda":
                res["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            log("train", secs, res["train_samples_per_s"])
            save()
            # the compiled step against the eager one: the same 20 steps (same seed) both ways
            eager_steps = 20
            e_s, eager = train_once(tbase, tcov, photos, Path(tmp) / "e.safetensors", eager_steps, fast=False)
            _, fast20 = train_once(tbase, tcov, photos, Path(tmp) / "f.safetensors", eager_steps, fast=True)
            res["train_eager_samples_per_s"] = round(eager_steps * 16 / e_s, 1)
            res["train_fast_vs_eager_20_steps"] = compare_runs(eager, fast20)
            log("fast vs eager", res["train_fast_vs_eager_20_steps"])
            save()
        del tbase

    if "cold" in stages:
        res["train_cold"] = cold_train(args)
        log("cold", res["train_cold"])
        save()
    log(json.dumps(res, indent=2))
    save()


if __name__ == "__main__":
    main()
