"""The toy world's evaluator: a small CNN that reads a 64x64 image back into scene attributes.

It judges renders of the embedded `toy` base (`toyworld/quality.py`, `toyworld.base_train`): background colour
and texture; per object class whether it is present and, where exactly one object of that class is drawn, its
colour, pattern and box (centre x, centre y, side); and two identity heads that tell the reserved instances
(`mittens`, `eames`) from every other cat or chair. Positions and relations are read from the boxes with the
world's own rules (`position_of`, `relation_holds`).

Training data are generator scenes (`world.sample_scene`) where, a third of the time, one object is swapped for
a reserved instance, plus Mittens-on-Eames scenes; light blur and pixel noise make it tolerant of the softer
images a diffusion model draws. ``python -m toyworld.evaluator --out DIR`` trains it (meant for one GPU,
about a minute) and writes DIR/model.safetensors (fp16) and DIR/info.json with its accuracy on fresh images.
The shipped copy lives in ``toyworld/data/evaluator``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from toyworld import world

EVAL_DIR = Path(__file__).resolve().parent / "data" / "evaluator"
NC, NK = len(world.COLOR_NAMES), len(world.CLASSES)
NP = len(world.PATTERNS)
# output layout: background (NC), texture (2), per class [present 1, colour NC, pattern NP, box 3], identities 2
PER_CLASS = 1 + NC + NP + 3
N_OUT = NC + 2 + NK * PER_CLASS + 2
TRAIN_SEED_BASE = 50_000_000
TEST_SEED_BASE = 60_000_000


# --------------------------------------------------------------------------------------------------
# scenes and labels
# --------------------------------------------------------------------------------------------------
def _as_instance(o: world.Obj, which: str) -> world.Obj:
    o = replace(o, **world.INSTANCE_PARTS[which])
    return replace(o, mirror=False) if which == "mittens" else o  # cats are never mirrored


def _near_miss(o: world.Obj, rng) -> world.Obj:
    """A generic object one detail away from a reserved instance (a hard negative for the identity heads)."""
    if rng.random() < 0.5:
        collar, paws = ("blue", None) if rng.random() < 0.5 else (None, "white")
        if rng.random() < 0.5:
            collar, paws = world._pick(rng, ("red", "green", "purple", "black")), "white"
        return replace(o, cls="cat", color="orange", pattern="plain", instance=None, mirror=False, collar=collar,
                       paws=paws)
    return replace(o, cls="chair", color=world._pick(rng, ("blue", "green", "gray")), pattern="plain",
                   instance=None, shell=True, legs="brown")


def eval_scene(seed: int) -> world.Scene:
    """A labelled training/test scene for the evaluator (reserved instances included)."""
    rng = np.random.default_rng([seed, 11])
    r = rng.random()
    if r < 0.06:
        return world.mittens_on_eames(int(rng.integers(2**31)), background=None)
    scene = world.sample_scene(rng)
    if r < 0.40:
        i = int(rng.integers(len(scene.objects)))
        which = "mittens" if rng.random() < 0.5 else "eames"
        other = scene.objects[1 - i].color if len(scene.objects) == 2 else None
        if which == "mittens" and "orange" in (scene.background, other):
            which = "eames"
        objs = list(scene.objects)
        objs[i] = _as_instance(objs[i], which)
        scene = replace(scene, objects=objs)
    elif r < 0.55:
        # hard negatives: generic cats and shell chairs one detail away from the instances
        objs = list(scene.objects)
        if scene.background not in ("orange", "blue", "green", "gray"):
            objs[0] = _near_miss(objs[0], rng)
        scene = replace(scene, objects=objs)
    return scene


def labels(scene: world.Scene) -> dict:
    """Targets of one scene; -1 / NaN where a value is undefined (absent or ambiguous)."""
    present = np.zeros(NK, np.float32)
    color = np.full(NK, -1, np.int64)
    pattern = np.full(NK, -1, np.int64)
    box = np.full((NK, 3), np.nan, np.float32)
    counts = {c: sum(o.cls == c for o in scene.objects) for c in world.CLASSES}
    for o in scene.objects:
        k = world.CLASSES.index(o.cls)
        present[k] = 1
        if counts[o.cls] == 1:
            box[k] = (o.cx, o.cy, o.s)
            if o.instance != "eames":  # the Eames chair is two-tone: no single colour
                color[k] = world.COLOR_NAMES.index(o.color)
                pattern[k] = world.PATTERNS.index(o.pattern)
    return {
        "bg": world.COLOR_NAMES.index(scene.background),
        "tex": world.TEXTURES.index(scene.texture),
        "present": present, "color": color, "pattern": pattern, "box": box,
        "mittens": float(any(o.instance == "mittens" for o in scene.objects)),
        "eames": float(any(o.instance == "eames" for o in scene.objects)),
    }


def _gen(args):
    start, n = args
    out = []
    for s in range(start, start + n):
        sc = eval_scene(s)
        out.append((world.render(sc), labels(sc)))
    return out


def make_dataset(n: int, seed_base: int, workers: int = 1) -> tuple[np.ndarray, dict]:
    """n images uint8 [n, 64, 64, 3] and stacked label arrays."""
    jobs = [(seed_base + i, min(1000, n - i)) for i in range(0, n, 1000)]
    if workers > 1:
        with mp.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_gen, jobs)
    else:
        parts = [_gen(j) for j in jobs]
    items = [x for p in parts for x in p]
    imgs = np.stack([i for i, _ in items])
    labs = {k: np.stack([np.asarray(lab[k]) for _, lab in items]) for k in items[0][1]}
    return imgs, labs


# --------------------------------------------------------------------------------------------------
# the network
# --------------------------------------------------------------------------------------------------
class Evaluator(nn.Module):
    """Four conv stages (64 -> 4 px), one more conv at 4 px, and a small head; ~2 M parameters."""

    def __init__(self):
        super().__init__()

        def stage(a, b):
            return [nn.Conv2d(a, b, 3, padding=1), nn.GroupNorm(8, b), nn.SiLU(),
                    nn.Conv2d(b, b, 3, padding=1, stride=2), nn.GroupNorm(8, b), nn.SiLU()]

        self.features = nn.Sequential(*stage(3, 32), *stage(32, 64), *stage(64, 128), *stage(128, 128),
                                      nn.Conv2d(128, 256, 3, padding=1), nn.GroupNorm(8, 256), nn.SiLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(256 * 4 * 4, 256), nn.SiLU(), nn.Linear(256, N_OUT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, 64, 64] in [0, 1] -> raw outputs [B, N_OUT]."""
        return self.head(self.features(x * 2 - 1))


def split(out: torch.Tensor) -> dict:
    """Raw outputs -> named logits/values."""
    b = out.shape[0]
    bg, tex, rest = out[:, :NC], out[:, NC:NC + 2], out[:, NC + 2:]
    per = rest[:, :NK * PER_CLASS].reshape(b, NK, PER_CLASS)
    ids = rest[:, NK * PER_CLASS:]
    return {"bg": bg, "tex": tex, "present": per[..., 0], "color": per[..., 1:1 + NC],
            "pattern": per[..., 1 + NC:1 + NC + NP], "box": torch.sigmoid(per[..., 1 + NC + NP:]),
            "mittens": ids[:, 0], "eames": ids[:, 1]}


def loss_fn(out: torch.Tensor, lab: dict) -> torch.Tensor:
    f = nn.functional
    p = split(out.float())
    loss = f.cross_entropy(p["bg"], lab["bg"]) + f.cross_entropy(p["tex"], lab["tex"])
    loss = loss + f.binary_cross_entropy_with_logits(p["present"], lab["present"]) * NK
    loss = loss + f.cross_entropy(p["color"].reshape(-1, NC), lab["color"].reshape(-1), ignore_index=-1)
    loss = loss + f.cross_entropy(p["pattern"].reshape(-1, NP), lab["pattern"].reshape(-1), ignore_index=-1)
    m = ~torch.isnan(lab["box"])
    loss = loss + 20 * f.smooth_l1_loss(p["box"][m], lab["box"][m], beta=0.05)
    loss = loss + f.binary_cross_entropy_with_logits(p["mittens"], lab["mittens"])
    loss = loss + f.binary_cross_entropy_with_logits(p["eames"], lab["eames"])
    return loss


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur a third of the batch a little and add pixel noise (x in [0, 1])."""
    b = x.shape[0]
    blur = nn.functional.avg_pool2d(nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    w = (torch.rand(b, 1, 1, 1, generator=gen, device=x.device) < 0.33).float() * torch.rand(
        b, 1, 1, 1, generator=gen, device=x.device)
    x = x * (1 - w) + blur * w
    sigma = torch.rand(b, 1, 1, 1, generator=gen, device=x.device) * 0.04
    return (x + sigma * torch.randn(x.shape, generator=gen, device=x.device)).clamp(0, 1)


# --------------------------------------------------------------------------------------------------
# reading images
# --------------------------------------------------------------------------------------------------
def load(folder: Path = EVAL_DIR, device: str = "cpu") -> Evaluator:
    from safetensors.torch import load_file

    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no evaluator weights at {path} (train them: python -m toyworld.evaluator)")
    net = Evaluator()
    net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return net.to(device).eval()


def to_tensor(images) -> torch.Tensor:
    """PIL images / uint8 arrays [H, W, 3] / a uint8 array [N, H, W, 3] -> float [N, 3, 64, 64] in [0, 1]."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        arr = images
    else:
        arr = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float() / 255
    if x.shape[-1] != world.SIZE:
        x = nn.functional.interpolate(x, size=(world.SIZE, world.SIZE), mode="area")
    return x


@torch.no_grad()
def read(net: Evaluator, images, batch: int = 256) -> dict:
    """Per image: background, texture, class presence, per-class colour/pattern/box, identity probabilities."""
    x = to_tensor(images)
    dev = next(net.parameters()).device
    parts = [split(net(x[i:i + batch].to(dev)).float()) for i in range(0, len(x), batch)]
    p = {k: torch.cat([q[k] for q in parts]).cpu() for k in parts[0]}
    return {
        "bg": p["bg"].argmax(-1).numpy(), "tex": p["tex"].argmax(-1).numpy(),
        "present": (torch.sigmoid(p["present"]) > 0.5).numpy(),
        "present_p": torch.sigmoid(p["present"]).numpy(),
        "color": p["color"].argmax(-1).numpy(), "pattern": p["pattern"].argmax(-1).numpy(),
        "box": p["box"].numpy(),
        "mittens": torch.sigmoid(p["mittens"]).numpy(), "eames": torch.sigmoid(p["eames"]).numpy(),
    }


def position_of(cx: float, cy: float) -> str | None:
    """The caption's position words for a single object's box centre (the world's rule)."""
    o = world.Obj("ball", "red", "small", "plain", cx=float(cx), cy=float(cy), s=0.3)
    return world._position(o)


def relation_holds(relation: str, a, b) -> bool:
    """Whether boxes a, b = (cx, cy, s) stand in `relation` as the world draws it ("a <relation> b")."""
    (ax, ay, as_), (bx, by, bs) = a, b
    if relation == "on":
        return ay < by and abs(ax - bx) < 0.5 * bs + 0.05 and (ay + as_ / 2) < by + 0.1 * bs
    if relation == "left of":
        return ax < bx - 0.05
    if relation == "right of":
        return ax > bx + 0.05
    if relation == "next to":
        return abs(ax - bx) > 0.5 * (as_ + bs) * 0.6 and abs((ay + as_ / 2) - (by + bs / 2)) < 0.12
    raise ValueError(f"unknown relation {relation!r}")


# --------------------------------------------------------------------------------------------------
# judging renders of prompts
# --------------------------------------------------------------------------------------------------
def prompt_set(n: int = 200, seed: int = 0) -> list[dict]:
    """A fixed set of base prompts with what each asks for: half one object (a third of those with a position),
    half two objects of different classes and colours in a relation. {"prompt", "bg", "objects": [(cls, colour)],
    "position", "relation"}."""
    rng = np.random.default_rng([seed, 77])
    out = []
    for i in range(n):
        bg = world._pick(rng, world.COLOR_NAMES)
        colours = [c for c in world.COLOR_NAMES if c != bg]
        if i % 2 == 0:
            cls, col = world._pick(rng, world.CLASSES), world._pick(rng, colours)
            pos = world._pick(rng, ("on the left", "on the right", "at the top")) if i % 6 == 0 else None
            words = f"a {col} {cls}" + (f" {pos}" if pos else "")
            out.append({"bg": bg, "objects": [(cls, col)], "position": pos, "relation": None,
                        "prompt": f"{words} on a {bg} background".replace("a orange", "an orange")})
        else:
            ca, cb = rng.choice(len(world.CLASSES), 2, replace=False)
            ka, kb = rng.choice(len(colours), 2, replace=False)
            a, b = (world.CLASSES[ca], colours[ka]), (world.CLASSES[cb], colours[kb])
            rel = world._pick(rng, world.RELATIONS)
            text = f"a {a[1]} {a[0]} {rel} a {b[1]} {b[0]} on a {bg} background".replace("a orange", "an orange")
            out.append({"bg": bg, "objects": [a, b], "position": None, "relation": rel, "prompt": text})
    return out


def judge(spec: dict, r: dict, i: int) -> dict:
    """Whether render i (evaluator reading `r`) shows what `spec` asks: background, classes, colours (an object
    whose colour is None, a personal concept, is only looked for), and where asked, the background, position or
    relation (None when not asked)."""
    ks = [world.CLASSES.index(c) for c, _ in spec["objects"]]
    out = {"background": None if spec["bg"] is None else bool(r["bg"][i] == world.COLOR_NAMES.index(spec["bg"])),
           "classes": bool(all(r["present"][i, k] for k in ks)),
           "colours": bool(all(r["present"][i, k] and r["color"][i, k] == world.COLOR_NAMES.index(c)
                               for k, (_, c) in zip(ks, spec["objects"]) if c is not None)),
           "position": None, "relation": None}
    if spec["position"]:
        out["position"] = bool(r["present"][i, ks[0]] and position_of(*r["box"][i, ks[0], :2]) == spec["position"])
    if spec["relation"]:
        out["relation"] = bool(out["classes"] and relation_holds(spec["relation"], r["box"][i, ks[0]],
                                                                 r["box"][i, ks[1]]))
    out["all_basic"] = out["background"] is not False and out["classes"] and out["colours"]
    return out


@torch.no_grad()
def score_pipeline(pipe, net: Evaluator, specs: list[dict], *, seeds=(0,), guidance: float = 7.5, steps: int = 25,
                   batch: int = 50) -> dict:
    """Render every spec's prompt once per seed with a diffusers text-to-image pipeline and judge the images."""
    results = []
    jobs = [(sp, s) for s in seeds for sp in specs]
    for i in range(0, len(jobs), batch):
        part = jobs[i:i + batch]
        gens = [torch.Generator("cpu").manual_seed(s) for _, s in part]
        imgs = pipe([sp["prompt"] for sp, _ in part], num_inference_steps=steps, guidance_scale=guidance,
                    generator=gens, height=world.SIZE, width=world.SIZE).images
        r = read(net, imgs)
        results += [judge(sp, r, j) for j, (sp, _) in enumerate(part)]
    return summarize(results)


def summarize(results: list[dict]) -> dict:
    """Rates over judged renders (None entries skipped), plus the one- and two-object split."""
    keys = ("background", "classes", "colours", "all_basic", "position", "relation")

    def rates(rs):
        out = {}
        for k in keys:
            v = [x[k] for x in rs if x[k] is not None]
            out[k] = round(float(np.mean(v)), 4) if v else None
        return out

    return {**rates(results), "n": len(results),
            "one_object": rates([x for x in results if x["relation"] is None]),
            "two_objects": rates([x for x in results if x["relation"] is not None])}


# --------------------------------------------------------------------------------------------------
# accuracy on fresh generator images
# --------------------------------------------------------------------------------------------------
def accuracy(net: Evaluator, n: int = 4000, seed_base: int = TEST_SEED_BASE, workers: int = 1) -> dict:
    """Per-attribute accuracy on n fresh labelled scenes (seeds never used in training)."""
    scenes = [eval_scene(seed_base + i) for i in range(n)]
    imgs, _ = make_dataset(n, seed_base, workers)
    r = read(net, imgs)
    hits: dict[str, list[bool]] = {k: [] for k in ("background", "texture", "classes", "colour", "pattern",
                                                     "position", "relation", "mittens", "eames")}
    for i, sc in enumerate(scenes):
        lab = labels(sc)
        hits["background"].append(r["bg"][i] == lab["bg"])
        hits["texture"].append(r["tex"][i] == lab["tex"])
        hits["classes"].append(bool((r["present"][i] == lab["present"].astype(bool)).all()))
        for k in range(NK):
            if lab["color"][k] >= 0:
                hits["colour"].append(r["color"][i, k] == lab["color"][k])
                hits["pattern"].append(r["pattern"][i, k] == lab["pattern"][k])
        hits["mittens"].append((r["mittens"][i] > 0.5) == bool(lab["mittens"]))
        hits["eames"].append((r["eames"][i] > 0.5) == bool(lab["eames"]))
        if len(sc.objects) == 1:
            o = sc.objects[0]
            k = world.CLASSES.index(o.cls)
            hits["position"].append(position_of(*r["box"][i, k, :2]) == world._position(o))
        elif sc.relation and sc.objects[0].cls != sc.objects[1].cls:
            a, b = sc.objects
            ka, kb = world.CLASSES.index(a.cls), world.CLASSES.index(b.cls)
            truth = relation_holds(sc.relation, (a.cx, a.cy, a.s), (b.cx, b.cy, b.s))
            hits["relation"].append(relation_holds(sc.relation, r["box"][i, ka], r["box"][i, kb]) == truth)
    return {k: round(float(np.mean(v)), 4) for k, v in hits.items()} | {"n": n}


def relation_rule_agreement(n: int = 4000) -> float:
    """How often `relation_holds` accepts the world's own placements (true boxes): the rule's ceiling."""
    ok = []
    for s in range(n):
        sc = world.sample_scene(np.random.default_rng([TEST_SEED_BASE + s, 7]))
        if sc.relation:
            a, b = sc.objects
            ok.append(relation_holds(sc.relation, (a.cx, a.cy, a.s), (b.cx, b.cy, b.s)))
    return float(np.mean(ok))


# --------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------
def train(n: int, steps: int, batch: int, lr: float, device: str, workers: int, log=print) -> tuple[Evaluator, dict]:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    imgs, labs = make_dataset(n, TRAIN_SEED_BASE, workers)
    t_gen = time.perf_counter() - t0
    log(f"evaluator data: {n} images in {t_gen:.1f}s")
    dev = torch.device(device)
    x_all = torch.from_numpy(imgs).to(dev).permute(0, 3, 1, 2).contiguous()
    lab_all = {k: torch.from_numpy(v).to(dev) for k, v in labs.items()}
    lab_all["bg"], lab_all["tex"] = lab_all["bg"].long(), lab_all["tex"].long()
    net = Evaluator().to(dev).train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator(dev).manual_seed(0)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    t1 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, n, (batch,), generator=gen, device=dev)
        x = augment(x_all[idx].float() / 255, gen)
        with amp:
            out = net(x)
        loss = loss_fn(out, {k: v[idx] for k, v in lab_all.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 500 == 0:
            log(f"evaluator step {step + 1}/{steps} loss {loss.item():.4f}")
    net.eval()
    info = {"train_images": n, "steps": steps, "batch": batch, "lr": lr, "device": str(dev),
            "generate_s": round(t_gen, 1), "train_s": round(time.perf_counter() - t1, 1)}
    return net, info


def save(net: Evaluator, out: Path, info: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in net.state_dict().items()}
    tmp = out / "model.safetensors.tmp"
    save_file(sd, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "model.safetensors")
    (out / "info.json").write_text(json.dumps(info, indent=1) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Train the toy world's evaluator CNN.")
    ap.add_argument("--out", type=Path, default=EVAL_DIR)
    ap.add_argument("--images", type=int, default=120_000)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--test", type=int, default=4000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    net, info = train(args.images, args.steps, args.batch, args.lr, args.device, args.workers,
                      log=lambda m: print(m, flush=True))
    # accuracy of the fp16 weights that ship
    net = net.half().float()
    acc = accuracy(net, args.test, workers=args.workers)
    info.update(params=sum(p.numel() for p in net.parameters()), test_accuracy=acc,
                relation_rule_ceiling=round(relation_rule_agreement(), 4),
                torch_version=torch.__version__,
                device_name=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu")
    print(json.dumps(info), flush=True)
    save(net, args.out, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
