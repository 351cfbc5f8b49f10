"""Rendering: compose concepts into the base pipeline for one prompt, and write reproducible PNGs.

A prompt that references no concept runs the plain pipeline (the processors hand every call to the
stock ones), so its images are bit-identical to the base's for the same seed. Concepts stay loaded
between calls, so a beta sweep or a batch of prompts pays the load once. SDXL pipelines render the same way; a
prompt with concepts gets the pooled embedding of its superclass-substituted text (perfusion_hub.text).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from perfusion_hub import __version__
from perfusion_hub.concept import Concept
from perfusion_hub.covariance import Covariance
from perfusion_hub.errors import BadInput
from perfusion_hub.infotext import format_infotext
from perfusion_hub.loaders import load_concepts, runtime_of
from perfusion_hub.prompts import parse_prompt
from perfusion_hub.text import prompt_embeds


@dataclass
class RenderResult:
    images: list  # PIL images
    prompt: str  # as given to the text encoder (references written as tokens)
    concepts: list[str]
    params: dict = field(default_factory=dict)  # what the PNG text chunk records

    def save(self, path: str | Path) -> list[Path]:
        """Write PNGs: `path` for one image, `stem-<i>.png` for several. Parameters go in two text chunks:
        "pfx" (JSON, everything) and "parameters" (A1111 infotext, perfusion_hub.infotext)."""
        from PIL.PngImagePlugin import PngInfo

        path = Path(path)
        paths = [path] if len(self.images) == 1 else [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}")
                                                     for i in range(len(self.images))]
        for i, (img, p) in enumerate(zip(self.images, paths)):
            info = PngInfo()
            info.add_text("pfx", json.dumps(dict(self.params, index=i), sort_keys=True))
            info.add_text("parameters", format_infotext(self.params, __version__))  # A1111 infotext
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".{p.name}.tmp")
            img.save(tmp, format="PNG", pnginfo=info)
            tmp.replace(p)
        return paths


def known_concepts(rt) -> dict[str, tuple[str, str]]:
    """Loaded concepts as parse_prompt wants them: name -> (token, superclass)."""
    return {n: (s.token, s.metadata.get("superclass", "")) for n, s in rt.concepts.items()} if rt else {}


def ensure_loaded(base, concepts: list[Concept], covariance: Covariance | None) -> None:
    rt = runtime_of(base.pipe)
    have = {n: s.metadata.get("file_digest") for n, s in rt.concepts.items()} if rt else {}
    todo = [c for c in concepts if not c.digest or have.get(c.name) != c.digest]
    if todo:
        if covariance is None:
            raise BadInput("composing concepts needs the base's covariance")
        load_concepts(base.pipe, todo, covariance=covariance, base_name=base.name)


@torch.no_grad()
def render(
    base,
    prompt: str,
    *,
    concepts: list[Concept] = (),
    covariance: Covariance | None = None,
    with_names: list[str] = (),
    seed: int = 0,
    steps: int = 50,
    guidance: float = 7.5,
    count: int = 1,
    beta: dict[str, float] | None = None,
    tau: dict[str, float] | None = None,
    global_lock: bool = False,
    negative_prompt: str | None = None,
    size: int | None = None,
    fast=None,
) -> RenderResult:
    """Render `prompt` `count` times. `fast`: a perfusion_hub.fast.FastRenderer built for this pipeline."""
    pipe = base.pipe
    ensure_loaded(base, list(concepts), covariance)
    rt = runtime_of(pipe)
    parsed = parse_prompt(prompt, known_concepts(rt), list(with_names))
    beta, tau = beta or {}, tau or {}
    unknown = sorted((set(beta) | set(tau)) - set(parsed.concepts))
    if unknown:
        raise BadInput(f"--beta/--tau for {', '.join(unknown)}, which the prompt does not use")
    size = size or base.resolution
    gen = torch.Generator("cpu").manual_seed(seed)
    common = {"num_inference_steps": steps, "guidance_scale": guidance, "height": size, "width": size,
              "generator": gen, "num_images_per_prompt": count, "output_type": "pil"}
    gates = {}
    if rt is not None:
        for name in parsed.concepts:
            s = rt.concepts[name]
            b = beta.get(name, float(s.metadata.get("beta", s.beta)))
            t = tau.get(name, float(s.metadata.get("tau", s.tau)))
            if (s.beta, s.tau) != (b, t):
                rt.set_gate(name, beta=b, tau=t)
            gates[name] = (b, t)
        rt.activate(parsed.concepts)
    try:
        if parsed.concepts and global_lock:
            cfg = guidance > 1
            embeds = prompt_embeds(pipe, parsed.text, 1, cfg, negative_prompt)
            sup = prompt_embeds(pipe, parsed.superclass_text, 1, cfg, negative_prompt)
            keys = sup["prompt_embeds"].expand(count, -1, -1)
            rt.set_global_lock(torch.cat([sup["negative_prompt_embeds"].expand(count, -1, -1), keys]) if cfg else keys)
            out = pipe(**embeds, **common)
        elif fast is not None:
            cfg = guidance > 1
            embeds = prompt_embeds(pipe, parsed.text, count, cfg, negative_prompt)
            pos, neg = embeds["prompt_embeds"], embeds["negative_prompt_embeds"]
            fast.prepare(torch.cat([neg, pos]) if cfg else pos, parsed.concepts)
            out = pipe(**embeds, **dict(common, num_images_per_prompt=1))
        else:
            out = pipe(prompt=parsed.text, negative_prompt=negative_prompt, **common)
    finally:
        if rt is not None:
            rt.set_global_lock(None)
            rt.activate(None)
    params = render_params(base, prompt, parsed.text, seed=seed, steps=steps, guidance=guidance, size=size,
                           negative_prompt=negative_prompt, global_lock=global_lock,
                           gates=gates)
    return RenderResult(out.images, parsed.text, parsed.concepts, params)


def render_params(base, prompt: str, text: str, *, seed: int, steps: int, guidance: float, size: int,
                  negative_prompt: str | None, global_lock: bool, gates: dict[str, tuple[float, float]]) -> dict:
    """What a rendered PNG records (its text chunks), so the image can be reproduced; `gates`: name -> (beta,
    tau) of every concept the prompt used. One function for render() and render_batch()."""
    rt = runtime_of(base.pipe)
    return {
        "prompt": prompt, "text": text, "seed": seed, "steps": steps, "guidance": guidance,
        "base": base.name, "base_digest": base.digest, "global_lock": global_lock, "size": size,
        "sampler": type(base.pipe.scheduler).__name__,
        "negative_prompt": negative_prompt or "",
        "concepts": {n: {"beta": b, "tau": t, "version": rt.concepts[n].metadata.get("version"),
                         "digest": rt.concepts[n].metadata.get("file_digest", "")} for n, (b, t) in gates.items()},
    }


def beta_grid(base, prompt: str, betas: list[float], *, concepts, covariance, **kw):
    """One image per beta (same seed) for every concept the prompt uses, labelled, in one row."""
    from PIL import Image, ImageDraw

    images = []
    names: list[str] = []
    for b in betas:
        res = render(base, prompt, concepts=concepts, covariance=covariance, **kw,
                     beta={n: b for n in _used(base, prompt, kw.get("with_names", ()), concepts, covariance)})
        names = res.concepts
        images.append((b, res.images[0]))
    w, h = images[0][1].size
    label_h = max(12, h // 8)
    grid = Image.new("RGB", (w * len(images), h + label_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, (b, img) in enumerate(images):
        grid.paste(img, (i * w, label_h))
        draw.text((i * w + 2, 1), f"beta={b:.2f}", fill="black")
    return grid, names


def _used(base, prompt, with_names, concepts, covariance) -> list[str]:
    ensure_loaded(base, list(concepts), covariance)
    return parse_prompt(prompt, known_concepts(runtime_of(base.pipe)), list(with_names)).concepts


def render_previews(base, concept: Concept, covariance: Covariance, stem: Path, *, count=2, steps=25, seed=0):
    res = render(base, f"a photo of {concept.trigger}", concepts=[concept], covariance=covariance, seed=seed,
                 steps=steps, count=count)
    paths = res.save(stem.with_name(stem.name + ".preview.png"))
    return paths
