#!/usr/bin/env python
"""Choose the sample registry's two concepts from several training draws of the same recipe (issue 6).

One training run is one draw (bench/spread.py): over 8 draws the README's first render held both identities
and the relation in 0-67% of seeds. The samples are the showcase, so they are picked: every training seed
trains both concepts (the cli.samples recipe: 8 photos, 400 steps, perfusion), every Mittens draw is paired
with every Eames draw, and each pair is scored on a SELECTION set:

  the composition prompts of bench/quality.py, 4 images each (render seed 0), and
  the README prompt "a photo of cat-mittens on chair-eames" as one batch of 24 (render seed 1000).

The pair with the highest success rate there (both identities, background and classes, the relation "on";
ties: both identities, then each concept's identity alone) is the pick. HELD OUT, never used to pick: the
README's first render at pfx render's defaults, seeds 0-11 (what a new user sees), and the composition prompts
at render seed 1. Every pair's figures are kept, so how well selection predicts the held-out set is on record.

  python bench/sample_pick.py train --seed 3 --dir D      # D/<name>-3.safetensors + .json (a file
                                                          # already in D is judged, not retrained)
  python bench/sample_pick.py pairs --mittens 3 --dir D   # D/pairs-3.json (against every Eames draw in D)
  python bench/sample_pick.py pick --dir D                # D/pick.json: the choice and every pair's figures
  python -m cli.samples --from D/pick.json                # publish the picked files as the sample registry

The shipped pick ran on CPU (about 13 min per training seed and 2 min per pair on 2 threads); --device cuda
uses the same code paths as bench/spread.py on a GPU but was not run for this script.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.quality import (
    COMPOSITION,
    FIRST_RUN,
    FIRST_RUN_SEEDS,
    GUIDANCE,
    INSTANCES,
    STEPS,
    first_run_images,
    judge_all,
    machine,
    prompt_specs,
    render_specs,
)
from cli.samples import SAMPLES, write_photos
from perfusion_hub import evaluator
from perfusion_hub.bases import load_base
from perfusion_hub.concept import load_concept
from perfusion_hub.covariance import packaged_covariance
from perfusion_hub.loaders import load_concepts, unload_concepts
from perfusion_hub.render import render
from perfusion_hub.train import TrainConfig, train_concept

MITTENS, EAMES = INSTANCES
SELECT_BATCH, SELECT_SEED = 24, 1000


def _setup(args):
    torch.set_num_threads(args.threads)
    base = load_base("toy", device=args.device, dtype="fp32")
    return base, packaged_covariance(base), evaluator.load().to(args.device)


def cmd_train(args) -> None:
    """Both concepts at one training seed, each judged alone on its 12 new-context prompts."""
    base, cov, net = _setup(args)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (superclass, description) in SAMPLES.items():
            photos = write_photos(Path(tmp) / name, name)
            path = args.dir / f"{name}-{args.seed}.safetensors"
            if path.is_file():  # a draw already here (a cut run, or one taken from a built registry): judge it
                concept, seconds = load_concept(path), None
            else:
                res = train_concept(base, photos, name=name, superclass=superclass, covariance=cov, out_path=path,
                                    config=TrainConfig(steps=args.steps, previews=0, seed=args.seed),
                                    license="CC0-1.0", description=description)
                concept, seconds = res.concept, round(res.seconds, 1)
            load_concepts(base.pipe, [concept], covariance=cov)
            try:
                alone = judge_all(net, prompt_specs(name), render_specs(base, prompt_specs(name), 4))
            finally:
                unload_concepts(base.pipe, [name])
            row = {"seed": args.seed, "steps": concept.training()["steps"], "alone": alone, "train_s": seconds,
                   "machine": machine(args), "torch": torch.__version__}
            (args.dir / f"{name}-{args.seed}.json").write_text(json.dumps(row) + "\n")
            print(json.dumps({name: row}), flush=True)


def _judge_pair(base, net) -> dict:
    batch = render(base, FIRST_RUN["prompt"], seed=SELECT_SEED, count=SELECT_BATCH, steps=STEPS,
                   guidance=GUIDANCE).images
    return {"select": judge_all(net, COMPOSITION + [FIRST_RUN], render_specs(base, COMPOSITION, 4) + [batch]),
            "first_run": judge_all(net, [FIRST_RUN] * FIRST_RUN_SEEDS, first_run_images(base)),
            "composition_seed1": judge_all(net, COMPOSITION, render_specs(base, COMPOSITION, 4, seed=1))}


def cmd_pairs(args) -> None:
    """One Mittens draw against every Eames draw in --dir."""
    base, cov, net = _setup(args)
    mittens = load_concept(args.dir / f"{MITTENS}-{args.mittens}.safetensors")
    rows = []
    for path in sorted(args.dir.glob(f"{EAMES}-*.safetensors")):
        eames_seed = int(path.stem.rsplit("-", 1)[1])
        load_concepts(base.pipe, [mittens, load_concept(path)], covariance=cov)
        try:
            row = {"mittens": args.mittens, "eames": eames_seed, **_judge_pair(base, net)}
        finally:
            unload_concepts(base.pipe)
        print(f"mittens {args.mittens} eames {eames_seed}: select {row['select']['success']:.2f}, "
              f"first run {row['first_run']['success']:.2f}", flush=True)
        rows.append(row)
    (args.dir / f"pairs-{args.mittens}.json").write_text(json.dumps(rows, indent=1) + "\n")


def score(row: dict, alone: dict) -> tuple:
    sel = row["select"]
    return (sel["success"], sel["identity"],
            alone[MITTENS][row["mittens"]]["identity"] + alone[EAMES][row["eames"]]["identity"])


def cmd_pick(args) -> None:
    draws = {p: json.loads(p.read_text()) for p in args.dir.glob("*-*.json") if not p.name.startswith("pairs-")}
    alone = {n: {r["seed"]: r["alone"] for p, r in draws.items() if p.name.startswith(f"{n}-")} for n in INSTANCES}
    pairs = [r for p in sorted(args.dir.glob("pairs-*.json")) for r in json.loads(p.read_text())]
    if not pairs:
        raise SystemExit(f"no pairs-*.json in {args.dir}")
    best = max(pairs, key=lambda r: score(r, alone))
    mean = {k: {m: round(sum(r[k][m] for r in pairs) / len(pairs), 4) for m in ("identity", "success")}
            for k in ("select", "first_run", "composition_seed1")}
    out = {"machines": sorted({r["machine"] for r in draws.values()}),
           "recipe": {"steps": sorted({r["steps"] for r in draws.values()}), "photos": "cli.samples",
                      "method": "perfusion"},
           "select": {"composition_seed0_images": 4 * len(COMPOSITION),
                      "first_run_prompt_batch": {"seed": SELECT_SEED, "images": SELECT_BATCH}},
           "held_out": {"first_run_seeds": FIRST_RUN_SEEDS, "composition_seed": 1},
           "pick": {"mittens_seed": best["mittens"], "eames_seed": best["eames"],
                    "files": {MITTENS: f"{MITTENS}-{best['mittens']}.safetensors",
                              EAMES: f"{EAMES}-{best['eames']}.safetensors"},
                    "alone": {MITTENS: alone[MITTENS][best["mittens"]], EAMES: alone[EAMES][best["eames"]]},
                    **{k: best[k] for k in ("select", "first_run", "composition_seed1")}},
           "mean_over_pairs": mean, "pairs": len(pairs), "alone": alone, "all_pairs": pairs}
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["pick"]), flush=True)
    print(json.dumps({"mean_over_pairs": mean}), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=("train", "pairs", "pick"))
    ap.add_argument("--dir", type=Path, required=True, help="where the draws, their scores and the pairs live")
    ap.add_argument("--seed", type=int, default=0, help="train: the training seed")
    ap.add_argument("--mittens", type=int, default=0, help="pairs: the Mittens draw (its training seed)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="pick: the JSON to write (default DIR/pick.json)")
    args = ap.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    args.out = args.out or args.dir / "pick.json"
    {"train": cmd_train, "pairs": cmd_pairs, "pick": cmd_pick}[args.mode](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
