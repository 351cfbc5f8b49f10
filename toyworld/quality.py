#!/usr/bin/env python
"""Perfusion measured on the embedded `toy` base (issue 6): identity vs text alignment, ablations, composition.

For each reserved instance of the procedural world (Mittens: superclass cat; the Eames chair: superclass
chair), a concept is trained from 8 generator images of it (varied places, sizes, backgrounds: toyworld.samples), with the
default recipe (400 steps, batch 16) by four methods at the same budget (toyworld.ablations METHODS):

  perfusion       key-locked rank-one edit (what pfx ships)
  trained_keys    the same edit with trained key targets instead of locked ones
  embedding_only  Textual-Inversion style: the token embedding alone
  full_kv         Custom-Diffusion style: the embedding plus every attn2 to_k/to_v weight

Each result renders a fixed set of prompts that put the instance in new contexts (other backgrounds, another
object beside it), 4 images each (one batch, seed 0), 25 DDIM steps, guidance 7.5, and the shipped evaluator reads the
images: identity = the instance's identity head > 0.5; text alignment = background, the other object's class
and colour, and the concept's own class all right; relation = the stated relation holds between the boxes.
Perfusion is swept over beta (the gate's threshold), giving the identity/alignment front. A superclass-word
row (no concept) gives the identity head's false-positive level. Composition: "<cat-mittens> on
<chair-eames>" with both concepts of a method, success = both identities and the relation "on"; and the
README's first render ("a photo of cat-mittens on chair-eames", pfx render's defaults) at seeds 0-11.
Also recorded: every method's file size and CPU training time (this machine, --threads threads).

  python -m toyworld.quality                   # writes bench/results/quality-toy-<date>.json and images/*.png
  python -m toyworld.quality --stage base      # the base alone: quality-toy-base-<date>.json
  python -m toyworld.quality --quick           # a smoke run (few steps, one image per prompt)
  python -m toyworld.quality --base DIR --device cuda --methods perfusion   # a candidate base folder, on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from perfusion_hub.bases import load_base
from perfusion_hub.captions import corpus_digest, load_captions
from perfusion_hub.covariance import estimate, packaged_covariance
from perfusion_hub.loaders import runtime_of
from perfusion_hub.render import render
from perfusion_hub.train import TrainConfig
from toyworld import RESULTS, evaluator
from toyworld.ablations import METHODS, Loaded, MethodResult, train_method
from toyworld.samples import PHOTO_SIZES, PHOTOS, write_photos

INSTANCES = {"cat-mittens": ("cat", "mittens"),
             "chair-eames": ("chair", "eames")}
BETAS = (0.5, 0.6, 0.7, 0.8, 0.9)
STEPS, GUIDANCE = 25, 7.5


def prompt_specs(name: str) -> list[dict]:
    """Prompts that put concept `name` in contexts its photos never showed."""
    cls, ident = INSTANCES[name]
    trig = f"<{name}>"
    specs = []
    for bg in ("green", "yellow", "purple", "pink", "gray", "red"):
        specs.append({"prompt": f"a photo of a {trig} on a {bg} background", "bg": bg, "objects": [(cls, None)],
                      "position": None, "relation": None, "identity": [ident]})
    others = [("ball", "red", "next to", "green"), ("tree", "green", "left of", "yellow"),
              ("cup", "purple", "right of", "pink"), ("dog", "black", "next to", "white"),
              ("ball", "yellow", "right of", "purple"), ("cup", "red", "left of", "gray")]
    for ocls, ocol, rel, bg in others:
        specs.append({"prompt": f"a {trig} {rel} a {ocol} {ocls} on a {bg} background", "bg": bg,
                      "objects": [(cls, None), (ocls, ocol)], "position": None, "relation": rel,
                      "identity": [ident]})
    return specs


def superclass_specs(name: str, words: str | None = None) -> list[dict]:
    """The same prompts with the superclass word (or `words`) instead of the concept (no concept loaded)."""
    words = words or INSTANCES[name][0]
    return [dict(s, prompt=s["prompt"].replace(f"<{name}>", words).replace("a orange", "an orange"))
            for s in prompt_specs(name)]


# the instances as near as the base's words come: Mittens' parts have words (chunk 3 of the base captions them),
# the Eames chair's teal does not (no world colour is teal)
DESCRIPTIONS = {"cat-mittens": "orange cat with a blue scarf and white socks", "chair-eames": "teal shell chair"}


COMPOSITION = [{"prompt": f"a photo of a <cat-mittens> on a <chair-eames> on a {bg} background", "bg": bg,
                "objects": [("cat", None), ("chair", None)], "position": None, "relation": "on",
                "identity": ["mittens", "eames"]} for bg in ("green", "yellow", "pink", "gray", "purple", "white")]
# the README's first render (`pfx render "a photo of cat-mittens on chair-eames"`), at seeds 0..FIRST_RUN_SEEDS-1
FIRST_RUN = {"prompt": "a photo of <cat-mittens> on <chair-eames>", "bg": None,
             "objects": [("cat", None), ("chair", None)], "position": None, "relation": "on",
             "identity": ["mittens", "eames"]}
FIRST_RUN_SEEDS = 12


def judge_all(net, specs: list[dict], images_per_spec: list[list]) -> dict:
    """Rates over every image: identity (all named instances seen), alignment, relation, and both."""
    flat = [(sp, im) for sp, ims in zip(specs, images_per_spec) for im in ims]
    r = evaluator.read(net, [im for _, im in flat])
    rows = []
    for i, (sp, _) in enumerate(flat):
        j = evaluator.judge(sp, r, i)
        ident = all(r[w][i] > 0.5 for w in sp["identity"])
        rows.append({"identity": ident, "alignment": j["all_basic"], "relation": j["relation"],
                     "identity_and_alignment": ident and j["all_basic"],
                     "success": ident and j["all_basic"] and j["relation"] is not False})
    out = {}
    for k in rows[0]:
        v = [x[k] for x in rows if x[k] is not None]
        out[k] = round(float(np.mean(v)), 4) if v else None
    out["n"] = len(rows)
    return out


def first_run_images(base, prompt: str = FIRST_RUN["prompt"]) -> list[list]:
    """The README's first render with the loaded concepts, at pfx render's defaults, seeds 0..FIRST_RUN_SEEDS-1."""
    return [render(base, prompt, seed=s, steps=STEPS, guidance=GUIDANCE).images for s in range(FIRST_RUN_SEEDS)]


def render_specs(base, specs, count: int, *, beta=None, seed: int = 0) -> list[list]:
    """`count` images per spec (one batch, seed `seed`); concepts named in the prompt go through pfx's render,
    other prompts through the plain pipeline."""
    out = []
    rt = runtime_of(base.pipe)
    known = set(rt.concepts) if rt is not None else set()
    for sp in specs:
        names = [w.strip("<>") for w in sp["prompt"].split() if w.startswith("<")]
        if names and set(names) <= known:
            b = {n: beta for n in names} if beta is not None else None
            out.append(render(base, sp["prompt"], seed=seed, count=count, steps=STEPS, guidance=GUIDANCE, beta=b).images)
        else:
            g = torch.Generator("cpu").manual_seed(seed)
            out.append(base.pipe(sp["prompt"], num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=g,
                                 num_images_per_prompt=count, height=64, width=64).images)
    return out


def contact_sheet(images_per_spec: list[list], path: Path, limit: int = 6) -> None:
    rows = [np.concatenate([np.asarray(im) for im in ims], 1) for ims in images_per_spec[:limit]]
    Image.fromarray(np.concatenate(rows, 0)).save(path)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(INSTANCES)
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 5))
    marks = {"trained_keys": "s", "embedding_only": "^", "full_kv": "D", "superclass word": "x"}
    for ax, name in zip(axes, names):
        inst = results["instances"][name]
        sweep = inst["perfusion_beta_sweep"]
        xs = [sweep[b]["alignment"] for b in sweep]
        ys = [sweep[b]["identity"] for b in sweep]
        ax.plot(xs, ys, "o-", label="perfusion (beta sweep)")
        for b, x, y in zip(sweep, xs, ys):
            ax.annotate(f"beta {b}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        for m, mk in marks.items():
            row = inst["methods"].get(m) if m != "superclass word" else inst["superclass_word"]
            if row:
                ev = row.get("eval", row)
                ax.scatter([ev["alignment"]], [ev["identity"]], marker=mk, s=60, label=m)
        ax.set_xlabel("text alignment (background + other object + class)")
        ax.set_ylabel(f"identity ({INSTANCES[name][1]} recognised)")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(f"{name} on the toy base")
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def covariance_of(base):
    """The base's packaged covariance, or for a candidate base folder C over the packaged corpus, as `pfx base
    prepare` would estimate it."""
    cov = packaged_covariance(base)
    if cov is None:
        lines = load_captions()
        cov = estimate(base.pipe.tokenizer, base.pipe.text_encoder, lines, base_digest=base.digest,
                       corpus_digest=corpus_digest(lines), batch_size=256)
    return cov


def machine(args) -> str:
    if args.device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {args.threads} CPU threads"


def base_quality(args) -> dict:
    """The base alone: the evaluator's fixed prompt set (200 prompts x 2 images, guidance 7.5 and 4), each
    instance's new-context prompts with the instance described in words (no concept), and the time of one
    25-step 64x64 render through pfx (median of 5, after one warm-up)."""
    base = load_base(args.base, device=args.device, dtype="fp32")
    net = evaluator.load()
    specs = evaluator.prompt_set(200)
    out = {"date": date.today().isoformat(), "machine": machine(args), "torch": torch.__version__,
           "base_digest": base.digest,
           "prompts": len(specs), "images_per_prompt": 2}
    for g in (7.5, 4.0):
        t0 = time.perf_counter()
        out[f"guidance_{g}"] = evaluator.score_pipeline(base.pipe, net, specs, seeds=(0, 1), guidance=g)
        print(f"guidance {g}: {out[f'guidance_{g}']} ({time.perf_counter() - t0:.0f} s)", flush=True)
    out["described_in_words"] = {}
    for name, words in DESCRIPTIONS.items():
        specs = superclass_specs(name, words)
        out["described_in_words"][name] = dict(judge_all(net, specs, render_specs(base, specs, args.images)),
                                               words=words)
        print(name, "described:", out["described_in_words"][name], flush=True)
    render(base, "a red cat on a blue background", steps=STEPS)
    times = []
    for s in range(5):
        t0 = time.perf_counter()
        render(base, "a red cat on a blue background", steps=STEPS, seed=s)
        times.append(time.perf_counter() - t0)
    out["render_25_steps_s"] = {"median": round(sorted(times)[2], 3), "all": [round(t, 3) for t in times]}
    print("render:", out["render_25_steps_s"], flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--images", type=int, default=4, help="images per prompt (one batch from seed 0)")
    ap.add_argument("--photos", type=int, default=PHOTOS)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--base", default="toy", help="the embedded toy base, or a folder of a candidate toy base")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--embedding-norm", type=float, default=None,
                    help="override the base's bound on the concept embedding's norm (0: none); results get a -norm tag")
    ap.add_argument("--quick", action="store_true", help="smoke run: 20 steps, 1 seed, two betas")
    ap.add_argument("--stage", choices=("concepts", "base"), default="concepts",
                    help="concepts: the concept measurements; base: the base alone (prompt set, render time)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.stage == "base":
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"quality-toy-base-{date.today().isoformat()}.json"
        path.write_text(json.dumps(base_quality(args), indent=1) + "\n")
        print(f"wrote {path}")
        return 0
    if args.quick:
        args.steps, args.images = 20, 1
    betas = BETAS if not args.quick else (0.6, 0.8)
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    base = load_base(args.base, device=args.device, dtype="fp32")
    cov = covariance_of(base)
    net = evaluator.load()
    norm_tag = "" if args.embedding_norm is None else f"-norm{args.embedding_norm:g}"
    tag = f"quality-toy{'-quick' if args.quick else ''}{norm_tag}-{date.today().isoformat()}"
    args.out.mkdir(parents=True, exist_ok=True)
    images = args.out / "images"
    images.mkdir(exist_ok=True)
    results = {"date": date.today().isoformat(), "machine": machine(args), "torch": torch.__version__,
               "base": base.name,
               "base_digest": base.digest, "recipe": {
                   "steps": args.steps, "batch_size": 16, "photos": args.photos, "photo_sizes": PHOTO_SIZES,
                   "embedding_norm": getattr(base.pipe, "_pfx_embedding_norm", 0.0) if args.embedding_norm is None
                   else args.embedding_norm},
               "render": {"steps": STEPS, "guidance": GUIDANCE, "images_per_prompt": args.images, "seed": 0,
                          "size": 64},
               "evaluator": json.loads((evaluator.EVAL_DIR / "info.json").read_text())["test_accuracy"],
               "instances": {}, "composition": {}}
    out_json = args.out / f"{tag}.json"

    def dump():
        out_json.write_text(json.dumps(results, indent=1) + "\n")

    trained: dict[str, dict[str, MethodResult]] = {m: {} for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (cls, _) in INSTANCES.items():
            photos = write_photos(Path(tmp) / name, name, args.photos)
            inst = results["instances"][name] = {"methods": {}}
            ims = render_specs(base, superclass_specs(name), args.images)
            inst["superclass_word"] = judge_all(net, superclass_specs(name), ims)
            print(name, "superclass word", inst["superclass_word"], flush=True)
            for m in methods:
                cfg = TrainConfig(steps=args.steps, previews=0, embedding_norm=args.embedding_norm)
                t0 = time.process_time(), time.perf_counter()
                res = trained[m][name] = train_method(m, base, photos, name=name, superclass=cls, covariance=cov,
                                                      out_path=Path(tmp) / f"{name}-{m}.safetensors", config=cfg)
                cpu_s, wall_s = time.process_time() - t0[0], time.perf_counter() - t0[1]
                with Loaded(base, cov, res):
                    specs = prompt_specs(name)
                    ims = render_specs(base, specs, args.images)
                    row = {"file_bytes": res.path.stat().st_size, "train_wall_s": round(wall_s, 1),
                           "train_cpu_s": round(cpu_s, 1), "final_loss": round(float(np.mean(res.losses[-20:])), 5),
                           "eval": judge_all(net, specs, ims)}
                    contact_sheet(ims, images / f"{tag}-{name}-{m}.png")
                    if m == "perfusion":
                        inst["perfusion_beta_sweep"] = {}
                        for b in betas:
                            bi = render_specs(base, specs, args.images, beta=b)
                            inst["perfusion_beta_sweep"][str(b)] = judge_all(net, specs, bi)
                            print(name, "beta", b, inst["perfusion_beta_sweep"][str(b)], flush=True)
                inst["methods"][m] = row
                print(name, m, row, flush=True)
                dump()
        for m in methods:
            if len(trained[m]) != 2 or m == "full_kv":
                continue  # Custom-Diffusion weights of two concepts do not add up without a merge step
            with ExitStack() as loaded:
                for res in trained[m].values():
                    loaded.enter_context(Loaded(base, cov, res))
                ims = render_specs(base, COMPOSITION, args.images)
                results["composition"][m] = judge_all(net, COMPOSITION, ims)
                contact_sheet(ims, images / f"{tag}-composition-{m}.png")
                if m == "perfusion":
                    first = first_run_images(base)
                    results["first_run"] = judge_all(net, [FIRST_RUN] * FIRST_RUN_SEEDS, first)
                    results["first_run"]["seed_0_success"] = judge_all(net, [FIRST_RUN], first[:1])["success"]
                    contact_sheet([[im for ims in first for im in ims]], images / f"{tag}-first-run.png")
                    print("first run", results["first_run"], flush=True)
            print("composition", m, results["composition"][m], flush=True)
            dump()
    dump()
    if "perfusion" in methods:
        plot(results, images / f"{tag}.png")
    print(f"wrote {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
