#!/usr/bin/env python
"""How far apart Perfusion training runs land on the embedded `toy` base: the same recipe, photos and prompts as
toyworld/quality.py, one perfusion concept per instance and training seed (the seed draws the noise, timesteps,
templates and flips), judged on the instance's 12 new-context prompts and, with both concepts of a seed loaded,
on the composition prompts and the README's first render (seeds 0-11). One run of toyworld/quality.py is one
draw from this spread.

  python -m toyworld.experiments.spread --seeds 0,1,2                                  # bench/results/spread-toy-<date>.json
  python -m toyworld.experiments.spread --base toy,DIR --device cuda --seeds 0,1,2     # several candidate bases, on a GPU
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
import torch

from perfusion_hub.bases import load_base
from perfusion_hub.train import TrainConfig, train_concept
from toyworld import RESULTS, evaluator
from toyworld.quality import (
    COMPOSITION,
    FIRST_RUN,
    FIRST_RUN_SEEDS,
    GUIDANCE,
    INSTANCES,
    STEPS,
    Method,
    covariance_of,
    first_run_images,
    judge_all,
    machine,
    prompt_specs,
    render_specs,
)
from toyworld.samples import PHOTO_SIZES, PHOTOS, write_photos

KEYS = ("identity", "alignment", "relation", "identity_and_alignment", "success")


def summary(rows: list[dict]) -> dict:
    return {k: {"mean": round(float(np.mean([r[k] for r in rows])), 4), "min": min(r[k] for r in rows),
                "max": max(r[k] for r in rows)} for k in KEYS if all(r.get(k) is not None for r in rows)}


def measure(value: str, seeds: list[int], args, net, tmp: Path, out: dict, dump) -> None:
    base = load_base(value, device=args.device, dtype="fp32")
    cov = covariance_of(base)
    out.update({"base": value, "base_digest": base.digest, "runs": []})
    for seed in seeds:
        run: dict = {"seed": seed}
        trained: list[Method] = []
        for name, (cls, _) in INSTANCES.items():
            photos = write_photos(tmp / name, name, args.photos, args.photo_sizes.get(name))
            cfg = TrainConfig(steps=args.steps, method="perfusion", previews=0, seed=seed)
            res = train_concept(base, photos, name=name, superclass=cls, covariance=cov,
                                out_path=tmp / f"{name}-{seed}.safetensors", config=cfg)
            meth = Method("perfusion", res)
            meth.load(base, cov)
            try:
                run[name] = judge_all(net, prompt_specs(name), render_specs(base, prompt_specs(name), args.images))
            finally:
                meth.unload(base)
            trained.append(meth)
        for meth in trained:
            meth.load(base, cov)
        try:
            run["composition"] = judge_all(net, COMPOSITION, render_specs(base, COMPOSITION, args.images))
            run["first_run"] = judge_all(net, [FIRST_RUN] * FIRST_RUN_SEEDS, first_run_images(base))
        finally:
            for meth in trained:
                meth.unload(base)
        print(value, run, flush=True)
        out["runs"].append(run)
        out["summary"] = {k: summary([r[k] for r in out["runs"]]) for k in (*INSTANCES, "composition", "first_run")}
        dump()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--base", default="toy", help="comma-separated: the embedded toy base and/or candidate folders")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--photos", type=int, default=PHOTOS)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--photo-sizes", action="append", default=[], metavar="NAME=SIZE,...",
                    help="one instance's photo object sizes, cycled (e.g. cat-mittens=small,medium,large; default: "
                         "toyworld.samples.PHOTO_SIZES; an empty list, cat-mittens=, is the world's own draw)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    args.photo_sizes = {n: tuple(v.split(",")) if v else () for n, v in (a.split("=", 1) for a in args.photo_sizes)}
    net = evaluator.load().to(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"spread-toy-{date.today().isoformat()}.json"
    results = {"date": date.today().isoformat(), "machine": machine(args), "torch": torch.__version__,
               "recipe": {"steps": args.steps, "photos": args.photos, "method": "perfusion",
                          "photo_sizes": PHOTO_SIZES | args.photo_sizes},
               "render": {"steps": STEPS, "guidance": GUIDANCE, "images_per_prompt": args.images}, "bases": []}
    with tempfile.TemporaryDirectory() as tmp:
        for value in args.base.split(","):
            results["bases"].append({})
            measure(value, seeds, args, net, Path(tmp), results["bases"][-1],
                    lambda: path.write_text(json.dumps(results, indent=1) + "\n"))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
