"""Refine the embedded `toy` base's VAE decoder on the procedural world, its encoder frozen.

``python -m toyworld.decoder --out DIR`` (meant for one GPU; runs on CPU with small settings).

The shipped VAE was trained by `toyworld.build` on generic shapes only. On the world's scenes it
loses fine parts: Mittens' collar and paws (the evaluator's Mittens rate on its round trips, before and after
this stage: build_info.json "decoder" probes).

This stage trains the decoder, post-quant conv included, on base-training scenes of the world
(`world.batch`: never a reserved instance):

- the encoder and quant conv are frozen, so every latent the UNet was trained on, and every concept
  trained from photos, stays exactly as it was, and so does `scaling_factor`;
- loss: L1 + MSE of decode(encode(x)) (posterior mean) against x;
- AdamW, short warm-up, cosine decay.

It writes:

- DIR/vae: the whole VAE, fp16, a diffusers folder that replaces data/toy/vae;
- DIR/decoder_info.json: settings, loss curve, and `probe` figures. A probe is the evaluator's Mittens
  rate on round trips of the reserved instances, which the training never saw, plus PSNR on held-out
  world scenes, at the start and every `--probe-every` steps.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from toyworld import world
from toyworld.build import TOY_DIR

DATA_SEED_BASE = 900_000_000  # the decoder's world examples (the denoiser's start at 10_000_000)
VAL_SEED_BASE = 990_000_000


def _scenes(job):
    start, n, parts, pairs = job
    return world.batch(range(start, start + n), 1, parts, pairs)[0]


def world_images(n: int, seed_base: int, parts: float, pairs: float, workers: int) -> np.ndarray:
    """n base-training scene images, uint8 [n, 64, 64, 3], drawn on `workers` processes."""
    jobs = [(seed_base + i, min(1000, n - i), parts, pairs) for i in range(0, n, 1000)]
    if workers > 1:
        with mp.get_context("fork").Pool(workers) as pool:
            return np.concatenate(pool.map(_scenes, jobs))
    return np.concatenate([_scenes(j) for j in jobs])


def encoder_digest(vae) -> str:
    """sha256 over the encoder and quant conv tensors (fp16 bytes, by name): what fixes the latent space the
    denoiser was trained in. The refinement must leave it unchanged."""
    h = hashlib.sha256()
    for name, t in sorted(vae.state_dict().items()):
        if name.startswith(("encoder.", "quant_conv.")):
            h.update(name.encode())
            h.update(t.detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()


def _to_x(u8: torch.Tensor) -> torch.Tensor:
    return u8.permute(0, 3, 1, 2).float() / 127.5 - 1


def _to_u8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def probe_images(n: int = 64) -> dict[str, np.ndarray]:
    """The reserved instances the probe round-trips: Mittens alone at each size, and Mittens on the Eames chair."""
    sets = {}
    for size in ("small", "medium", "large"):
        sets[f"mittens_{size}"] = np.stack([world.render_mittens(s, size=size) for s in range(n)])
    sets["mittens_on_eames"] = np.stack([world.render(world.mittens_on_eames(s)) for s in range(n)])
    return sets


@torch.no_grad()
def probe(vae, net, sets: dict[str, np.ndarray], val: torch.Tensor) -> dict:
    """Evaluator rates on round trips of `sets`, and PSNR (dB) of the round trip of `val` (uint8 scenes)."""
    from toyworld import evaluator

    was_training = vae.training
    vae.eval()
    dev = next(vae.parameters()).device
    out = {}
    for name, imgs in sets.items():
        x = _to_x(torch.from_numpy(imgs).to(dev))
        r = evaluator.read(net, list(_to_u8(vae.decode(vae.encode(x).latent_dist.mean).sample)))
        out[name] = round(float((r["mittens"] > 0.5).mean()), 4)
        if name == "mittens_on_eames":
            out["eames_on_eames"] = round(float((r["eames"] > 0.5).mean()), 4)
    x = _to_x(val)
    mse = float(((vae.decode(vae.encode(x).latent_dist.mean).sample - x) ** 2).mean())
    out["val_psnr_db"] = round(10 * math.log10(4.0 / max(mse, 1e-12)), 2)  # images in [-1, 1]: range 2
    vae.train(was_training)
    return out


def refine(vae, images: torch.Tensor, *, steps: int, batch: int, lr: float, warmup: int = 200, seed: int = 0,
           on_step=None) -> list[dict]:
    """Train `vae`'s decoder in place on uint8 `images` [n, 64, 64, 3] (on the VAE's device), the encoder and
    quant conv frozen. `on_step(step)` is called after every step. Returns the loss curve."""
    frozen = list(vae.encoder.parameters()) + list(vae.quant_conv.parameters())
    for p in frozen:
        p.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    dev = images.device
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator(dev).manual_seed(seed)
    vae.train()
    curve, run = [], []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        x = _to_x(images[torch.randint(len(images), (batch,), generator=gen, device=dev)])
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        rec = vae.decode(z).sample
        loss = (rec - x).abs().mean() + ((rec - x) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run.append(loss.item() if step % 10 == 0 else None)
        if (step + 1) % 500 == 0 or step == steps - 1:
            vals = [v for v in run if v is not None]
            curve.append({"step": step + 1, "loss": round(sum(vals) / max(len(vals), 1), 5)})
            run = []
        if on_step:
            on_step(step + 1)
    for p in frozen:
        p.requires_grad_(True)
    return curve


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--vae", type=Path, default=TOY_DIR / "vae", help="the VAE to refine (default: the shipped one)")
    ap.add_argument("--images", type=int, default=80_000)
    ap.add_argument("--parts", type=float, default=0.4, help="share of world.parts_scene cats (as the denoiser's)")
    ap.add_argument("--parts-pairs", type=float, default=0.6)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--probe-every", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    from diffusers import AutoencoderKL

    from toyworld import evaluator

    t0 = time.perf_counter()
    dev = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    args.out.mkdir(parents=True, exist_ok=True)
    imgs = torch.from_numpy(world_images(args.images, DATA_SEED_BASE, args.parts, args.parts_pairs,
                                         args.workers)).to(dev)
    val = torch.from_numpy(world_images(512, VAL_SEED_BASE, args.parts, args.parts_pairs, args.workers)).to(dev)
    t_gen = time.perf_counter() - t0
    print(f"{len(imgs)} world images in {t_gen:.1f}s", flush=True)
    net, sets = evaluator.load(), probe_images()
    vae = AutoencoderKL.from_pretrained(str(args.vae), torch_dtype=torch.float32).to(dev)
    info = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "encoder_digest": encoder_digest(vae),
            "data_seed_base": DATA_SEED_BASE, "generate_s": round(t_gen, 1),
            "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
            "torch_version": torch.__version__, "probes": [{"step": 0, **probe(vae, net, sets, val)}]}
    print(json.dumps(info["probes"][-1]), flush=True)
    t_train = time.perf_counter()

    def on_step(step):
        if step % args.probe_every == 0 or step == args.steps:
            info["probes"].append({"step": step, "train_s": round(time.perf_counter() - t_train, 1),
                                   **probe(vae, net, sets, val)})
            print(json.dumps(info["probes"][-1]), flush=True)
            copy.deepcopy(vae).to("cpu", torch.float16).save_pretrained(str(args.out / "vae"), safe_serialization=True)
            (args.out / "decoder_info.json").write_text(json.dumps(info, indent=1) + "\n")

    info["loss_curve"] = refine(vae, imgs, steps=args.steps, batch=args.batch, lr=args.lr, on_step=on_step)
    if encoder_digest(vae) != info["encoder_digest"]:
        raise RuntimeError("the encoder changed: the denoiser's latents would no longer match")
    info["train_s"] = round(time.perf_counter() - t_train, 1)
    (args.out / "decoder_info.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"done in {info['train_s']}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
