"""Train the embedded `tiny` base's UNet and text encoder into a small text-to-image denoiser.

``python -m perfusion_hub.tiny_train --out DIR`` (meant for one GPU; runs on CPU with small settings):

1. generates `--images` base-training examples of the procedural world (`perfusion_hub.world`; never a reserved
   instance) on all CPU cores, `--captions` caption variants each, turned into token ids by a word table;
2. encodes them once with the frozen shipped VAE (posterior mean x scaling_factor);
3. trains UNet and text encoder jointly, starting from the shipped seeded inits, for `--seconds` of wall time:
   epsilon prediction with the shipped DDIM/SD noise schedule (1000 steps, scaled_linear betas), uniform
   timesteps, min-SNR-gamma loss weighting, 10 % of captions dropped to "" (classifier-free guidance),
   AdamW with warm-up then cosine decay over the time budget, grad-norm clipping, bf16 autocast, and an EMA
   of both models;
4. every `--save-every` seconds and at the end writes the EMA weights in fp16 under DIR/unet and
   DIR/text_encoder (same file names and keys as data/tiny), plus DIR/train_info.json (settings, loss curve,
   validation loss on fixed held-out examples) and the log.

The time budget (not a step count) sets the length, so a run fits its lease; the number of steps reached is
recorded in train_info.json.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from perfusion_hub import world

TINY_DIR = Path(__file__).resolve().parent / "data" / "tiny"
DATA_SEED_BASE = 10_000_000  # example seeds of base training start here
VAL_SEED_BASE = 90_000_000  # held-out examples for the validation loss
T0 = time.perf_counter()


def log(msg: str) -> None:
    line = f"[{time.perf_counter() - T0:7.1f}s] {msg}"
    print(line, flush=True)
    if LOG_FILE:
        with open(LOG_FILE, "a", encoding="utf-8") as f:
            f.write(line + "\n")


LOG_FILE: Path | None = None


def _gen_chunk(args):
    start, n, k = args
    imgs, caps = world.batch(range(start, start + n), k)
    return imgs, caps


def make_data(n: int, k: int, seed_base: int, workers: int, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """n images uint8 [n, 64, 64, 3] and ids int32 [n, k, 77]."""
    chunk = 500
    jobs = [(seed_base + i, min(chunk, n - i), k) for i in range(0, n, chunk)]
    if workers > 1:
        with mp.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_gen_chunk, jobs)
    else:
        parts = [_gen_chunk(j) for j in jobs]
    imgs = np.concatenate([p[0] for p in parts])
    caps = [c for p in parts for c in p[1]]
    to_ids = world.CaptionIds(tokenizer)
    ids = np.stack([np.stack([to_ids(c) for c in cs]) for cs in caps])
    return imgs, ids


@torch.no_grad()
def encode_latents(vae, imgs: np.ndarray, device, bs: int = 1024) -> torch.Tensor:
    out = []
    sf = vae.config.scaling_factor
    for i in range(0, len(imgs), bs):
        x = torch.from_numpy(imgs[i:i + bs]).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
        out.append(vae.encode(x).latent_dist.mean * sf)
    return torch.cat(out)


def save_weights(model, src_file: Path, dst_file: Path) -> None:
    """Write `model`'s weights fp16 under the key names of the shipped file `src_file`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    sd = model.state_dict()
    with safe_open(str(src_file), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata() or {"format": "pt"}
    out = {}
    for k in keys:
        v = sd.get(k)
        if v is None:
            v = sd["text_model." + k]
        out[k] = v.detach().to("cpu", torch.float16).contiguous()
    dst_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst_file.with_name(dst_file.name + ".tmp")
    save_file(out, str(tmp), metadata=meta)
    tmp.replace(dst_file)
    shutil.copy(src_file.parent / "config.json", dst_file.parent / "config.json")


def main(argv=None) -> None:
    global LOG_FILE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--images", type=int, default=200_000)
    ap.add_argument("--captions", type=int, default=3, help="caption variants per image")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--seconds", type=float, default=420.0, help="training wall-time budget")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps too (0: no limit)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-text", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--min-snr", type=float, default=5.0)
    ap.add_argument("--drop", type=float, default=0.1, help="caption dropout to the empty prompt")
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--save-every", type=float, default=120.0)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)))
    ap.add_argument("--val", type=int, default=1024, help="held-out examples for the validation loss")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    LOG_FILE = args.out / "train_log.txt"
    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True

    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    log(f"torch {torch.__version__} device {dev} ({torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'})")
    tok = CLIPTokenizer.from_pretrained(str(TINY_DIR / "tokenizer"))
    t_gen = time.perf_counter()
    imgs, ids = make_data(args.images, args.captions, DATA_SEED_BASE, args.workers, tok)
    vimgs, vids = make_data(args.val, 1, VAL_SEED_BASE, args.workers, tok)
    t_gen = time.perf_counter() - t_gen
    log(f"generated {len(imgs)} + {len(vimgs)} images x {args.captions} captions in {t_gen:.1f}s")

    vae = AutoencoderKL.from_pretrained(str(TINY_DIR / "vae"), torch_dtype=torch.float32).to(dev).eval()
    t_enc = time.perf_counter()
    lat = encode_latents(vae, imgs, dev)
    vlat = encode_latents(vae, vimgs, dev)
    t_enc = time.perf_counter() - t_enc
    del vae, imgs
    log(f"latents {tuple(lat.shape)} std {lat.std().item():.3f} mean {lat.mean().item():.3f} in {t_enc:.1f}s")
    ids_t = torch.from_numpy(ids).long().to(dev)
    vids_t = torch.from_numpy(vids[:, 0]).long().to(dev)
    empty = torch.tensor(tok("", padding="max_length", max_length=77).input_ids, device=dev)

    unet = UNet2DConditionModel.from_pretrained(str(TINY_DIR / "unet"), torch_dtype=torch.float32).to(dev).train()
    text = CLIPTextModel.from_pretrained(str(TINY_DIR / "text_encoder"), torch_dtype=torch.float32).to(dev).train()
    ema_unet = UNet2DConditionModel.from_pretrained(str(TINY_DIR / "unet"), torch_dtype=torch.float32).to(dev).eval()
    ema_text = CLIPTextModel.from_pretrained(str(TINY_DIR / "text_encoder"), torch_dtype=torch.float32).to(dev).eval()
    params = list(unet.parameters()) + list(text.parameters())
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    log(f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params, text "
        f"{sum(p.numel() for p in text.parameters()) / 1e6:.2f}M")
    fused = dev.type == "cuda"
    opt = torch.optim.AdamW([{"params": list(unet.parameters()), "lr": args.lr},
                             {"params": list(text.parameters()), "lr": args.lr_text}],
                            betas=(0.9, 0.99), weight_decay=0.01, fused=fused)
    base_lrs = [g["lr"] for g in opt.param_groups]
    sched = DDIMScheduler.from_pretrained(str(TINY_DIR / "scheduler"))
    ac = sched.alphas_cumprod.to(dev, torch.float32)
    snr = ac / (1 - ac)
    weight = torch.clamp(snr, max=args.min_snr) / snr if args.min_snr > 0 else torch.ones_like(snr)

    gen = torch.Generator(dev).manual_seed(args.seed)
    n = lat.shape[0]
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def loss_fn(x0, tok_ids, t, noise, w=None):
        a = ac[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with amp:
            ehs = text(tok_ids)[0]
            pred = unet(xt, t, ehs).sample
        per = ((pred.float() - noise) ** 2).mean(dim=(1, 2, 3))
        return per if w is None else (per * w[t]).mean()

    # fixed validation draws (same noise and timesteps each time)
    vg = torch.Generator(dev).manual_seed(12345)
    vt = torch.randint(0, 1000, (len(vlat),), generator=vg, device=dev)
    vnoise = torch.randn(vlat.shape, generator=vg, device=dev)

    @torch.no_grad()
    def validate():
        text.eval(); unet.eval()
        # evaluate the EMA weights: swap them in
        saved = [p.detach().clone() for p in params]
        for p, e in zip(params, ema_params):
            p.copy_(e)
        per = torch.cat([loss_fn(vlat[i:i + 512], vids_t[i:i + 512], vt[i:i + 512], vnoise[i:i + 512])
                         for i in range(0, len(vlat), 512)])
        for p, s in zip(params, saved):
            p.copy_(s)
        text.train(); unet.train()
        lo, hi = vt < 300, vt >= 700
        return {"mse": per.mean().item(), "mse_t_lt_300": per[lo].mean().item(), "mse_t_ge_700": per[hi].mean().item()}

    info = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "init": "the shipped seeded inits (tiny_build: text seed 1, unet seed 2)",
        "objective": "epsilon prediction, uniform t in [0, 1000), DDIM/SD scaled_linear betas, "
                     f"min-SNR-{args.min_snr} weights, caption dropout {args.drop}",
        "data": {"images": len(lat), "captions_per_image": args.captions, "seed_base": DATA_SEED_BASE,
                 "val_images": len(vlat), "val_seed_base": VAL_SEED_BASE, "generate_s": round(t_gen, 1),
                 "encode_s": round(t_enc, 1)},
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "torch_version": torch.__version__,
        "loss_curve": [], "val_curve": [],
    }

    def save(step, final=False):
        t_s = time.perf_counter()
        ema_unet.eval(); ema_text.eval()
        save_weights(ema_unet, TINY_DIR / "unet" / "diffusion_pytorch_model.safetensors",
                     args.out / "unet" / "diffusion_pytorch_model.safetensors")
        save_weights(ema_text, TINY_DIR / "text_encoder" / "model.safetensors",
                     args.out / "text_encoder" / "model.safetensors")
        info["steps"] = step
        info["train_s"] = round(time.perf_counter() - t_train, 1)
        info["final"] = final
        (args.out / "train_info.json").write_text(json.dumps(info, indent=1))
        log(f"saved EMA weights at step {step} ({time.perf_counter() - t_s:.1f}s)")

    v0 = validate()
    info["val_curve"].append({"step": 0, **v0})
    log(f"val at init: {v0}")
    t_train = time.perf_counter()
    last_save = t_train
    step, run_loss, run_n = 0, 0.0, 0
    while True:
        el = time.perf_counter() - t_train
        frac = el / args.seconds
        if frac >= 1 or (args.max_steps and step >= args.max_steps):
            break
        lr_mult = min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g, b in zip(opt.param_groups, base_lrs):
            g["lr"] = b * lr_mult
        idx = torch.randint(0, n, (args.batch,), generator=gen, device=dev)
        cap = torch.randint(0, args.captions, (args.batch,), generator=gen, device=dev)
        tok_ids = ids_t[idx, cap]
        drop = torch.rand(args.batch, generator=gen, device=dev) < args.drop
        tok_ids = torch.where(drop[:, None], empty[None], tok_ids)
        t = torch.randint(0, 1000, (args.batch,), generator=gen, device=dev)
        noise = torch.randn((args.batch,) + tuple(lat.shape[1:]), generator=gen, device=dev)
        loss = loss_fn(lat[idx], tok_ids, t, noise, weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)
        step += 1
        if step % 50 == 0:
            run_loss += loss.item()
            run_n += 1
        if step % 500 == 0:
            rate = step / (time.perf_counter() - t_train)
            info["loss_curve"].append({"step": step, "loss": round(run_loss / max(run_n, 1), 5),
                                       "lr_mult": round(lr_mult, 4), "t": round(time.perf_counter() - t_train, 1)})
            log(f"step {step} loss {run_loss / max(run_n, 1):.4f} gn {gn.item():.3f} lr x{lr_mult:.3f} "
                f"{rate:.1f} it/s")
            run_loss, run_n = 0.0, 0
        if time.perf_counter() - last_save > args.save_every:
            v = validate()
            info["val_curve"].append({"step": step, **v})
            log(f"val step {step}: {v}")
            save(step)
            last_save = time.perf_counter()
    v = validate()
    info["val_curve"].append({"step": step, **v})
    log(f"val final step {step}: {v}")
    save(step, final=True)
    log("done")


if __name__ == "__main__":
    sys.exit(main())
