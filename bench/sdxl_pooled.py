#!/usr/bin/env python
"""SDXL's pooled embedding under Perfusion: which policy, measured on a small SDXL-shaped base (issue 20). CPU.

SDXL's UNet also reads the pooled (projected) OpenCLIP-bigG embedding of the prompt, through `add_embedding` into the
time embedding of every ResNet block: a global, ungated input. Two policies are compared:

  superclass  (pfx's choice) the pooled vector is that of the prompt with each concept token replaced by its
              superclass word, in training and rendering; the concept acts only through its gated K/V edit
              (key-locking extended to the pooled input). No gradient reaches the embeddings through it.
  concept     the pooled vector is the concept prompt's own ("allowed to move"): in training the gradient also flows
              through the pooled path into token_embedding_2.

The base is bench/engine.py's SDXL-shaped toy (the data/sdxl configs shrunk: text encoders 64 + 96 wide, 32-d
pooled projection, UNet widths 32/64 with transformer depths (1, 2), 32x32 images), random weights, seeded. For each
policy a concept is trained from 8 synthetic photos (default recipe rates and gates, `--steps` steps of batch
`--batch`), then measured:

  pooled_shift     ||p(concept prompt) - p(superclass prompt)|| / ||p(superclass prompt)|| over 12 prompts (the 9
                   training templates + 3 scene prompts): how far the pooled vector moves when allowed to
  pooled_share     ||eps(ctx_c, p_c) - eps(ctx_c, p_s)|| / ||eps(ctx_c, p_s) - eps(ctx_s, p_s)||: the pooled path's
                   effect on the UNet's prediction next to the effect of the concept's context and gated edit (noised
                   training latents at t = 200, 500, 800, 4 noise seeds, the 12 prompts)
  loss             the final training loss (mean of the last 10 steps), and the denoising loss on the training photos
                   with fixed noise and timesteps under each policy's own pooled vector
  embedding_drift  ||token_embedding_2 - its superclass init|| (what the bigG embedding learned)

Random weights say nothing about image quality; what they show is the size of the pathways the policy opens.
Results: bench/results/sdxl-pooled-policy-<date>.json; bench/README.md, "SDXL pooled embedding policy".

  python -m bench.sdxl_pooled                 # ~2-4 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

EVAL_PROMPTS = ("a photo of {} on a table", "{} in a garden", "a painting of {} next to a chair")


def log(*a):
    print(*a, flush=True)


def photos(folder: Path, n: int, size: int) -> Path:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", (size + 4 * i, size), (30 + 20 * i, 90, 200))
        d = ImageDraw.Draw(im)
        r = size // 4
        x = size // 4 + i
        d.ellipse((x, r, x + 2 * r, 3 * r), fill=(250, 140, 20))
        im.save(folder / f"p{i}.png")
    return folder


def train(base, cov, folder, policy: str, steps: int, batch: int, out: Path):
    """Train one concept under `policy`; the "concept" policy swaps the trainer's fixed superclass pooled vectors for
    the concept templates' own, recomputed with gradient in every micro-batch (the trainer's embedding hooks are
    active, so the gradient reaches token_embedding_2 through the pooled path too)."""
    from perfusion_hub import train as train_mod
    from perfusion_hub.text import TextEncoders

    cfg = train_mod.TrainConfig(steps=steps, batch_size=batch, previews=0)
    original = train_mod.denoising_loss
    if policy == "concept":
        text = TextEncoders.of(base.pipe)
        ids = []  # tokenized once the trainer has added the concept token

        def moving(unet_fn, sched, data, now, sl, ehs, noise, eps, dtype, channels_last=False):
            if not ids:
                ids.extend(text.tokenize([t.format("<bench-cat>") for t in train_mod.TEMPLATES], base.device))
            pooled = text.pooled_of(ids).to(dtype)
            return original(unet_fn, sched, dataclasses.replace(data, pooled=pooled), now, sl, ehs, noise, eps,
                            dtype, channels_last)

        train_mod.denoising_loss = moving
    try:
        return train_mod.train_concept(base, folder, name="bench-cat", superclass="cat", covariance=cov, out_path=out,
                                       config=cfg)
    finally:
        train_mod.denoising_loss = original


@torch.no_grad()
def measure(base, cov, res, folder) -> dict:
    from perfusion_hub.loaders import load_concepts, runtime_of, unload_concepts
    from perfusion_hub.text import TextEncoders, time_ids
    from perfusion_hub.train import TEMPLATES, TrainConfig, prepare_training

    pipe, c = base.pipe, res.concept
    load_concepts(pipe, [c], covariance=cov)
    rt = runtime_of(pipe)
    pipe._pfx_pooled.remove()  # measure both pooled vectors: the policy hook would replace the concept prompt's
    try:
        text = TextEncoders.of(pipe)
        prompts = [t.format("{}") for t in TEMPLATES] + list(EVAL_PROMPTS)
        with_c = text.tokenize([p.format(c.trigger) for p in prompts])
        with_s = text.tokenize([p.format(c.superclass) for p in prompts])
        ctx_c, p_c = text.encode(with_c, with_pooled=True)
        ctx_s, p_s = text.encode(with_s, with_pooled=True)
        shift = ((p_c - p_s).norm(dim=-1) / p_s.norm(dim=-1)).tolist()
        cos = torch.nn.functional.cosine_similarity(p_c, p_s, dim=-1).tolist()
        data = prepare_training(base, folder, "cat", TrainConfig(steps=1, batch_size=1, templates=TEMPLATES),
                                lambda m: None)
        latents = data.mean[:4]
        n = len(prompts)
        shares, share_num, share_den = [], [], []
        tids = time_ids(base.resolution, n, base.device)
        for t in (200, 500, 800):
            for seed in range(4):
                g = torch.Generator().manual_seed(seed)
                x0 = latents[seed % latents.shape[0]].expand(n, -1, -1, -1)
                noise = torch.randn(x0.shape, generator=g)
                ts = torch.full((n,), t)
                xt = pipe.scheduler.add_noise(x0, noise, ts)

                def eps(ctx, pooled, names, xt=xt, ts=ts):
                    rt.activate(names)
                    out = pipe.unet(xt, ts, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": tids}).sample
                    rt.activate(None)
                    return out

                cc, cs, ss = eps(ctx_c, p_c, [c.name]), eps(ctx_c, p_s, [c.name]), eps(ctx_s, p_s, [])
                num, den = (cc - cs).flatten(1).norm(dim=1), (cs - ss).flatten(1).norm(dim=1)
                shares += (num / den).tolist()
                share_num.append(float(num.mean()))
                share_den.append(float(den.mean()))
        # denoising loss on the training photos, fixed noise and timesteps, with this concept's own pooled policy
        g = torch.Generator().manual_seed(123)
        lat = data.mean
        k = lat.shape[0]
        noise = torch.randn(lat.shape, generator=g)
        ts = torch.linspace(50, 950, k).long()
        xt = pipe.scheduler.add_noise(lat, noise, ts)
        losses = {}
        for policy, pooled in (("superclass", p_s[:1]), ("concept", p_c[:1])):
            rt.activate([c.name])
            pred = pipe.unet(xt, ts, ctx_c[:1].expand(k, -1, -1), added_cond_kwargs={
                "text_embeds": pooled.expand(k, -1), "time_ids": time_ids(base.resolution, k, base.device)}).sample
            rt.activate(None)
            losses[policy] = float(((pred - noise) ** 2).mean())
        sup_id = text.word_ids("cat")[1]
        init = pipe.text_encoder_2.get_input_embeddings().weight[sup_id]
        drift = float((c.extra_embeddings["token_embedding_2"] - init).norm() / init.norm())
        drift1 = float((c.token_embedding - pipe.text_encoder.get_input_embeddings().weight[text.word_ids("cat")[0]])
                       .norm() / c.token_embedding.norm())
    finally:
        unload_concepts(pipe)
    return {
        "pooled_shift_median": round(statistics.median(shift), 4), "pooled_shift_max": round(max(shift), 4),
        "pooled_cosine_median": round(statistics.median(cos), 5),
        "pooled_share_median": round(statistics.median(shares), 4),
        "pooled_effect_mean": round(statistics.mean(share_num), 5),
        "concept_effect_mean": round(statistics.mean(share_den), 5),
        "final_train_loss": round(statistics.mean(res.losses[-10:]), 5),
        "photo_loss_with_superclass_pooled": round(losses["superclass"], 5),
        "photo_loss_with_concept_pooled": round(losses["concept"], 5),
        "embedding_2_drift_rel": round(drift, 4), "embedding_1_drift_rel": round(drift1, 4),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    from bench.engine import build_base, covariance

    t0 = time.perf_counter()
    out = {"date": date.today().isoformat(), "torch": torch.__version__, "device": "cpu",
           "base": "bench/engine.py --arch sdxl --toy (random weights, seed 0)", "steps": args.steps,
           "batch": args.batch, "photos": 8, "policies": {}}
    path = Path(args.out) / f"sdxl-pooled-policy-{date.today().isoformat()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    base = build_base(True, "cpu", torch.float32, "sdxl")
    cov = covariance(base, 512)
    with tempfile.TemporaryDirectory() as tmp:
        folder = photos(Path(tmp) / "photos", 8, base.resolution)
        for policy in ("superclass", "concept"):
            t = time.perf_counter()
            res = train(base, cov, folder, policy, args.steps, args.batch, Path(tmp) / f"{policy}.safetensors")
            out["policies"][policy] = dict(measure(base, cov, res, folder), train_s=round(time.perf_counter() - t, 1))
            log(policy, json.dumps(out["policies"][policy]))
            path.write_text(json.dumps(out, indent=2))
    out["seconds"] = round(time.perf_counter() - t0, 1)
    path.write_text(json.dumps(out, indent=2))
    log(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
