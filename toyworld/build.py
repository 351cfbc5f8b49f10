"""Build the embedded `toy` base (``perfusion_hub/data/toy/``) and the SD1.5 config folder.

``python -m toyworld.build`` regenerates, in order:

1. the caption corpus ``data/captions.txt`` (`toyworld.corpus`, < 1 s);
2. the tokenizer ``data/toy/tokenizer/`` (`toyworld.tokenizer`, ~1 s);
3. the toy Stable Diffusion pipeline folder ``data/toy/`` (model_index.json, unet/, vae/, text_encoder/,
   scheduler/, tokenizer/; weights stored fp16 as ``diffusion_pytorch_model.safetensors`` /
   ``model.safetensors``; no safety checker or feature extractor);
4. ``data/toy/build_info.json`` (VAE training settings and measured quality), ``data/toy/pfx.json`` (the
   base's Perfusion settings: gates open only on a prompt's own tokens) and ``data/sd15/`` configs.

Steps 3-4 write the UNet and text encoder at their SEEDED INIT: the shipped ones were then trained as a
denoiser on the procedural world by ``toyworld.base_train`` (on a GPU; see build_info.json's
``denoiser`` section), and the shipped VAE's decoder was then refined on the world's scenes by
``toyworld.decoder`` (its encoder, and so every latent, unchanged; build_info.json's ``decoder``
section). So after a rebuild run base_train and decoder again, then regenerate the packaged covariance
(``python -m toyworld.build --covariance-only``) and the sample registry (``python -m toyworld.samples``).

Almost all of the build's time is VAE training (``VAE_PHASES``; minutes on a 2-core CPU); ``--skip-vae`` keeps
the shipped VAE and rebuilds everything else in seconds.

Toy architecture (CPU friendly, but with real head dims for the rank-one math):

* CLIPTextModel: hidden 128, intermediate 512, 4 layers, 4 heads, 77 positions, quick_gelu, vocab = tokenizer
  size; bos/eos/pad ids are the tokenizer's (eos = pad = ``<|endoftext|>``, the real eos id).
* UNet2DConditionModel: channels (64, 128), 1 layer per block, two cross-attention down and up blocks,
  cross_attention_dim 128, 4 heads, norm groups 16, sample 16, 4 in/out channels: 7 ``attn2`` modules
  (4.3 M parameters; its render speed on a CPU: bench/render_toy.py and bench/README.md).
* AutoencoderKL: channels [32, 64, 64] (downsampling x4: a 64x64 image <-> a 16x16x4 latent), norm groups
  8, one layer per block. Trained (seeded, CPU, 2 threads) on procedural 64x64 images (coloured or gradient
  backgrounds with circles, boxes, triangles and stripes) with reconstruction MSE plus a small KL term:
  1,600 steps of batch 16 on random 32x32 crops, then 300 steps of batch 8 on whole images (Adam 5e-4,
  cosine), posterior log-variance initialised at -8. Held-out PSNR of decode(encode(x)) is recorded in
  build_info.json; ``scaling_factor`` = 1 / std of the latents of held-out images (fp16-rounded weights),
  so scaled latents have ~unit std.
* DDIMScheduler with SD's betas (scaled_linear 0.00085..0.012, 1000 steps), steps_offset 1,
  clip_sample False, set_alpha_to_one False.

UNet and text encoder are seeded random inits (``torch.manual_seed`` before each). Determinism: with the same
torch version and thread count, a rebuild gives the same weights; VAE training on a different CPU family
may differ in the last bits (the shipped files are the reference; the base digest is computed from them).

Load it with ``StableDiffusionPipeline.from_pretrained(TOY_DIR, local_files_only=True, safety_checker=None,
requires_safety_checker=False, dtype=torch.float32)`` (weights are stored fp16; ask for fp32 on CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from perfusion_hub.bases import DATA as DATA_DIR
from toyworld.base_configs import dump_json, write_sd15_configs

TOY_DIR = DATA_DIR / "toy"

IMAGE_SIZE = 64
TEXT_SEED = 1
UNET_SEED = 2
VAE_SEED = 3
VAE_DATA_SEED = 4
VAE_EVAL_SEED = 5
VAE_PHASES = ((1600, 16, 32), (300, 8, 64))  # (steps, batch, crop size)
VAE_LR = 5e-4
VAE_KL_WEIGHT = 1e-4
NUM_THREADS = 2
VAE_LOGVAR_INIT = -8.0
STRIPE_MIN_PERIOD = 0.06
MAX_SHAPES = 4

UNET_CONFIG = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (64, 128),
    "layers_per_block": 1,
    "cross_attention_dim": 128,
    "attention_head_dim": 4,
    "norm_num_groups": 16,
}
VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 64,
}
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
# data/toy/pfx.json: Perfusion settings of this base (perfusion_hub.bases.base_settings)
PFX_SETTINGS = {
    "gate_positions": "span",
    "why": "gate_positions span: only the prompt's own positions are edited, and a concept's gate opens only from its "
           "own token up to the next concept's token. This small text encoder's padding encodings copy the prompt's "
           "last word, so with every position gated a concept's edit would open on ~70 padding positions and wipe "
           "out the rest of the prompt (measured: backgrounds lost); and it is causal, so with two concepts in a "
           "prompt the second one's encoding carries the first one and opened its gate as well (measured: both "
           "edits summed at the second token, composition success 0%). embedding_norm: unbounded, the concept "
           "token's embedding grew to ~4x a word's and, through causal attention, rewrote the words after it",
    # training prompts in the world's caption grammar (words the text encoder was trained on)
    "templates": ["a photo of a {}", "a picture of a {}", "an image of a {}", "a {}", "a photograph of a {}",
                  "a good photo of a {}"],
    # the concept token's embedding stays within the superclass word's norm (measured in bench/README.md)
    "embedding_norm": 1.0,
}
TEXT_CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 128,
}


# --------------------------------------------------------------------------------------------------
# procedural images
# --------------------------------------------------------------------------------------------------
_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) / (IMAGE_SIZE - 1)


def _shape_mask(rng: np.random.Generator, kind: int) -> np.ndarray:
    xx, yy = _XX, _YY
    if kind == 0:  # circle / disc
        cx, cy = rng.uniform(0.1, 0.9, 2)
        r = rng.uniform(0.05, 0.3)
        return (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
    if kind == 1:  # axis-aligned box
        x0, x1 = np.sort(rng.uniform(0.0, 1.0, 2))
        y0, y1 = np.sort(rng.uniform(0.0, 1.0, 2))
        if x1 - x0 < 0.08:
            x1 = x0 + 0.08
        if y1 - y0 < 0.08:
            y1 = y0 + 0.08
        return (xx >= x0) & (xx <= x1) & (yy >= y0) & (yy <= y1)
    if kind == 2:  # triangle
        p = rng.uniform(0.0, 1.0, (3, 2))
        d = [(xx - p[i, 0]) * (p[(i + 1) % 3, 1] - p[i, 1]) - (yy - p[i, 1]) * (p[(i + 1) % 3, 0] - p[i, 0])
             for i in range(3)]
        return ((d[0] >= 0) & (d[1] >= 0) & (d[2] >= 0)) | ((d[0] <= 0) & (d[1] <= 0) & (d[2] <= 0))
    # stripes, over the whole image or a box
    ang = rng.uniform(0, math.pi)
    period = rng.uniform(STRIPE_MIN_PERIOD, 0.25)
    phase = (xx * math.cos(ang) + yy * math.sin(ang)) / period
    m = (phase - np.floor(phase)) < rng.uniform(0.3, 0.7)
    if rng.random() < 0.6:
        m &= _shape_mask(rng, 1)
    return m


def procedural_image(rng: np.random.Generator) -> np.ndarray:
    """One 64x64 RGB image in [0, 1], float32, shape [3, 64, 64]."""
    c1 = rng.uniform(0, 1, 3).astype(np.float32)
    if rng.random() < 0.5:
        img = np.broadcast_to(c1[:, None, None], (3, IMAGE_SIZE, IMAGE_SIZE)).copy()
    else:
        c2 = rng.uniform(0, 1, 3).astype(np.float32)
        ang = rng.uniform(0, 2 * math.pi)
        t = _XX * math.cos(ang) + _YY * math.sin(ang)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = c1[:, None, None] * (1 - t) + c2[:, None, None] * t
    for _ in range(int(rng.integers(1, MAX_SHAPES + 1))):
        m = _shape_mask(rng, int(rng.integers(0, 4)))
        img[:, m] = rng.uniform(0, 1, (3, 1)).astype(np.float32)
    return img.astype(np.float32)


def procedural_batch(rng: np.random.Generator, n: int) -> torch.Tensor:
    """n images in [-1, 1] as a float32 tensor [n, 3, 64, 64]."""
    return torch.from_numpy(np.stack([procedural_image(rng) for _ in range(n)]) * 2.0 - 1.0)


def eval_images(n: int = 64, seed: int = VAE_EVAL_SEED) -> torch.Tensor:
    """Held-out procedural images (a seed never used in training)."""
    return procedural_batch(np.random.default_rng(seed), n)


# --------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------
def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    if tokenizer.eos_token_id is None or tokenizer.bos_token_id is None:
        raise ValueError("tokenizer lacks bos/eos")
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TEXT_CONFIG,
    )
    torch.manual_seed(TEXT_SEED)
    return CLIPTextModel(cfg).eval()


def build_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(UNET_SEED)
    return UNet2DConditionModel(**UNET_CONFIG).eval()


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)


def new_vae(logvar_init: float | None = VAE_LOGVAR_INIT):
    """A fresh VAE. With `logvar_init`, the posterior starts nearly deterministic (log-variance bias of the
    moment projection set to `logvar_init`, its weights scaled down), which avoids the long initial phase
    where the decoder only sees unit noise and speeds training up several fold."""
    from diffusers import AutoencoderKL

    torch.manual_seed(VAE_SEED)
    vae = AutoencoderKL(**VAE_CONFIG)
    if logvar_init is not None:
        qc = vae.quant_conv
        c = VAE_CONFIG["latent_channels"]
        with torch.no_grad():
            qc.weight[c:] *= 0.1
            qc.bias[c:] = logvar_init
    return vae


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (compared in [0, 1] after clamping)."""
    a = ((a.float().clamp(-1, 1) + 1) / 2)
    b = ((b.float().clamp(-1, 1) + 1) / 2)
    mse = torch.mean((a - b) ** 2).item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


@torch.no_grad()
def vae_quality(vae, images: torch.Tensor | None = None) -> dict:
    """Round-trip figures on held-out images: PSNR of decode(encode(x)) (posterior mean), the
    latent std, and the relative error of encode(decode(z)) for z = encode(x)."""
    images = eval_images() if images is None else images
    vae = vae.float().eval()
    dist = vae.encode(images).latent_dist
    z = dist.mean
    rec = vae.decode(z).sample
    gen = torch.Generator().manual_seed(VAE_EVAL_SEED)
    zs = dist.sample(generator=gen)
    z2 = vae.encode(rec).latent_dist.mean
    return {
        "psnr_db": round(psnr(rec, images), 2),
        "psnr_sampled_db": round(psnr(vae.decode(zs).sample, images), 2),
        "latent_std": float(zs.std()),
        "latent_mean": float(zs.mean()),
        "latent_roundtrip_rel_err": round(float((z2 - z).norm() / z.norm()), 4),
    }


def train_vae(phases=None, lr: float = VAE_LR, kl_weight: float = VAE_KL_WEIGHT, device: str = "cpu",
              log=print):
    """Train the toy VAE deterministically (seeded; 2 CPU threads). Returns (vae in fp32, info dict).

    `phases` is a sequence of (steps, batch, crop): most steps train on random `crop` x `crop` windows
    of the procedural 64x64 images (the VAE is convolutional, so this is ~4x cheaper per image), the last
    phase on whole 64x64 images. Adam, 5 % linear warm-up then cosine decay over all steps; loss = MSE
    (images in [-1, 1]) + kl_weight * KL per latent element, decoding a posterior sample.
    """
    phases = tuple(tuple(p) for p in (phases or VAE_PHASES))
    total = sum(p[0] for p in phases)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(NUM_THREADS)
    try:
        vae = new_vae().to(device).train()
        rng = np.random.default_rng(VAE_DATA_SEED)
        gen = torch.Generator(device).manual_seed(VAE_DATA_SEED)
        opt = torch.optim.Adam(vae.parameters(), lr=lr, betas=(0.9, 0.99))
        warm = max(1, total // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        t0 = time.perf_counter()
        step = 0
        for n_steps, batch, crop in phases:
            for _ in range(n_steps):
                x = procedural_batch(rng, batch)
                if crop < IMAGE_SIZE:
                    oy, ox = (int(v) for v in rng.integers(0, IMAGE_SIZE - crop + 1, 2))
                    x = x[:, :, oy:oy + crop, ox:ox + crop].contiguous()
                x = x.to(device)
                dist = vae.encode(x).latent_dist
                z = dist.sample(generator=gen)
                rec = vae.decode(z).sample
                mse = torch.mean((rec - x) ** 2)
                kl = dist.kl().mean() / (dist.mean[0].numel())  # per latent element
                loss = mse + kl_weight * kl
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if log and (step % 200 == 0 or step == total - 1):
                    log(f"vae step {step:5d}/{total} ({crop}px x{batch}) mse {mse.item():.5f} "
                        f"kl {kl.item():.3f} ({time.perf_counter() - t0:.0f}s)")
                step += 1
        vae = vae.cpu().eval()
        info = {"phases": [list(p) for p in phases], "lr": lr, "kl_weight": kl_weight,
                "logvar_init": VAE_LOGVAR_INIT, "threads": NUM_THREADS,
                "seeds": {"init": VAE_SEED, "data": VAE_DATA_SEED, "eval": VAE_EVAL_SEED}}
        if log:
            log(f"vae trained in {time.perf_counter() - t0:.0f}s")
        return vae, info
    finally:
        torch.set_num_threads(old_threads)


# --------------------------------------------------------------------------------------------------
# folder writing
# --------------------------------------------------------------------------------------------------
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def _model_index() -> dict:
    import diffusers

    return {**MODEL_INDEX, "_diffusers_version": diffusers.__version__}


def load_toy_vae(folder: Path = TOY_DIR):
    from diffusers import AutoencoderKL

    loaded = AutoencoderKL.from_pretrained(str(folder / "vae"), local_files_only=True, torch_dtype=torch.float32)
    # a clean copy, so that re-saving it writes the same config.json (no `_name_or_path`)
    vae = AutoencoderKL.from_config({k: v for k, v in loaded.config.items() if k != "_name_or_path"})
    vae.load_state_dict(loaded.state_dict())
    return vae.eval()


def build_toy(out: Path = TOY_DIR, skip_vae: bool = False, log=print) -> dict:
    """Write the whole toy pipeline folder. Returns the build info."""
    from transformers import CLIPTokenizer

    from toyworld import corpus, tokenizer

    out = Path(out)
    t0 = time.perf_counter()
    corpus.write_captions()
    tok_dir = tokenizer.build(out / "tokenizer")
    tok = CLIPTokenizer.from_pretrained(str(tok_dir))
    log(f"captions + tokenizer (vocab {len(tok)}) in {time.perf_counter() - t0:.1f}s")

    text = build_text_encoder(tok)
    unet = build_unet()
    sched = build_scheduler()
    info_path = out / "build_info.json"
    if skip_vae:
        src = out if (out / "vae" / "config.json").exists() else TOY_DIR
        vae = load_toy_vae(src)
        old_info = src / "build_info.json"
        vae_info = json.loads(old_info.read_text("utf-8")).get("vae", {}) if old_info.exists() else {}
    else:
        vae, vae_info = train_vae(log=log)
        # quality and scaling factor measured on the fp16-rounded weights that ship
        vae = vae.half().float()
        q = vae_quality(vae)
        vae.register_to_config(scaling_factor=float(f"{1.0 / q['latent_std']:.5g}"))
        vae_info.update(q, scaling_factor=vae.config.scaling_factor)
        log(f"vae: {q}")

    text.half().save_pretrained(str(out / "text_encoder"), safe_serialization=True)
    unet.half().save_pretrained(str(out / "unet"), safe_serialization=True)
    vae.half().save_pretrained(str(out / "vae"), safe_serialization=True)
    sched.save_pretrained(str(out / "scheduler"))
    dump_json(out / "model_index.json", _model_index())
    dump_json(out / "pfx.json", PFX_SETTINGS)
    info = {
        "note": "written by python -m toyworld.build; do not edit",
        "tokenizer_vocab_size": len(tok),
        "text_encoder": {**TEXT_CONFIG, "seed": TEXT_SEED},
        "unet": {"seed": UNET_SEED, "attn2_modules": 7},
        "vae": vae_info,
        "torch_version": torch.__version__.split("+")[0],
    }
    dump_json(info_path, info)
    write_sd15_configs()
    log(f"toy base written to {out} in {time.perf_counter() - t0:.0f}s")
    return info


def write_covariance(folder: Path = TOY_DIR) -> Path:
    """Estimate C for the base in `folder` over the packaged corpus and write it beside the base, where
    `perfusion_hub.covariance.packaged_covariance` finds it (run after the weights change)."""
    from perfusion_hub.bases import load_base
    from perfusion_hub.captions import corpus_digest, load_captions
    from perfusion_hub.covariance import PACKAGED_NAME, estimate

    base = load_base(str(folder), device="cpu", dtype="fp32")
    lines = load_captions()
    cov = estimate(base.pipe.tokenizer, base.pipe.text_encoder, lines, base_digest=base.digest,
                   corpus_digest=corpus_digest(lines), batch_size=256)
    return cov.save(Path(folder) / PACKAGED_NAME)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=TOY_DIR)
    ap.add_argument("--skip-vae", action="store_true", help="keep the existing VAE weights")
    ap.add_argument("--covariance-only", action="store_true",
                    help="only re-estimate the packaged covariance of the base in --out (after training it)")
    args = ap.parse_args(argv)
    if args.covariance_only:
        print(f"wrote {write_covariance(args.out)}", flush=True)
        return
    build_toy(args.out, skip_vae=args.skip_vae, log=lambda m: print(m, flush=True))


if __name__ == "__main__":
    main()
