"""Train the embedded `toy` base's UNet and text encoder into a small text-to-image denoiser.

``python -m toyworld.base_train --out DIR`` (meant for one GPU; runs on CPU with small settings):

1. generates `--images` base-training examples of the procedural world (`toyworld.world`; never a reserved
   instance; with `--parts P` a share P of them are cats with collar and paws, named before the noun, and with
   `--parts-pairs Q` a share Q of those cats are in a relation with a second object) on all
   CPU cores, `--captions` caption variants each, turned into token ids by a word table;
2. encodes them once with the frozen shipped VAE (posterior mean x scaling_factor);
3. trains UNet and text encoder jointly for `--seconds` of wall time, from the seeded inits of
   `toyworld.build` or, with `--init DIR`, from an earlier chunk's output (its EMA weights, which
   become both the model and the EMA; AdamW restarts with a short warm-up, and the learning-rate schedule
   continues over `--total-seconds` from where that chunk stopped; each chunk draws fresh world examples):
   epsilon prediction with the shipped DDIM/SD noise schedule (1000 steps, scaled_linear betas), uniform
   timesteps, min-SNR-gamma loss weighting, 10 % of captions dropped to "" (classifier-free guidance),
   AdamW with warm-up then cosine decay over the time budget, grad-norm clipping, bf16 autocast, and an EMA
   of both models; with `--conflict P`, a share P of captions is encoded as their `world.conflict` copy at
   every position but one noun's, so that the UNet learns to read each object from its noun;
4. every `--save-every` seconds and at the end writes the EMA weights in fp16 under DIR/unet and
   DIR/text_encoder (diffusers/transformers folders, as data/toy holds them), plus DIR/train_info.json
   (settings, loss curve, validation loss on fixed held-out examples, all chunks so far) and the log;
5. with `--evaluator DIR`, renders the evaluator's fixed prompt set with the EMA weights and reports the
   quality figures (`toyworld.evaluator.score_pipeline`).

The time budget (not a step count) sets the length, so a run fits its lease (several chunks make a longer
run); the number of steps reached is recorded in train_info.json.
"""

from __future__ import annotations

import argparse
import copy
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

from toyworld import world
from toyworld.build import TOY_DIR

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
    start, n, k, parts, pairs = args
    imgs, caps = world.batch(range(start, start + n), k, parts, pairs)
    fakes = [[world.conflict(c, np.random.default_rng([start + i, 13, j])) for j, c in enumerate(cs)]
             for i, cs in enumerate(caps)]
    return imgs, caps, fakes


def make_data(n: int, k: int, seed_base: int, workers: int, tokenizer, parts: float = 0.0, pairs: float = 0.0):
    """n images uint8 [n, 64, 64, 3], ids int32 [n, k, 77], and for each caption its `world.conflict` copy's
    ids [n, k, 77] and the token position of the noun that copy keeps true [n, k] (-1: none)."""
    chunk = 500
    jobs = [(seed_base + i, min(chunk, n - i), k, parts, pairs) for i in range(0, n, chunk)]
    if workers > 1:
        with mp.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_gen_chunk, jobs)
    else:
        parts = [_gen_chunk(j) for j in jobs]
    imgs = np.concatenate([p[0] for p in parts])
    caps = [c for p in parts for c in p[1]]
    fakes = [f for p in parts for f in p[2]]
    to_ids = world.CaptionIds(tokenizer)
    ids = np.stack([np.stack([to_ids(c) for c in cs]) for cs in caps])
    fake_ids = np.stack([np.stack([to_ids(t) for t, _ in fs]) for fs in fakes])
    noun_pos = np.array([[j + 1 if j >= 0 else -1 for _, j in fs] for fs in fakes], np.int64)  # +1: bos
    return imgs, ids, fake_ids, noun_pos


@torch.no_grad()
def encode_latents(vae, imgs: np.ndarray, device, bs: int = 1024) -> torch.Tensor:
    out = []
    sf = vae.config.scaling_factor
    for i in range(0, len(imgs), bs):
        x = torch.from_numpy(imgs[i:i + bs]).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
        out.append(vae.encode(x).latent_dist.mean * sf)
    return torch.cat(out)


def save_model(model, folder: Path) -> None:
    """Write an fp16 copy of `model` as a diffusers/transformers folder (atomically replaced)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    copy.deepcopy(model).to("cpu", torch.float16).save_pretrained(str(tmp), safe_serialization=True)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def main(argv=None) -> None:
    global LOG_FILE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--init", type=Path, help="continue from this earlier chunk's output folder")
    ap.add_argument("--images", type=int, default=200_000)
    ap.add_argument("--captions", type=int, default=3, help="caption variants per image")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--seconds", type=float, default=420.0, help="this chunk's training wall-time budget")
    ap.add_argument("--total-seconds", type=float, default=0.0,
                    help="training time of all chunks, for the learning-rate schedule (default: --seconds)")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps too (0: no limit)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-text", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--min-snr", type=float, default=5.0)
    ap.add_argument("--drop", type=float, default=0.1, help="caption dropout to the empty prompt")
    ap.add_argument("--conflict", type=float, default=0.0,
                    help="share of captions whose encoding is that of their world.conflict copy at every position "
                         "but one noun's (the UNet learns to read an object from its noun)")
    ap.add_argument("--parts", type=float, default=0.0,
                    help="share of examples that are world.parts_scene cats, parts named before the noun")
    ap.add_argument("--parts-pairs", type=float, default=0.0,
                    help="share of those parts scenes that pair the cat with a second object in a relation")
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--save-every", type=float, default=120.0)
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet (falls back to eager on error)")
    ap.add_argument("--evaluator", type=Path, help="score the result with this evaluator folder")
    ap.add_argument("--quality-prompts", type=int, default=200)
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

    from toyworld import build as toy_build

    prev = json.loads((args.init / "train_info.json").read_text("utf-8")) if args.init else None
    chunk = len(prev["chunks"]) if prev else 0
    done_s = sum(c["train_s"] for c in prev["chunks"]) if prev else 0.0
    done_steps = prev["steps"] if prev else 0
    total_s = args.total_seconds or (done_s + args.seconds)
    seed_base = DATA_SEED_BASE + chunk * args.images

    log(f"torch {torch.__version__} device {dev} ({torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}); "
        f"chunk {chunk}, {done_steps} steps / {done_s:.0f}s done before")
    tok = CLIPTokenizer.from_pretrained(str(TOY_DIR / "tokenizer"))
    t_gen = time.perf_counter()
    imgs, ids, fake_ids, noun_pos = make_data(args.images, args.captions, seed_base, args.workers, tok, args.parts,
                                               args.parts_pairs)
    vimgs, vids, _, _ = make_data(args.val, 1, VAL_SEED_BASE, args.workers, tok)
    t_gen = time.perf_counter() - t_gen
    log(f"generated {len(imgs)} + {len(vimgs)} images x {args.captions} captions in {t_gen:.1f}s")

    vae = AutoencoderKL.from_pretrained(str(TOY_DIR / "vae"), torch_dtype=torch.float32).to(dev).eval()
    t_enc = time.perf_counter()
    lat = encode_latents(vae, imgs, dev)
    vlat = encode_latents(vae, vimgs, dev)
    t_enc = time.perf_counter() - t_enc
    del imgs
    log(f"latents {tuple(lat.shape)} std {lat.std().item():.3f} mean {lat.mean().item():.3f} in {t_enc:.1f}s")
    ids_t = torch.from_numpy(ids).long().to(dev)
    fake_t = torch.from_numpy(fake_ids).long().to(dev)
    noun_t = torch.from_numpy(noun_pos).to(dev)
    positions = torch.arange(ids.shape[-1], device=dev)
    vids_t = torch.from_numpy(vids[:, 0]).long().to(dev)
    empty = torch.tensor(tok("", padding="max_length", max_length=77).input_ids, device=dev)

    if args.init:
        unet = UNet2DConditionModel.from_pretrained(str(args.init / "unet"), torch_dtype=torch.float32)
        text = CLIPTextModel.from_pretrained(str(args.init / "text_encoder"), torch_dtype=torch.float32)
    else:
        unet, text = toy_build.build_unet(), toy_build.build_text_encoder(tok)
    unet, text = unet.float().to(dev).train(), text.float().to(dev).train()
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
    params = list(unet.parameters()) + list(text.parameters())
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    log(f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params, text "
        f"{sum(p.numel() for p in text.parameters()) / 1e6:.2f}M")
    fused = dev.type == "cuda"
    opt = torch.optim.AdamW([{"params": list(unet.parameters()), "lr": args.lr},
                             {"params": list(text.parameters()), "lr": args.lr_text}],
                            betas=(0.9, 0.99), weight_decay=0.01, fused=fused)
    base_lrs = [g["lr"] for g in opt.param_groups]
    sched = DDIMScheduler.from_pretrained(str(TOY_DIR / "scheduler"))
    ac = sched.alphas_cumprod.to(dev, torch.float32)
    snr = ac / (1 - ac)
    weight = torch.clamp(snr, max=args.min_snr) / snr if args.min_snr > 0 else torch.ones_like(snr)

    gen = torch.Generator(dev).manual_seed(args.seed + chunk)
    n = lat.shape[0]
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    unet_fwd = unet
    if args.compile:
        unet_fwd = torch.compile(unet)

    def loss_fn(x0, tok_ids, t, noise, w=None, net=unet, encoder=text, fake=None, keep=None):
        a = ac[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with amp:
            if fake is None:
                ehs = encoder(tok_ids)[0]
            else:  # the conflict copy's encoding, but where `keep` is set
                both = encoder(torch.cat([tok_ids, fake]))[0]
                ehs = torch.where(keep[..., None], both[: len(tok_ids)], both[len(tok_ids):])
            pred = net(xt, t, ehs).sample
        per = ((pred.float() - noise) ** 2).mean(dim=(1, 2, 3))
        return per if w is None else (per * w[t]).mean()

    # fixed validation draws (same noise and timesteps each time)
    vg = torch.Generator(dev).manual_seed(12345)
    vt = torch.randint(0, 1000, (len(vlat),), generator=vg, device=dev)
    vnoise = torch.randn(vlat.shape, generator=vg, device=dev)

    @torch.no_grad()
    def validate():  # the EMA weights, as they ship
        per = torch.cat([loss_fn(vlat[i:i + 512], vids_t[i:i + 512], vt[i:i + 512], vnoise[i:i + 512],
                                 net=ema_unet, encoder=ema_text) for i in range(0, len(vlat), 512)])
        lo, hi = vt < 300, vt >= 700
        return {"mse": per.mean().item(), "mse_t_lt_300": per[lo].mean().item(), "mse_t_ge_700": per[hi].mean().item()}

    info = prev or {"loss_curve": [], "val_curve": [], "chunks": []}
    info.update({
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "init": "seeded inits of toyworld.build (text seed 1, unet seed 2), then each chunk continues "
                "from the previous chunk's EMA weights",
        "objective": "epsilon prediction, uniform t in [0, 1000), DDIM/SD scaled_linear betas, "
                     f"min-SNR-{args.min_snr} weights, caption dropout {args.drop}"
                     + (f", {args.conflict:g} of captions read from their noun (world.conflict)"
                        if args.conflict else "")
                     + (f", {args.parts:g} of examples world.parts_scene cats" if args.parts else "")
                     + (f" ({args.parts_pairs:g} of them paired with a second object)" if args.parts_pairs else ""),
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "torch_version": torch.__version__,
    })
    this = {"chunk": chunk, "images": len(lat), "captions_per_image": args.captions, "seed_base": seed_base,
            "conflict": args.conflict, "parts": args.parts, "parts_pairs": args.parts_pairs,
            "generate_s": round(t_gen, 1), "encode_s": round(t_enc, 1), "compile": bool(args.compile)}
    info["chunks"].append(this)

    def save(step, final=False):
        t_s = time.perf_counter()
        save_model(ema_unet, args.out / "unet")
        save_model(ema_text, args.out / "text_encoder")
        this.update(steps=step, train_s=round(time.perf_counter() - t_train, 1), final=final)
        info["steps"] = done_steps + step
        (args.out / "train_info.json").write_text(json.dumps(info, indent=1))
        log(f"saved EMA weights at step {done_steps + step} ({time.perf_counter() - t_s:.1f}s)")

    v0 = validate()
    log(f"val at start: {v0}")
    if not prev:
        info["val_curve"].append({"step": 0, **v0})
    t_train = time.perf_counter()
    last_save = t_train
    step, run_loss, run_n = 0, 0.0, 0
    warm = args.warmup if not prev else min(args.warmup, 200)
    while True:
        el = time.perf_counter() - t_train
        if el >= args.seconds or (args.max_steps and step >= args.max_steps):
            break
        frac = min(1.0, (done_s + el) / total_s)
        lr_mult = min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g, b in zip(opt.param_groups, base_lrs):
            g["lr"] = b * lr_mult
        idx = torch.randint(0, n, (args.batch,), generator=gen, device=dev)
        cap = torch.randint(0, args.captions, (args.batch,), generator=gen, device=dev)
        tok_ids = ids_t[idx, cap]
        drop = torch.rand(args.batch, generator=gen, device=dev) < args.drop
        tok_ids = torch.where(drop[:, None], empty[None], tok_ids)
        fake = keep = None
        if args.conflict > 0:
            nouns = noun_t[idx, cap]
            use = (torch.rand(args.batch, generator=gen, device=dev) < args.conflict) & ~drop & (nouns >= 0)
            fake = torch.where(use[:, None], fake_t[idx, cap], tok_ids)
            keep = ~use[:, None] | (positions[None] == nouns[:, None])
        t = torch.randint(0, 1000, (args.batch,), generator=gen, device=dev)
        noise = torch.randn((args.batch,) + tuple(lat.shape[1:]), generator=gen, device=dev)
        try:
            loss = loss_fn(lat[idx], tok_ids, t, noise, weight, net=unet_fwd, fake=fake, keep=keep)
        except Exception as e:  # a failed compile: go on eagerly
            if unet_fwd is unet:
                raise
            log(f"compile failed ({type(e).__name__}: {str(e)[:200]}); training eagerly")
            unet_fwd, this["compile"] = unet, False
            loss = loss_fn(lat[idx], tok_ids, t, noise, weight, fake=fake, keep=keep)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + done_steps + step) / (10 + done_steps + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)
        step += 1
        if step % 50 == 0:
            run_loss += loss.item()
            run_n += 1
        if step % 500 == 0:
            rate = step / (time.perf_counter() - t_train)
            info["loss_curve"].append({"step": done_steps + step, "loss": round(run_loss / max(run_n, 1), 5),
                                       "lr_mult": round(lr_mult, 4),
                                       "t": round(done_s + time.perf_counter() - t_train, 1)})
            log(f"step {done_steps + step} loss {run_loss / max(run_n, 1):.4f} gn {gn.item():.3f} "
                f"lr x{lr_mult:.3f} {rate:.1f} it/s")
            run_loss, run_n = 0.0, 0
        if time.perf_counter() - last_save > args.save_every:
            v = validate()
            info["val_curve"].append({"step": done_steps + step, **v})
            log(f"val step {done_steps + step}: {v}")
            save(step)
            last_save = time.perf_counter()
    v = validate()
    info["val_curve"].append({"step": done_steps + step, **v})
    log(f"val final step {done_steps + step}: {v}")
    save(step, final=True)
    this["steps_per_s"] = round(step / max(this["train_s"], 1e-9), 2)
    if args.evaluator:
        info["quality"] = quality(args.evaluator, vae, ema_unet, ema_text, tok, sched, dev, args.quality_prompts)
        info["quality"]["at_step"] = done_steps + step
        log(f"quality: {json.dumps(info['quality'])}")
    (args.out / "train_info.json").write_text(json.dumps(info, indent=1))
    log("done")


def quality(evaluator_dir: Path, vae, unet, text, tok, sched, dev, n_prompts: int) -> dict:
    """The evaluator's prompt-set figures for these weights (2 seeds; guidance 7.5 and 4)."""
    from diffusers import StableDiffusionPipeline

    from toyworld import evaluator

    t0 = time.perf_counter()
    net = evaluator.load(evaluator_dir, device=str(dev))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    specs = evaluator.prompt_set(n_prompts)
    out = {f"guidance_{g}": evaluator.score_pipeline(pipe, net, specs, seeds=(0, 1), guidance=g, batch=100)
           for g in (7.5, 4.0)}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


if __name__ == "__main__":
    sys.exit(main())
