#!/usr/bin/env python
"""Choose the sample registry's two concepts from several training draws of the same recipe (issue 6).

One training run is one draw (toyworld/experiments/spread.py): over 8 draws the README's first render held both identities
and the relation in 0-67% of seeds. The samples are the showcase, so they are picked: every training seed
trains both concepts (the toyworld.samples recipe: 8 photos, 400 steps, perfusion), and every Mittens draw is
paired with every Eames draw. A pair's success = both identities, background and classes, and the relation
"on". Three stages, each on images the others never saw:

  1 screen   every pair: the composition prompts of toyworld/quality.py x4 (render seed 0) and the README prompt
             "a photo of cat-mittens on chair-eames" as one batch of 24 (render seed 1000): 48 images
  2 confirm  the best --top pairs of the screen and --random others: the same set at render seeds 2 and 3
             (SELECT, 144 images with the screen's), then the HELD-OUT sets: the README's first render at pfx
             render's defaults, seeds 0-11 (what a new user sees), and the composition prompts at render seed 1
  3 readme   the confirmed pairs: the README prompt alone, 12 batches of 24 (render seeds 2000-2011)

The pick is the best pair by stage 3's success (then SELECT's, then both identities, then each concept's
identity alone). The held-out sets are never used to pick; every finalist's figures are kept, so how well
each stage predicts them is on record (pick.json's "correlation").

  python -m toyworld.experiments.sample_pick train --seed 3 --dir D      # D/<name>-3.safetensors + .json (a file
                                                          # already in D is judged, not retrained)
  python -m toyworld.experiments.sample_pick screen --mittens 3 --dir D  # D/screen-3.json (against every Eames draw in D)
  python -m toyworld.experiments.sample_pick confirm --dir D             # D/pairs-0.json (--shard i --shards n: a part)
  python -m toyworld.experiments.sample_pick readme --dir D              # D/readme-0.json (sharded the same way)
  python -m toyworld.experiments.sample_pick pick --dir D                # D/pick.json: the choice and every finalist's figures
  python -m toyworld.experiments.sample_pick sheet --dir D --pairs 12:7  # D/first-run.png: seeds 0-11, the words, each pair
  python -m toyworld.samples --from D/pick.json                # publish the picked files as the sample registry

toyworld/experiments/gpu_pick.sh runs stages 1-3 and the pick on the lent GPU, one process per draw or shard (16 draws:
about 7 minutes on an H200). On CPU a training seed takes about 13 min and a screened pair 1 min (2 threads).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from perfusion_hub.bases import load_base
from perfusion_hub.concept import load_concept
from perfusion_hub.covariance import packaged_covariance
from perfusion_hub.loaders import load_concepts, unload_concepts
from perfusion_hub.render import render
from perfusion_hub.train import TrainConfig, train_concept
from toyworld import evaluator
from toyworld.quality import (
    COMPOSITION,
    FIRST_RUN,
    FIRST_RUN_SEEDS,
    GUIDANCE,
    INSTANCES,
    STEPS,
    contact_sheet,
    first_run_images,
    judge_all,
    machine,
    prompt_specs,
    render_specs,
)
from toyworld.samples import SAMPLES, write_photos

MITTENS, EAMES = INSTANCES
SELECT_BATCH, SELECT_SEED, README_SEED = 24, 1000, 2000


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


def _readme_batch(base, seed: int) -> list:
    """SELECT_BATCH images of the README prompt from one render seed."""
    return render(base, FIRST_RUN["prompt"], seed=seed, count=SELECT_BATCH, steps=STEPS, guidance=GUIDANCE).images


def _select(base, net, seed: int) -> dict:
    """The selection set at one render seed: the composition prompts x4, and the README prompt as a batch."""
    return judge_all(net, COMPOSITION + [FIRST_RUN],
                     render_specs(base, COMPOSITION, 4, seed=seed) + [_readme_batch(base, SELECT_SEED + seed)])


def _merge(rates: list[dict]) -> dict:
    """judge_all rates over several image sets, as if judged at once (weighted by each set's n)."""
    n = sum(r["n"] for r in rates)
    return {**{k: round(sum(r[k] * r["n"] for r in rates) / n, 4) for k in rates[0] if k != "n"}, "n": n}


@contextmanager
def _pair_loaded(args, base, cov, m, e):
    """Mittens draw m and Eames draw e of --dir in the pipeline, for the block."""
    load_concepts(base.pipe, [load_concept(args.dir / f"{MITTENS}-{m}.safetensors"),
                              load_concept(args.dir / f"{EAMES}-{e}.safetensors")], covariance=cov)
    try:
        yield
    finally:
        unload_concepts(base.pipe)


def _pair_rows(args, base, cov, net, pairs, judge) -> list[dict]:
    rows = []
    for m, e in pairs:
        with _pair_loaded(args, base, cov, m, e):
            rows.append({"mittens": m, "eames": e, **judge(m, e)})
        print(f"mittens {m} eames {e}: " + ", ".join(f"{k} {v['success']:.2f}" for k, v in rows[-1].items()
                                                     if isinstance(v, dict)), flush=True)
    return rows


def _seeds(args, name: str) -> list[int]:
    return sorted(int(p.stem.rsplit("-", 1)[1]) for p in args.dir.glob(f"{name}-*.safetensors"))


def cmd_screen(args) -> None:
    """Stage 1: one Mittens draw against every Eames draw in --dir, on the selection set at render seed 0."""
    base, cov, net = _setup(args)
    rows = _pair_rows(args, base, cov, net, [(args.mittens, e) for e in _seeds(args, EAMES)],
                      lambda m, e: {"select": _select(base, net, 0)})
    (args.dir / f"screen-{args.mittens}.json").write_text(json.dumps(rows, indent=1) + "\n")


def _draws(args) -> dict:
    """Each concept's draws in --dir: {name: {training seed: the draw's JSON}}."""
    return {n: {(r := json.loads(p.read_text()))["seed"]: r for p in args.dir.glob(f"{n}-*.json")} for n in INSTANCES}


def _alone(draws: dict) -> dict:
    return {n: {seed: r["alone"] for seed, r in by_seed.items()} for n, by_seed in draws.items()}


def score(row: dict, alone: dict) -> tuple:
    """Best first: the README prompt's success where stage 3 measured it, then the selection set's, then
    both identities there, then each concept's identity alone."""
    sel = row["select"]
    return (row["readme"]["success"] if "readme" in row else 0, sel["success"], sel["identity"],
            alone[MITTENS][row["mittens"]]["identity"] + alone[EAMES][row["eames"]]["identity"])


def _rows(args, stage: str) -> list[dict]:
    """Every row a stage wrote into --dir (stage: "screen", "pairs" or "readme")."""
    rows = [r for p in sorted(args.dir.glob(f"{stage}-*.json")) for r in json.loads(p.read_text())]
    if not rows:
        raise SystemExit(f"no {stage}-*.json in {args.dir}")
    return rows


def finalists(args) -> list[dict]:
    """The screened pairs that go on: the best --top by score, and --random of the others (rng seed 0), so that
    how selection predicts the held-out sets is also measured away from the top."""
    alone = _alone(_draws(args))
    rows = sorted(_rows(args, "screen"), key=lambda r: score(r, alone), reverse=True)
    rest = rows[args.top:]
    picks = np.random.default_rng(0).choice(len(rest), size=min(args.random, len(rest)), replace=False)
    return rows[:args.top] + [rest[i] for i in sorted(picks)]


def cmd_confirm(args) -> None:
    """Stage 2, one shard of the finalists: more selection images (--select-seeds), then the held-out sets."""
    base, cov, net = _setup(args)
    mine = finalists(args)[args.shard::args.shards]
    screen = {(r["mittens"], r["eames"]): r["select"] for r in mine}

    def judge(m, e):
        first = screen[(m, e)]
        return {"screen": first, "select": _merge([first, *(_select(base, net, s) for s in args.select_seeds)]),
                "first_run": judge_all(net, [FIRST_RUN] * FIRST_RUN_SEEDS, first_run_images(base)),
                "composition_seed1": judge_all(net, COMPOSITION, render_specs(base, COMPOSITION, 4, seed=1))}

    rows = _pair_rows(args, base, cov, net, list(screen), judge)
    (args.dir / f"pairs-{args.shard}.json").write_text(json.dumps(rows, indent=1) + "\n")


def cmd_readme(args) -> None:
    """Stage 3, one shard of the confirmed pairs: the README prompt alone, --batches batches of SELECT_BATCH at
    render seeds 2000, 2001, ... (pfx render's own seeds 0-11 stay held out)."""
    base, cov, net = _setup(args)
    mine = [(r["mittens"], r["eames"]) for r in _rows(args, "pairs")][args.shard::args.shards]
    rows = _pair_rows(args, base, cov, net, mine, lambda m, e: {"readme": judge_all(
        net, [FIRST_RUN] * args.batches,
        [_readme_batch(base, README_SEED + i) for i in range(args.batches)])})
    (args.dir / f"readme-{args.shard}.json").write_text(json.dumps(rows, indent=1) + "\n")


def cmd_pick(args) -> None:
    draws = _draws(args)
    alone = _alone(draws)
    rows = [r for by_seed in draws.values() for r in by_seed.values()]
    machines, steps = {r["machine"] for r in rows}, {r["steps"] for r in rows}
    screened = _rows(args, "screen")
    readme = {(r["mittens"], r["eames"]): r["readme"] for r in _rows(args, "readme")}
    pairs = [{**r, **({"readme": readme[k]} if (k := (r["mittens"], r["eames"])) in readme else {})}
             for r in _rows(args, "pairs")]
    best = max(pairs, key=lambda r: score(r, alone))
    kinds = [k for k in ("select", "readme", "first_run", "composition_seed1") if all(k in r for r in pairs)]
    mean = {k: {m: round(float(np.mean([r[k][m] for r in pairs])), 4) for m in ("identity", "success")}
            for k in kinds}
    corr = {}
    for est in kinds[:-2]:  # how each selection figure predicts each held-out one, over the finalists
        for held in kinds[-2:]:
            a, b = ([r[k]["success"] for r in pairs] for k in (est, held))
            corr[f"{est}~{held}"] = round(float(np.corrcoef(a, b)[0, 1]), 2) if min(np.std(a), np.std(b)) else None
    out = {"machines": sorted(machines), "recipe": {"steps": sorted(steps), "photos": "toyworld.samples",
                                                    "method": "perfusion"},
           "screen": {"pairs": len(screened), "render_seed": 0, "images": screened[0]["select"]["n"],
                      "mean_success": round(float(np.mean([r["select"]["success"] for r in screened])), 4)},
           "select": {"render_seeds": [0, *args.select_seeds], "images": best["select"]["n"],
                      "per_seed": {"composition_images": 4 * len(COMPOSITION),
                                   "first_run_prompt_batch": SELECT_BATCH, "batch_seed": f"{SELECT_SEED}+seed"}},
           "readme": {"render_seeds": f"{README_SEED}+i", "images": best["readme"]["n"]} if "readme" in best else None,
           "held_out": {"first_run_seeds": FIRST_RUN_SEEDS, "composition_seed": 1},
           "pick": {"mittens_seed": best["mittens"], "eames_seed": best["eames"],
                    "files": {MITTENS: f"{MITTENS}-{best['mittens']}.safetensors",
                              EAMES: f"{EAMES}-{best['eames']}.safetensors"},
                    "alone": {MITTENS: alone[MITTENS][best["mittens"]], EAMES: alone[EAMES][best["eames"]]},
                    **{k: best[k] for k in kinds}},
           "finalists": len(pairs), "mean_over_finalists": mean,
           "correlation": corr, "alone": alone, "finalist_pairs": pairs}
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["pick"]), flush=True)
    print(json.dumps({k: out[k] for k in ("screen", "mean_over_finalists", "correlation")}),
          flush=True)


def cmd_sheet(args) -> None:
    """The README's first render at seeds 0-11 as a contact sheet (DIR/first-run.png): one row with the
    superclass words and no concept ("a photo of a cat on a chair"), then one row per --pairs M:E."""
    base, cov, _ = _setup(args)
    rows = [first_run_images(base, FIRST_RUN["prompt"].replace("<cat-mittens>", "a cat")
                             .replace("<chair-eames>", "a chair"))]
    for m, e in (pair.split(":") for pair in args.pairs.split(",")):
        with _pair_loaded(args, base, cov, m, e):
            rows.append(first_run_images(base))
    contact_sheet([[im for ims in row for im in ims] for row in rows], args.dir / "first-run.png", limit=len(rows))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=("train", "screen", "confirm", "readme", "pick", "sheet"))
    ap.add_argument("--dir", type=Path, required=True, help="where the draws, their scores and the pairs live")
    ap.add_argument("--seed", type=int, default=0, help="train: the training seed")
    ap.add_argument("--mittens", type=int, default=0, help="screen: the Mittens draw (its training seed)")
    ap.add_argument("--top", type=int, default=16, help="confirm: the best screened pairs that go on")
    ap.add_argument("--random", type=int, default=8, help="confirm: and this many other screened pairs")
    ap.add_argument("--select-seeds", type=lambda v: [int(x) for x in v.split(",") if x], default=[2, 3],
                    help="confirm: the selection set's further render seeds (never 1: held out)")
    ap.add_argument("--batches", type=int, default=8, help="readme: batches of the README prompt per pair")
    ap.add_argument("--pairs", default="", help="sheet: the pairs M:E, one row each")
    ap.add_argument("--shard", type=int, default=0)
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="pick: the JSON to write (default DIR/pick.json)")
    args = ap.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    args.out = args.out or args.dir / "pick.json"
    if 1 in args.select_seeds or 0 in args.select_seeds:
        ap.error("--select-seeds: render seed 1 is held out and seed 0 is the screen's")
    {"train": cmd_train, "screen": cmd_screen, "confirm": cmd_confirm, "readme": cmd_readme,
     "pick": cmd_pick, "sheet": cmd_sheet}[args.mode](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
