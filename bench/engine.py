"""Engine speed at Stable Diffusion 1.5 and SDXL scale (issues 5 and 20). One GPU run, the baseline in the same run.

Builds the SD1.5 (default), SDXL or SD2.1 architecture (--arch sd15 | sdxl | sd2) from the shipped configs
(perfusion_hub/data/sd15, sdxl, sd2) with random weights (speed does not depend on the weights' values) and measures:
  1. plain diffusers StableDiffusionPipeline, 512x512, 50 DDIM steps, guidance 7.5, batch 1 (median of N)
  2. pfx render with 0, 1, 3, 5 concepts through the same pipeline, ratio to 1
  3. the fast render mode (compiled UNet + CUDA graphs + static concept K/V) with 1 concept, and its
     images against the eager path
  4. default-recipe training (400 steps, batch 16, 512x512, 8 photos) from photos on disk to the saved
     concept file: steady state (compiled, warm) and cold (fresh process: load + first compile)
  5. load + compose time for 1, 4 and 16 concepts
Results go to bench/results/engine-<device>[-<arch>]-<date>.json, written after every stage (a crash or a
timeout keeps the stages before it).

  python -m bench.engine                # the SD1.5 GPU run
  python -m bench.engine --toy         # a CPU smoke run of the same code on the toy configs

SDXL (issue 20): 1024x1024, bf16, 50 DDIM steps, guidance 7.5; render with 1 and 5 concepts against the plain
StableDiffusionXLPipeline in interleaved rounds, and the default training recipe (400 steps, batch 16, 8 photos).
A full SDXL training run takes minutes, so `--steps N` trains N steps and the JSON records the measured time and the
400-step figure extrapolated from the per-step time after warm-up (both, clearly named). Memory: the trainer's
auto mode enables gradient checkpointing after a CUDA out-of-memory error and then halves the micro-batch;
`--micro-batch` and `--checkpointing on|off` force a setting. Eager by default (`--compile` compiles the UNet; its
first compile at this size takes minutes).

  python -m bench.engine --arch sdxl --only render,train --steps 40 --repeats 5   # the SDXL GPU run
  python -m bench.engine --arch sdxl --toy --only render,train,pooled          # CPU smoke run, SDXL-shaped toy
  python -m bench.engine --arch sd2 --toy --only render,train                  # CPU smoke run, SD2-shaped toy
"""

from __future__ import annotations

import argparse
import itertools
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


def results_file(out_dir: str, stem: str, **fields) -> tuple[Path, dict]:
    """Where a benchmark of this machine writes today (out_dir/<stem>-<device>-<date>.json, its folder made) and the
    results dict it starts from: device, torch version, date and `fields`."""
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    path = Path(out_dir) / f"{stem}-{name.split()[-1].lower()}-{date.today().isoformat()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path, {"device": name, "torch": torch.__version__, "date": date.today().isoformat(), **fields}


# SDXL- and SD2-shaped toy configs for CPU smoke runs: the shipped configs with small widths (same block layout)
TOY_SHRINK = {
    "unet": {"block_out_channels": [32, 64, 64], "attention_head_dim": [2, 4, 4], "norm_num_groups": 8,
             "layers_per_block": 1, "sample_size": 8},
    "vae": {"block_out_channels": [8, 8, 8], "down_block_types": ["DownEncoderBlock2D"] * 3,
            "up_block_types": ["UpDecoderBlock2D"] * 3, "norm_num_groups": 8, "sample_size": 32},
    "text": {"intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
}


def _toy_configs(arch: str, load) -> dict:
    """The arch's shipped configs shrunk for a CPU run: text widths 64 (+96 for SDXL's second encoder), UNet
    widths 32/64 with SDXL's transformer depths (1, 2, 10) cut to (1, 2, 2)."""
    unet = dict(load("unet"), **TOY_SHRINK["unet"])
    vae = dict(load("vae"), **TOY_SHRINK["vae"])
    text = dict(load("text_encoder"), **TOY_SHRINK["text"], hidden_size=64, projection_dim=64)
    out = {"unet": unet, "vae": vae, "text_encoder": text}
    if arch == "sdxl":
        unet.update(block_out_channels=[32, 64], attention_head_dim=[2, 4], transformer_layers_per_block=[1, 2],
                    cross_attention_dim=160, addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
                    down_block_types=unet["down_block_types"][:2], up_block_types=unet["up_block_types"][1:])
        out["text_encoder_2"] = dict(load("text_encoder_2"), **TOY_SHRINK["text"], hidden_size=96, projection_dim=32)
    else:
        unet.update(block_out_channels=[32, 64], attention_head_dim=[2, 4], cross_attention_dim=64,
                    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
    return out


def build_family_base(arch: str, toy: bool, device: str, dtype):
    """A Base around a random-weight SDXL or SD2.1 pipeline built from data/sdxl or data/sd2 (toy: shrunk)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from perfusion_hub.bases import Base, BaseSpec

    cfg_dir = Path(os.environ.get("PFX_BENCH_CONFIGS") or DATA / arch)
    load = lambda sub: {k: v for k, v in json.loads((cfg_dir / sub / "config.json").read_text()).items()
                        if not k.startswith("_")}
    cfgs = _toy_configs(arch, load) if toy else {k: load(k) for k in ("unet", "vae", "text_encoder")} | (
        {"text_encoder_2": load("text_encoder_2")} if arch == "sdxl" else {})
    toks = [CLIPTokenizer.from_pretrained(str(DATA / "toy" / "tokenizer")) for _ in range(2 if arch == "sdxl" else 1)]
    if arch == "sd2":
        toks[0].pad_token = "!"  # OpenCLIP pads with "!", as SD2's tokenizer config says
    else:
        toks[-1].pad_token = "!"

    def text_config(cfg, tok):
        return CLIPTextConfig(**dict(cfg, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(cfgs["unet"])
        vae = AutoencoderKL.from_config(cfgs["vae"])
        te = CLIPTextModel(text_config(cfgs["text_encoder"], toks[0]))
        te2 = CLIPTextModelWithProjection(text_config(cfgs["text_encoder_2"], toks[1])) if arch == "sdxl" else None
    sched = DDIMScheduler.from_config(json.loads((cfg_dir / "scheduler" / "scheduler_config.json").read_text()))
    if arch == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=toks[0],
                                         tokenizer_2=toks[1], unet=unet, scheduler=sched,
                                         force_zeros_for_empty_prompt=True, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=toks[0], unet=unet, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, image_encoder=None,
                                       requires_safety_checker=False)
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return Base(BaseSpec("embedded", str(cfg_dir), f"{arch}-random{'-toy' if toy else ''}"), pipe, device, dtype)


def build_base(toy: bool, device: str, dtype, arch: str = "sd15"):
    """A Base around a random-weight pipeline built from shipped configs (PFX_BENCH_CONFIGS overrides)."""
    if arch != "sd15":
        return build_family_base(arch, toy, device, dtype)
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
    from perfusion_hub.concept import FORMAT, Concept, embedding_key, family_metadata, format_version_for
    from perfusion_hub.processor import cross_attention_modules

    layers = cross_attention_modules(base.pipe.unet)
    dim, dims, family = base.dim, base.text_dims, base.family
    out = []
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        i_super = torch.randn(dim, generator=g)
        meta = {**family_metadata(family, dims), "format": FORMAT, "format_version": format_version_for(family),
                "name": f"c{i}", "version": "0.1.0",
                "superclass": "cat", "trigger": f"<c{i}>", "base_name": base.name, "base_digest": base.digest,
                "covariance_digest": cov.digest, "corpus_digest": cov.corpus_digest, "beta": "0.7", "tau": "0.15",
                "key_lock": "local", "training": "{}", "created": "2026-01-01T00:00:00+00:00", "pfx_version": "bench"}
        values = {p: (a.to_v.weight.detach().float().cpu() @ i_super) for p, a in layers.items()}
        embs = [torch.randn(d, generator=g) * 0.01 for d in dims]
        out.append(Concept(meta, embs[0], i_super + 0.1 * torch.randn(dim, generator=g), i_super, values,
                           extra_embeddings={embedding_key(k): e for k, e in enumerate(embs) if k}))
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


def device_ms(fn, ops: tuple[str, ...] = ()) -> dict[str, float]:
    """Run `fn` under torch.profiler: GPU ms by kernel name (self time), and for each aten op named in `ops` the GPU
    ms of the kernels it launched (device time of the op's CPU event)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
    out: dict[str, float] = {}
    for ev in prof.key_averages():
        if ev.device_type.name == "CUDA":
            out[ev.key] = out.get(ev.key, 0.0) + ev.self_device_time_total / 1000
        elif ev.key in ops:
            out[ev.key] = out.get(ev.key, 0.0) + ev.device_time_total / 1000
    return out


def shortened(pairs, width: int) -> dict:
    """{name: value} of (kernel name, value) pairs with names cut to `width` characters for a report; a name whose cut
    form an earlier one already took stays whole, so no two entries overwrite each other."""
    out: dict = {}
    for name, value in pairs:
        out[name[:width] if name[:width] not in out else name] = value
    return out


def make_photos(folder: Path, n: int, size: int):
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", (size + 37 * i, size), (30 + 20 * i, 90, 200))
        d = ImageDraw.Draw(im)
        d.ellipse((40 + 9 * i, 60, 300 + 9 * i, 330), fill=(250, 140, 20))
        im.save(folder / f"p{i}.jpg", quality=92)
    return folder


def train_once(base, cov, photos: Path, out: Path, steps: int, fast: bool, *, micro_batch: int = 0,
               checkpointing: bool | None = None, marks: list | None = None):
    """Train `steps` steps of the default recipe; `marks` collects (step, seconds since start) each time the
    trainer reports losses (every 10 steps on CUDA, after the GPU finished them: the reading waits for it)."""
    from perfusion_hub.train import TrainConfig, train_concept

    cfg = TrainConfig(steps=steps, batch_size=16, previews=0, checkpoint_every=10**9, micro_batch=micro_batch,
                      gradient_checkpointing=checkpointing)
    sync()
    t = time.perf_counter()
    progress = None if marks is None else (lambda step, total, loss: marks.append((step, time.perf_counter() - t)))
    res = train_concept(base, photos, name="bench-cat", superclass="cat", covariance=cov, out_path=out, config=cfg,
                        fast=fast, progress=progress)
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


def report_points(marks: list) -> list:
    """(step, seconds) of each report from the trainer's progress marks: a report hands over several steps' losses at
    once (every 10 steps on CUDA), and only its last step was done at that time."""
    return [m for m, later in itertools.pairwise(marks) if later[1] - m[1] > 1e-3] + marks[-1:]


def extrapolate(marks: list, total_s: float, steps: int, target: int = 400) -> dict | None:
    """The time of a `target`-step run from a shorter one: the time to the first report (setup, latents, first steps,
    any out-of-memory retry), steady per-step time between the first and last report, and the time after the last
    step (saving). None when there are fewer than two report points with steps between them."""
    points = report_points(marks)
    if len(points) < 2 or points[-1][0] == points[0][0]:
        return None
    (s0, t0), (s1, t1) = points[0], points[-1]
    per_step = (t1 - t0) / (s1 - s0)
    return {"per_step_s": round(per_step, 4), "first_report_step": s0, "first_report_s": round(t0, 2),
            "after_last_step_s": round(total_s - t1, 2),
            f"extrapolated_{target}_steps_s": round(t0 + (target - s0) * per_step + (total_s - t1), 1),
            "samples_per_s_steady": round(16 / per_step, 2)}


def cold_train(args) -> dict:
    """The training run of a fresh process: base construction, first compile, training, saving."""
    code = ("import sys, json; sys.argv=['engine.py'] + json.loads(sys.argv[1]); "
            "from bench import engine; engine.cold_child()")
    extra = (["--toy"] if args.toy else []) + ["--arch", args.arch]
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
    base = build_base(args.toy, device, dtype, args.arch)
    cov = covariance(base, 512)
    with tempfile.TemporaryDirectory() as tmp:
        photos = make_photos(Path(tmp) / "photos", 8, base.resolution)
        setup = time.perf_counter() - t0
        secs, _ = train_once(base, cov, photos, Path(tmp) / "c.safetensors", args.steps, fast=True)
    print("COLD " + json.dumps({"setup_s": round(setup, 2), "train_s": round(secs, 2)}), flush=True)


def covariance(base, n: int):
    from perfusion_hub.captions import corpus_digest, load_captions
    from perfusion_hub.covariance import estimate_for

    lines = load_captions()[:n]
    return estimate_for(base.pipe, lines, base_digest=base.digest, corpus_digest=corpus_digest(lines), batch_size=256)


def parse():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", choices=("sd15", "sdxl", "sd2"), default="sd15",
                    help="architecture built from perfusion_hub/data/<arch> (sd15: the SD1.5 run of issue 5)")
    ap.add_argument("--toy", action="store_true", help="CPU smoke run on toy-sized configs of the arch")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=400,
                    help="training steps (default recipe: 400; fewer: measured and extrapolated to 400)")
    ap.add_argument("--render-steps", type=int, default=50)
    ap.add_argument("--variants", default="0,1,3,5", help="concept counts of the render stage (SDXL: 1,5 suffice)")
    ap.add_argument("--dtype", choices=("auto", "fp16", "bf16", "fp32"), default="auto",
                    help="render dtype (auto: fp16 on CUDA for sd15 with a bf16 fallback, bf16 for sdxl/sd2)")
    ap.add_argument("--micro-batch", type=int, default=0, help="training micro-batch (0: the trainer's auto)")
    ap.add_argument("--checkpointing", choices=("auto", "on", "off"), default="auto",
                    help="gradient checkpointing in training (auto: after a CUDA out-of-memory error)")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                    help="compile the UNet for training (auto: on for sd15, off for sdxl/sd2)")
    ap.add_argument("--only", default=None, help="stages to run (default: render,fast,compose,train,cold for sd15, "
                                                 "render,train for sdxl/sd2)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    if args.only is None:
        args.only = "render,fast,compose,train,cold" if args.arch == "sd15" else "render,train"
    return args


def main():
    args = parse()
    stages = set(args.only.split(","))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    import diffusers

    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    short = "h100" if "H100" in name else ("h200" if "H200" in name else name.split()[0].lower())
    sd15 = args.arch == "sd15"
    tag = ("" if sd15 else f"-{args.arch}") + ("-toy" if args.toy else "")
    out_path = Path(args.out) / f"engine-{short}{tag}-{date.today().isoformat()}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    res = {"device": name, "torch": torch.__version__, "diffusers": diffusers.__version__,
           "date": date.today().isoformat(),
           "arch": ("toy" if args.toy else "sd15 (random weights)") if sd15 else
           f"{args.arch}{' toy-sized' if args.toy else ''} (random weights, data/{args.arch} configs)",
           "render_steps": args.render_steps, "repeats": args.repeats, "stages": args.only,
           "env": {k: os.environ[k] for k in ("PFX_COMPILE_BACKEND",) if k in os.environ}}

    def save():
        out_path.write_text(json.dumps(res, indent=2))

    names = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if args.dtype != "auto":
        render_dtype = names[args.dtype]
    elif device != "cuda":
        render_dtype = torch.float32
    else:
        render_dtype = torch.float16 if sd15 else torch.bfloat16
    t0 = time.perf_counter()
    base = build_base(args.toy, device, render_dtype, args.arch)
    from perfusion_hub.loaders import load_concepts, unload_concepts
    from perfusion_hub.render import render

    cov = covariance(base, 512)
    res["setup_s"] = round(time.perf_counter() - t0, 2)
    res["family"], res["text_dims"], res["attn2_layers"] = base.family, base.text_dims, len(base.layers())
    log("built", res["arch"], base.family, base.text_dims, len(base.layers()), "attn2 layers,", res["setup_s"], "s")
    pipe = base.pipe
    size = base.resolution
    res["resolution"] = size
    prompt = "a photo of a cat on a chair"
    gen = lambda: torch.Generator("cpu").manual_seed(0)
    if args.dtype == "auto" and render_dtype == torch.float16:
        check = pipe(prompt, num_inference_steps=2, guidance_scale=7.5, generator=gen(), height=size, width=size,
                     output_type="latent").images
        if not torch.isfinite(check).all():
            log("fp16 latents not finite with random weights: using bf16 for render")
            render_dtype = torch.bfloat16
            pipe.to(dtype=render_dtype)
    res["render_dtype"] = str(render_dtype).replace("torch.", "")
    concepts = synthetic_concepts(base, cov, 16)
    save()

    if "render" in stages:
        # All five concepts stay loaded; a variant's prompt uses n of them (n=0: loaded but unused).
        # Rounds interleave the baseline and every variant so clock and thermal drift hit all alike.
        counts = [int(n) for n in args.variants.split(",")]
        load_concepts(pipe, concepts[:max(5, *counts)], covariance=cov)
        variants = {"baseline": lambda: pipe(prompt, num_inference_steps=args.render_steps, guidance_scale=7.5,
                                             generator=gen(), height=size, width=size)}
        for n in counts:
            p = prompt if n == 0 else "a photo of " + " and ".join(f"<c{i}>" for i in range(n))
            variants[str(n)] = (lambda p=p: render(base, p, steps=args.render_steps, guidance=7.5, seed=0))
        times = {k: [] for k in variants}
        t = time.perf_counter()
        for fn in variants.values():
            fn()  # warm-up
        log(f"render warm-up ({len(variants)} calls): {time.perf_counter() - t:.1f} s")
        import gc

        gc.disable()  # a collection inside one timed call is noise, not a cost of that variant
        for r in range(args.repeats):
            for k, fn in variants.items():
                sync()
                t = time.perf_counter()
                fn()
                sync()
                times[k].append(time.perf_counter() - t)
            log(f"render round {r + 1}/{args.repeats}:", {k: round(v[-1], 3) for k, v in times.items()})
            res["render_rounds_done"] = r + 1
            res["render_all_s"] = {k: [round(x, 4) for x in v] for k, v in times.items()}
            save()
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

    if "train" in stages and not sd15:
        train_family(args, res, save, base, cov, device)
    elif "train" in stages:
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


def train_family(args, res: dict, save, base, cov, device: str) -> None:
    """SDXL / SD2 training stage: the default recipe (batch 16, 8 photos at the base resolution) in bf16 on CUDA,
    `args.steps` steps measured; a short warm-up run first (kernels, allocator; the compile when --compile on)."""
    from perfusion_hub.loaders import unload_concepts

    unload_concepts(base.pipe)
    tdtype = torch.bfloat16 if device == "cuda" else torch.float32
    base.pipe.to(dtype=tdtype)
    base.dtype = tdtype
    fast = args.compile == "on" or (args.compile == "auto" and args.arch == "sd15")
    ck = {"auto": None, "on": True, "off": False}[args.checkpointing]
    res["train_settings"] = {"dtype": str(tdtype).replace("torch.", ""), "compile": fast,
                             "micro_batch": args.micro_batch, "gradient_checkpointing": args.checkpointing, "batch_size": 16, "photos": 8,
                             "resolution": base.resolution}
    save()
    with tempfile.TemporaryDirectory() as tmp:
        photos = make_photos(Path(tmp) / "photos", 8, base.resolution)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        warm_steps = 3 if fast else 2
        warm_s, warm = train_once(base, cov, photos, Path(tmp) / "w.safetensors", warm_steps, fast,
                                  micro_batch=args.micro_batch, checkpointing=ck)
        res[f"train_warmup_{warm_steps}_steps_s"] = round(warm_s, 2)
        res["train_warmup_warnings"] = warm.warnings
        log(f"train warm-up ({warm_steps} steps): {warm_s:.1f} s", warm.warnings)
        training = json.loads(warm.concept.metadata["training"])
        if training.get("gradient_checkpointing"):  # the warm-up needed it: measure with what fits
            ck = True
        micro = training.get("micro_batch", args.micro_batch)
        if device == "cuda":  # the warm-up's peak includes any attempt that ran out of memory
            res["warmup_peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.reset_peak_memory_stats()
        save()
        marks: list = []
        secs, result = train_once(base, cov, photos, Path(tmp) / "c.safetensors", args.steps, fast,
                                  micro_batch=micro, checkpointing=ck, marks=marks)
        training = json.loads(result.concept.metadata["training"])
        res["train_steps_measured"] = args.steps
        res["train_measured_s"] = round(secs, 2)
        res["train_samples_per_s"] = round(args.steps * 16 / secs, 2)
        if args.steps == 400:
            res["train_default_recipe_s"] = round(secs, 2)
        res["train_extrapolation"] = extrapolate(marks, secs, args.steps)
        res["train_memory"] = {"gradient_checkpointing": bool(training.get("gradient_checkpointing") or ck),
                               "micro_batch": training.get("micro_batch", micro or "auto"),
                               "warnings": result.warnings}
        res["train_final_loss"] = round(result.losses[-1], 5)
        res["train_losses_finite"] = all(math.isfinite(v) for v in result.losses)
        res["concept_bytes"] = result.path.stat().st_size if result.path.exists() else None
        if device == "cuda":
            res["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        log("train", res["train_measured_s"], "s for", args.steps, "steps;", res["train_extrapolation"],
            res["train_memory"], res.get("peak_mem_gb"))
        save()


if __name__ == "__main__":
    main()
