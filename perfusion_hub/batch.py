"""Many concepts in one batch: per-row concept sets, and render_batch (images with different concepts and
gates in one UNet batch).

A Perfusion concept at one cross-attention layer is a gated rank-one edit of the text K/V, and the edited K/V
of one row of encoder_hidden_states depend only on that row's text encodings and the concepts applied to it.
So every row of a batch can carry its own concept set, with its own gates, at the cost of one small edit per
group of rows that share a set, computed once per batch run (the text K/V do not change across steps):

    rt.activate_rows([RowSet.of({"cat-mittens": (0.7, 0.15)}), RowSet(), ...])   # one per UNet row
    with rt.rows_activated(rows): pipe(prompt_embeds=..., ...)

perfusion_hub.rows.RowPlan is that math. For each layer it takes the stock projections of the whole batch (W_K e, W_V e), and
for each group of rows with the same concept set and gates replaces those rows by the edit computed on them
alone, with the basis of exactly that group's concepts (the exact projector of a row depends on the row's
concepts only, never on the union of the batch). Rows without concepts keep the stock output bit for bit;
with no concept on any row the stock attention processors run, as in a plain pipeline.

render_batch renders RenderRequests (each its prompt, seed, count, concepts with their beta/tau, negative
prompt) in one batched denoising loop, and is defined to give each request what `render()` gives it alone:

- the same text encodings (each request's prompt and negative prompt are encoded on their own, as render does,
  once per distinct text in a batch);
- the same starting noise: each request's latents come from its own `torch.Generator("cpu")` seeded with its
  seed, drawn with the shape render draws ([count, C, h, w]), and are passed to the pipeline as `latents=`;
- the same edit: a request's concept set applies to both of its rows (the negative prompt's and the prompt's),
  as render() edits the whole CFG batch it runs: the concept edits the model, which then predicts both halves
  of the guidance. A request without concepts gets stock K/V on both rows.

What batching can still change is floating point blocking: CPU convolution and matmul kernels pick their
blocking by batch size, so a row's numbers in a batch of 16 can differ from the same row in a batch of 2 in
the last bits (measured on the toy base: ~1e-6 per UNet call, ~1e-5 in the final latents after a few steps,
at most 1 level in 8-bit pixels). Within one batch nothing crosses rows: a request's image does not depend on
the concepts other requests use (bit-identical), a request without concepts is bit-identical to the plain
pipeline run on the same batch, and a batch of one is bit-identical to render(). tests/engine/test_batch_render.py
proves each of these.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from perfusion_hub.errors import BadInput
from perfusion_hub.render import RenderResult, ensure_loaded, known_concepts, render_params
from perfusion_hub.rows import RowSet


@dataclass
class RenderRequest:
    """One entry of render_batch: what render() takes for one prompt (steps, guidance and size are the batch's)."""

    prompt: str
    seed: int = 0
    count: int = 1
    beta: dict[str, float] = field(default_factory=dict)
    tau: dict[str, float] = field(default_factory=dict)
    with_names: list[str] = field(default_factory=list)
    negative_prompt: str | None = None


@dataclass
class Prepared:
    """A request checked against the loaded concepts: its parsed prompt and the gate of every concept it uses."""

    request: RenderRequest
    parsed: object  # prompts.ParsedPrompt
    gates: dict[str, tuple[float, float]]  # name -> (beta, tau), in the prompt's order


def prepare(rt, request: RenderRequest) -> Prepared:
    """Parse a request's prompt against the loaded concepts and settle its gates as render() does (an explicit
    beta/tau, else the concept file's default). Raises BadInput for what render() refuses."""
    from perfusion_hub.prompts import parse_prompt
    if request.count < 1:
        raise BadInput("count must be at least 1")
    parsed = parse_prompt(request.prompt, known_concepts(rt), list(request.with_names))
    beta, tau = dict(request.beta or {}), dict(request.tau or {})
    unknown = sorted((set(beta) | set(tau)) - set(parsed.concepts))
    if unknown:
        raise BadInput(f"beta/tau for {', '.join(unknown)}, which the prompt does not use")
    gates = {}
    for name in parsed.concepts:
        s = rt.concepts[name]
        b = float(beta.get(name, float(s.metadata.get("beta", s.beta))))
        t = float(tau.get(name, float(s.metadata.get("tau", s.tau))))
        if t <= 0:
            raise BadInput(f"tau for {name} must be positive")
        gates[name] = (b, t)
    if len(gates) > 1:
        rt.check_composable(list(gates))
    return Prepared(request, parsed, gates)


def check_request(base, request: RenderRequest) -> list[str]:
    """Raise what render_batch would refuse for this request (BadInput), against the concepts loaded in `base`
    now, without rendering; returns the concepts it uses. Lets a caller name the bad entry before a batch runs."""
    from perfusion_hub.loaders import runtime_of

    return prepare(runtime_of(base.pipe), request).parsed.concepts


def initial_latents(pipe, count: int, seed: int, size: int, dtype) -> torch.Tensor:
    """The noise render() starts from for `count` images of `seed`: one CPU generator seeded with the seed,
    drawn with the pipeline's own latent shape and randn_tensor (as StableDiffusionPipeline.prepare_latents
    does; it then scales by the scheduler's init_noise_sigma, for passed latents too)."""
    from diffusers.utils.torch_utils import randn_tensor

    shape = (count, pipe.unet.config.in_channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
    return randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(int(seed)), device=pipe.device,
                        dtype=dtype)


@torch.no_grad()
def render_batch(
    base,
    requests: list[RenderRequest],
    *,
    concepts=(),
    covariance=None,
    steps: int = 50,
    guidance: float = 7.5,
    size: int | None = None,
    on_step: Callable[[int, int], None] | None = None,
    output_type: str = "pil",
) -> list:
    """Render every request in one batched denoising loop; one RenderResult per request, in order.

    Each request has its own prompt, seed, count, concepts (found in its prompt, or bound with with_names) and
    per-concept beta/tau; the same concept may carry different gates in different requests. `concepts` and
    `covariance` are loaded as render() loads them (kept loaded afterwards). `on_step(done, total)` is called
    after every denoising step. `output_type="latent"`: each result's images are its final latents
    ([C, h, w] tensors) instead of PIL images. See the module docstring for what "the same as render() alone"
    means.
    """
    from perfusion_hub.loaders import runtime_of
    if not requests:
        return []
    pipe = base.pipe
    ensure_loaded(base, list(concepts), covariance)
    rt = runtime_of(pipe)
    preps = [prepare(rt, r) for r in requests]
    size = size or base.resolution
    cfg = guidance > 1
    encoded: dict[str, torch.Tensor] = {}

    def encode(text: str, count: int) -> torch.Tensor:
        """[count, L, D] encodings of `text`, as encode_prompt makes them (each distinct text, negative prompts
        included, runs through the text encoder once per batch: the negative branch of encode_prompt encodes
        its text exactly as the prompt branch does)."""
        if text not in encoded:
            encoded[text] = pipe.encode_prompt(text, pipe.device, 1, False)[0]
        e = encoded[text]
        return e.repeat(1, count, 1).view(count, e.shape[1], -1)

    pos_rows, neg_rows, latents, sets = [], [], [], []
    for p in preps:
        n = p.request.count
        pos = encode(p.parsed.text, n)
        pos_rows.append(pos)
        if cfg:
            neg_rows.append(encode(p.request.negative_prompt or "", n))
        latents.append(initial_latents(pipe, n, p.request.seed, size, pos.dtype))
        sets += [RowSet.of(p.gates)] * n
    rows = (sets + sets) if cfg else sets  # the pipeline's CFG batch is [negatives..., positives...]
    call = {"prompt_embeds": torch.cat(pos_rows), "negative_prompt_embeds": torch.cat(neg_rows) if cfg else None,
            "latents": torch.cat(latents), "num_inference_steps": steps, "guidance_scale": guidance,
            "height": size, "width": size, "output_type": output_type}
    if on_step is not None:
        def step_end(_pipe, i, _t, kw):
            on_step(i + 1, steps)
            return kw

        call["callback_on_step_end"] = step_end
    if rt is not None and any(sets):
        with rt.rows_activated(rows):
            out = pipe(**call)
    else:
        out = pipe(**call)
    images = list(out.images)
    results, at = [], 0
    for p in preps:
        n = p.request.count
        params = render_params(base, p.request.prompt, p.parsed.text, seed=p.request.seed, steps=steps,
                               guidance=guidance, size=size, negative_prompt=p.request.negative_prompt,
                               global_lock=False, gates=dict(p.gates))
        results.append(RenderResult(images[at:at + n], p.parsed.text, list(p.parsed.concepts), params))
        at += n
    return results


def image_grid(images: list, *, columns: int | None = None, labels: list[str] | None = None, max_side: int = 0):
    """Images in a grid, row by row (columns: about sqrt(n) by default), with an optional caption under each;
    `max_side`: scale each cell down to at most this many pixels a side (0: as they are)."""
    from PIL import Image, ImageDraw

    if not images:
        raise ValueError("no images for a grid")
    cols = columns or max(1, int(len(images) ** 0.5 + 0.999999))
    cols = min(cols, len(images))
    w, h = images[0].size
    if max_side and max(w, h) > max_side:
        scale = max_side / max(w, h)
        w, h = max(1, round(w * scale)), max(1, round(h * scale))
    label_h = 14 if labels else 0
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * (h + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        x, y = (i % cols) * w, (i // cols) * (h + label_h)
        cell = img.convert("RGB")
        if cell.size != (w, h):
            cell = cell.resize((w, h))
        grid.paste(cell, (x, y))
        if labels:
            draw.text((x + 2, y + h + 1), str(labels[i])[: max(4, w // 6)], fill="black")
    return grid
