"""Training a Perfusion concept (spec/perfusion.md section 6).

What is learned: the concept token's input embedding and one value target o*_V per attn2 layer. Key
targets are locked to the superclass (o*_K = W_K i_super); i* follows an EMA of the concept token's
encoding (0.99 / 0.01, once per optimizer step over the whole effective batch, no gradient through it).
Nothing else has a gradient: every base weight is frozen.

Speed choices (the base and the UNet's own cost dominate): VAE latents of every photo and its flip are
computed once; the text encoder runs once per micro-batch on the distinct templates only; all sampling
(images, flips, templates, noise, timesteps) comes from one seeded CPU generator, so a run is
deterministic on CPU and a resumed run continues exactly where the checkpoint left off, given the same
number of CPU threads (torch.get_num_threads(): runs on 1 and on 2 threads differ in the last bits, since
reductions split their work by thread). A run leaves the pipeline as it found it (the text encoder's token
embeddings included: SavedEmbeddings), except that the base's weights are left frozen.
`fast=True` compiles the UNet, channels-last on CUDA, and gives its frozen convolutions a backward that computes
the input gradient alone as a transposed convolution (input_grad_convolutions), so no layout copies run around
cuDNN's calls in the backward; after CUDA_GRAPH_AFTER steps it records the whole step as a CUDA graph and replays it
(record_step), so the host no longer launches the step's kernels one by one.

Precision: in fp16 the loss is scaled dynamically (`_LossScale`) so that the small gradients flowing back
through the fp16 UNet do not underflow; fp32 and bf16 runs are not scaled (bf16 has fp32's range).

Target: what the base's UNet was trained to predict, read from its scheduler's `prediction_type`: "epsilon"
(the noise; SD1.x, SDXL, the toy base) or "v_prediction" (the velocity sqrt(a) noise - sqrt(1 - a) x0; SD2.x 768).
Training a v-prediction UNet towards the noise would teach the concept to produce wrong images, so any other
type ("sample", ...) is refused before training starts.

Families (perfusion_hub.text): the concept token gets one trainable input-embedding row per text encoder (SDXL:
`token_embedding` [768] and `token_embedding_2` [1280]), initialised from the superclass word's rows; the text
encodings, i_super and i* are the UNet's context (SDXL: the concatenated 2048-d penultimate states). SDXL's UNet
also takes `added_cond_kwargs`: the pooled embedding of the template with the SUPERCLASS word in place of the
concept token (the pooled policy of perfusion_hub.text; so no gradient reaches the embeddings through it), and the
time ids (H, W, 0, 0, H, W) at the base resolution, as the pipeline computes them by default.

Memory: the UNet is frozen but its backward still needs activations. `TrainConfig.gradient_checkpointing` None
(auto) starts without checkpointing and, on an out-of-memory error in a step (torch.OutOfMemoryError: CUDA, MPS), enables it
(`unet.enable_gradient_checkpointing()`: activations recomputed in the backward, ~1/3 more UNet compute) and
retries the step; a second one halves the micro-batch (down to 1). Nothing of the step had been applied, and the
noise and sampling plan do not depend on the micro-batch split, so a retried step computes what it would have
(up to summation order). True / False force it on / off.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import torch

from perfusion_hub.card import apply_card
from perfusion_hub.concept import (
    FORMAT,
    Concept,
    atomic_write_bytes,
    embedding_key,
    family_metadata,
    format_version_for,
    save_concept,
)
from perfusion_hub.covariance import Covariance
from perfusion_hub.errors import BadInput
from perfusion_hub.loaders import SavedEmbeddings, add_tokens, remove_tokens, suspend, unload_concepts
from perfusion_hub.photos import load_photos
from perfusion_hub.processor import ConceptState, PerfusionRuntime
from perfusion_hub.text import TextEncoders, time_ids

TEMPLATES = (
    "a photo of a {}",
    "a good photo of a {}",
    "the photo of a {}",
    "a good photo of the {}",
    "an image of a {}",
    "an image of the {}",
    "a photograph of {}",
    "a {} shown in a photo",
    "a photo of {}",
)


@dataclass
class TrainConfig:
    steps: int = 400
    batch_size: int = 16  # effective batch per optimizer step
    micro_batch: int = 0  # 0: the whole batch on GPU or for small bases, else 4 (CPU memory)
    lr_values: float = 0.03
    lr_embedding: float = 0.006
    # >0: after every step the token embedding's norm is capped at this multiple of the superclass word's embedding
    # norm; None: the base's own setting (pfx.json "embedding_norm"), else 0 (no cap: the paper's recipe)
    embedding_norm: float | None = None
    weight_decay: float = 0.0
    train_beta: float = 0.75
    train_tau: float = 0.1
    beta: float = 0.7  # inference defaults written into the concept
    tau: float = 0.15
    ema: float = 0.99
    flip: bool = True
    seed: int = 0
    checkpoint_every: int = 50
    previews: int = 2
    preview_steps: int = 25
    templates: tuple[str, ...] | None = None  # None: the base's own (pfx.json "templates"), else TEMPLATES
    gradient_checkpointing: bool | None = None  # None: auto (on after a CUDA out-of-memory error; module docstring)
    save_dtype: str | None = None  # concept file dtype; None: fp16 for SDXL (the <=180 KB file), else fp32


def concept_dtype(family: str, requested: str | None = None) -> str:
    """The dtype a concept file is written in: fp16 for SDXL (89,344 floats: ~175 KB instead of ~350 KB), fp32 for
    the single-encoder families (SD1.5: ~59 KB, SD2.x: ~62 KB)."""
    return requested or ("fp16" if family == "sdxl" else "fp32")


PREDICTION_TYPES = ("epsilon", "v_prediction")


class _LossScale:
    """Dynamic loss scaling for fp16 training (what torch.amp.GradScaler does, in plain tensor ops that run on
    every device, MPS included, with a state of two numbers that a checkpoint carries).

    Why: the UNet runs in fp16, and the gradient entering it is tiny (d mean(err^2) / d pred = 2 err / N, with
    N = 16 x 4 x 64 x 64 for SD1.5's batch: ~1e-5), so much of the backward pass underflows fp16 (below 6e-5
    it loses precision, below 6e-8 it is zero). The loss is multiplied by `scale` before backward and the
    gradients (of fp32 parameters) are divided by it before the optimizer step; the scale is a power of two,
    so both are exact. A step whose gradients hold inf or NaN (the scale was too high) is skipped and the
    scale halved; after GROWTH_INTERVAL good steps in a row it doubles. A skipped step changes nothing
    (parameters, i*, optimizer state) but uses up its part of the sampling plan. Disabled (fp32, bf16): no
    scaling, no checks, no host sync, so those runs compute exactly what they computed before scaling existed.
    """

    INIT = 2.0**16  # GradScaler's default: 2 err / N x 65536 is ~1 at SD1.5's batch
    GROWTH_INTERVAL = 200
    MIN = 1.0  # below this even unscaled fp16 gradients overflow: the forward itself does

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.scale = self.INIT if enabled else 1.0
        self.good_steps = 0

    def __call__(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    def unscale(self, grads: list[torch.Tensor | None]) -> bool:
        """Divide the (summed, all-reduced) gradients by the scale and update it; False: skip this step."""
        if not self.enabled:
            return True
        grads = [g for g in grads if g is not None]
        inv = 1.0 / self.scale
        for g in grads:
            g.mul_(inv)
        finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True
        if finite:
            self.good_steps += 1
            if self.good_steps >= self.GROWTH_INTERVAL:
                self.scale, self.good_steps = self.scale * 2, 0
        else:
            self.scale, self.good_steps = self.scale / 2, 0
            if self.scale < self.MIN:
                raise BadInput("fp16 training overflows even without loss scaling (the UNet's fp16 forward "
                               "gives inf or NaN); train with --dtype bf16 or fp32")
        return finite

    def state(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load(self, state: dict | None) -> None:
        if self.enabled and state:
            self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])


@dataclass
class TrainResult:
    concept: Concept
    path: Path
    previews: list[Path]
    losses: list[float]
    seconds: float
    warnings: list[str] = field(default_factory=list)


def check_superclass(tokenizer, superclass: str) -> int:
    """The superclass must be one token of the base's tokenizer; returns its id."""
    word = superclass.strip().lower()
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        pieces = [t.replace("</w>", "") for t in tokenizer.convert_ids_to_tokens(ids)]
        raise BadInput(
            f"superclass {superclass!r} is {len(ids)} tokens for this base ({' + '.join(pieces)}); "
            "choose a single-token word such as a plain noun (cat, dog, chair)"
        )
    return ids[0]


class EmbeddingOverride:
    """Forward hook on the token-embedding module: rows of `token_id` become the trainable vector."""

    def __init__(self, module, token_id: int, vector: torch.nn.Parameter):
        self.token_id, self.vector = token_id, vector
        self.ids: torch.Tensor | None = None
        self.pre = module.register_forward_pre_hook(self._remember)
        self.post = module.register_forward_hook(self._replace)

    def _remember(self, module, args):
        self.ids = args[0]

    def _replace(self, module, args, out):
        mask = (self.ids == self.token_id).unsqueeze(-1)
        return torch.where(mask, self.vector.to(out.dtype), out)

    def remove(self):
        self.pre.remove()
        self.post.remove()


def tokenize(tokenizer, prompts: list[str], device) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


@torch.no_grad()
def encode_latents(vae, photos, flip: bool, device, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Latent mean/std of every photo (and its mirror), plus masks at latent size."""
    import numpy as np

    pix, masks = [], []
    for p in photos:
        a = torch.from_numpy(np.asarray(p.image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        m = None if p.mask is None else torch.from_numpy(np.asarray(p.mask, dtype=np.float32) / 255.0)[None]
        pix.append(a)
        masks.append(m)
        if flip:
            pix.append(a.flip(-1))
            masks.append(None if m is None else m.flip(-1))
    x = torch.stack(pix).to(device, dtype)
    means, stds = [], []
    for chunk in x.split(8):
        dist = vae.encode(chunk).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    mean, std = torch.cat(means), torch.cat(stds)
    scale = vae.config.scaling_factor
    if any(m is not None for m in masks):
        full = torch.stack([torch.ones_like(pix[0][:1]) if m is None else m for m in masks])
        lat = torch.nn.functional.interpolate(full, size=mean.shape[-2:], mode="area").to(device)
    else:
        lat = None
    return mean * scale, std * scale, lat


def _checkpoint_meta(name, superclass, photos, cfg: TrainConfig, base_digest) -> dict:
    meta = {
        "name": name, "superclass": superclass, "base_digest": base_digest,
        "images": [p.digest for p in photos], "config": {k: v for k, v in asdict(cfg).items() if k != "previews"},
    }
    return json.loads(json.dumps(meta))  # as it will read back (tuples become lists)


@dataclass
class TrainingData:
    """What stays fixed for a whole run: the photos' latents (and mirrors'), their masks, the sampling plan,
    the superclass word's input embedding and its contextual encoding i_super, and the UNet's target type."""

    photos: list
    mean: torch.Tensor  # [images, C, h, w] scaled latent means
    std: torch.Tensor
    masks: torch.Tensor | None  # [images, 1, h, w] at latent size, or None
    plan: dict[str, torch.Tensor]  # "image", "template", "timestep": [steps, batch], on the device
    super_id: int
    i_super: torch.Tensor  # [D] fp32
    emb_init: torch.Tensor  # [D1] fp32: the superclass word's input embedding (first encoder): the token's start
    prediction: str  # "epsilon" or "v_prediction"
    emb_inits: list[torch.Tensor] = field(default_factory=list)  # the same for every text encoder (SDXL: 2)
    pooled: torch.Tensor | None = None  # [templates, P]: pooled embedding of each superclass template (SDXL)
    time_ids: torch.Tensor | None = None  # [1, 6] (SDXL)


def prepare_training(base, photos_dir: str | Path, superclass: str, cfg: TrainConfig, warn: Callable[[str], None]
                     ) -> TrainingData:
    """Check the inputs against the base and compute what a run keeps fixed (the base stays unchanged).

    i_super is the superclass word's contextual encoding averaged over the first step's prompts
    (spec/perfusion.md section 3); `cfg.templates` must be set."""
    pipe = base.pipe
    sched = pipe.scheduler
    text = TextEncoders.of(pipe)
    device = torch.device(base.device)
    super_ids = text.word_ids(superclass)
    super_id = super_ids[0]
    prediction = sched.config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES or (prediction == "v_prediction" and not hasattr(sched, "get_velocity")):
        raise BadInput(f"this base's scheduler says its UNet predicts {prediction!r}; training supports bases that "
                       f"predict {' or '.join(PREDICTION_TYPES)} (if the scheduler config is wrong, set its "
                       "prediction_type to what the UNet was trained for)")
    photos = load_photos(photos_dir, base.resolution, warn=warn)
    for m in (pipe.unet, pipe.vae, *(e.text_encoder for e in text.encoders)):
        m.requires_grad_(False)
        m.eval()
    mean, std, masks = encode_latents(pipe.vae, photos, cfg.flip, device, base.dtype)
    plan = sampling_plan(cfg, mean.shape[0], sched.config.num_train_timesteps)
    with torch.no_grad():
        sup_ids = text.tokenize([cfg.templates[i].format(superclass) for i in plan["template"][0].tolist()], device)
        at = [ids == sid for ids, sid in zip(sup_ids, super_ids)]
        if any(not torch.equal(a, at[0]) for a in at[1:]):
            raise BadInput("this base's tokenizers split the training prompts differently, so the concept token "
                           "would not stand at one position in both encodings; use templates of plain words")
        i_super = text.encode(sup_ids).float()[at[0]].mean(0)
        pooled = None
        if text.pooled:
            pooled = text.pooled_of(text.tokenize([t.format(superclass) for t in cfg.templates], device)).to(base.dtype)
    emb_inits = [e.weight[sid].detach().float().clone() for e, sid in zip(text.input_embeddings(), super_ids)]
    return TrainingData(photos, mean, std, masks, {k: v.to(device) for k, v in plan.items()}, super_id, i_super,
                        emb_inits[0], prediction, emb_inits, pooled,
                        time_ids(base.resolution, 1, device, base.dtype) if pooled is not None else None)


def base_defaults(cfg: TrainConfig, base) -> TrainConfig:
    """`cfg` with what it leaves to the base filled in: the training templates and the embedding norm cap (a base
    may ship its own, as the embedded toy base does; otherwise TEMPLATES and no cap)."""
    pipe = base.pipe
    if cfg.templates is None:
        cfg = replace(cfg, templates=tuple(getattr(pipe, "_pfx_templates", None) or TEMPLATES))
    if cfg.embedding_norm is None:
        cfg = replace(cfg, embedding_norm=float(getattr(pipe, "_pfx_embedding_norm", 0.0)))
    return cfg


def micro_batch(cfg: TrainConfig, base) -> int:
    """How many samples go through the UNet at once: cfg.micro_batch, or by default the whole batch of 16 on a GPU
    (and for small bases), 4 elsewhere; never more than the batch."""
    micro = cfg.micro_batch or (16 if torch.device(base.device).type == "cuda" or base.resolution <= 128 else 4)
    return max(1, min(micro, cfg.batch_size))


def denoising_loss(unet_fn, sched, data: TrainingData, now: dict[str, torch.Tensor], sl: slice, ehs: torch.Tensor,
                   noise: torch.Tensor, eps: torch.Tensor, dtype, channels_last: bool = False) -> torch.Tensor:
    """The (masked) diffusion loss of samples `sl` of a step whose sampling plan row is `now` ("image", "template",
    "timestep": [batch] each): their latents noised to their timesteps, the UNet's prediction against the noise or
    the velocity, as the base was trained."""
    idx, timesteps = now["image"][sl], now["timestep"][sl]
    latents = data.mean[idx] + data.std[idx] * eps
    noisy = sched.add_noise(latents, noise, timesteps).to(dtype)
    if channels_last:
        noisy = noisy.contiguous(memory_format=torch.channels_last)
    if data.pooled is None:
        pred = unet_fn(noisy, timesteps, ehs.to(dtype)).sample.float()
    else:  # SDXL: the superclass template's pooled embedding and the default time ids
        cond = {"text_embeds": data.pooled[now["template"][sl]].to(dtype),
                "time_ids": data.time_ids.expand(noisy.shape[0], -1).to(dtype)}
        pred = unet_fn(noisy, timesteps, ehs.to(dtype), added_cond_kwargs=cond).sample.float()
    target = noise if data.prediction == "epsilon" else sched.get_velocity(latents, noise, timesteps)
    err = (pred - target) ** 2
    if data.masks is None:
        return err.mean()
    m = data.masks[idx]
    return ((err * m).sum((1, 2, 3)) / (m.sum((1, 2, 3)) * err.shape[1]).clamp_min(1e-6)).mean()


def train_concept(
    base,
    photos_dir: str | Path,
    *,
    name: str,
    superclass: str,
    covariance: Covariance,
    out_path: str | Path,
    version: str = "0.1.0",
    config: TrainConfig | None = None,
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    progress: Callable[[int, int, float], None] | None = None,
    warn: Callable[[str], None] | None = None,
    license: str = "",
    description: str = "",
    fast: bool = False,
) -> TrainResult:
    """Train `name` from the photos in `photos_dir` on `base` (a perfusion_hub.bases.Base).

    Parameters:
        covariance: the base's C (perfusion_hub.covariance), computed over a caption corpus.
        out_path: where the concept file is written (atomically); previews go beside it.
        config: the recipe (TrainConfig; spec/perfusion.md section 6 defaults).
        checkpoint_path, resume: a checkpoint every `config.checkpoint_every` steps; `resume` continues the
            same run (same name, photos and settings) exactly where it stopped.
        progress: called after every reported step with (step, steps, loss).
        fast: compile the UNet (same math, fused kernels; for GPUs).

    Example:
        res = train_concept(load_base("toy"), "photos/", name="cat-mittens", superclass="cat",
                            covariance=C, out_path="cat-mittens.safetensors")
    """
    cfg = config or TrainConfig()
    t0 = time.perf_counter()
    pipe = base.pipe
    cfg = base_defaults(cfg, base)
    tok, unet, sched = pipe.tokenizer, pipe.unet, pipe.scheduler
    text = TextEncoders.of(pipe)
    device, dtype = torch.device(base.device), base.dtype
    warnings_seen: list[str] = []

    def _warn(msg):
        warnings_seen.append(msg)
        if warn:
            warn(msg)

    if covariance.base_digest and covariance.base_digest != base.digest:
        raise BadInput("the covariance was computed for another base; recompute it for this one")
    trigger = f"<{name}>"
    if text.in_vocab(trigger):
        raise BadInput(f"token {trigger} is already in the tokenizer (a concept of that name is loaded)")
    data = prepare_training(base, photos_dir, superclass, cfg, _warn)
    i_super = data.i_super
    micro = micro_batch(cfg, base)
    checkpointing = bool(cfg.gradient_checkpointing)
    was_checkpointing = bool(getattr(unet, "is_gradient_checkpointing", False))

    # concepts loaded in this pipeline (a render keeps them) must not take part: the training runtime below
    # would find their processors installed and never see its own concept
    restore = suspend(pipe)
    saved_embeddings = SavedEmbeddings(pipe)
    try:
        add_tokens(pipe, [trigger], [data.emb_inits])
    except BaseException:
        restore()
        raise
    rt = None
    hooks: list[EmbeddingOverride] = []
    restore_convs = None
    try:
        token_ids = text.token_ids(trigger)
        token_id = token_ids[0]
        all_template_ids = text.tokenize([t.format(trigger) for t in cfg.templates], device)
        template_ids = all_template_ids[0]
        positions = (template_ids == token_id).float().argmax(1)  # where the concept token sits, per template
        if any(not torch.equal((ids == tid).float().argmax(1), positions)
               for ids, tid in zip(all_template_ids[1:], token_ids[1:])):
            raise BadInput("this base's tokenizers place the concept token at different positions of the training "
                           "prompts; use templates of plain words")
        rows = torch.arange(len(cfg.templates), device=device)

        rt = PerfusionRuntime(unet, covariance.matrix, gate_positions=getattr(pipe, "_pfx_gate_positions", "all"))
        rt.eos_id = tok.eos_token_id
        pos_buffers: dict[int, tuple] = {}  # one per micro-batch size: a compiled UNet sees the same tensors
        values = {p: torch.nn.Parameter(a.to_v.weight.detach().float() @ i_super) for p, a in rt.layers.items()}
        embeddings = [torch.nn.Parameter(e.to(device)) for e in data.emb_inits]  # one per text encoder
        embedding = embeddings[0]
        state = ConceptState(name, trigger, token_id, i_super.clone(), i_super.clone(), values, cfg.train_beta,
                             cfg.train_tau)
        groups = [{"params": embeddings, "lr": cfg.lr_embedding},
                  {"params": list(values.values()), "lr": cfg.lr_values}]
        rt.add(state)
        rt.training = True
        rt.install()
        rt.activate([name])
        masks_all = rt.masks_from_ids(template_ids, [name])  # per template: edited positions, gate positions
        hooks = [EmbeddingOverride(module, tid, vec)
                 for module, tid, vec in zip(text.input_embeddings(), token_ids, embeddings)]
        world, rank = _world()
        # fast CUDA runs replay the step as a CUDA graph (record_step); fp16's loss scale decides on the host
        graphable = fast and device.type == "cuda" and world == 1 and dtype != torch.float16
        opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=device.type == "cuda",
                                capturable=graphable)
        gen = torch.Generator(device).manual_seed(cfg.seed)  # noise, drawn where it is used
        scaler = _LossScale(enabled=dtype == torch.float16)
        step, losses = 0, []
        ckpt_meta = _checkpoint_meta(name, superclass, data.photos, cfg, base.digest)
        ckpt = Path(checkpoint_path) if checkpoint_path else None
        if resume and ckpt and ckpt.exists():
            step, losses = _load_checkpoint(ckpt, ckpt_meta, values, embeddings, state, opt, gen, scaler)
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet_fn = unet
        channels_last = fast and device.type == "cuda"
        if fast:
            if channels_last:
                unet.to(memory_format=torch.channels_last)
            restore_convs = input_grad_convolutions(unet)
            unet_fn = _fast_unet(unet)
        # Reading a loss back waits for the GPU; on CUDA do it every few steps so the host keeps queueing.
        report_every = 10 if device.type == "cuda" else 1
        pending: list[torch.Tensor] = []

        def flush():
            for value in torch.stack(pending).tolist() if pending else []:
                losses.append(value)
                if progress:
                    progress(len(losses), cfg.steps, value)
            pending.clear()

        if cfg.batch_size % world:
            raise BadInput(f"batch size {cfg.batch_size} does not split evenly over {world} devices")
        share = cfg.batch_size // world  # this process's samples of every step: [rank*share, (rank+1)*share)
        params = [p for g in groups for p in g["params"]]
        caps = [cfg.embedding_norm * float(e.norm()) for e in data.emb_inits]
        lat_shape = (cfg.batch_size, *data.mean.shape[1:])
        auto_memory = cfg.gradient_checkpointing is None  # (only CUDA and MPS raise OutOfMemoryError)
        # A step reads its inputs from tensors that every step refills and writes into tensors that stay in place,
        # so that a step recorded as a CUDA graph (record_step) does the next step's work when it is replayed.
        # The whole batch's noise is drawn on every process (same generator), so N processes compute what one does.
        now = {k: v[0].clone() for k, v in data.plan.items()}  # this step's image, template, timestep per sample
        noise_all = torch.empty(lat_shape, device=device)
        eps_all = torch.empty(lat_shape, device=device)
        concept_enc = torch.zeros(text.dim, dtype=torch.float32, device=device)
        step_loss = torch.zeros((), device=device)

        def forward_backward():
            concept_enc.zero_()
            step_loss.zero_()
            for start in range(rank * share, (rank + 1) * share, micro):
                sl = slice(start, min(start + micro, (rank + 1) * share))
                b = sl.stop - sl.start
                tpl = now["template"][sl]
                enc_all = text.encode(all_template_ids)  # every template once: static shapes, no host sync
                with torch.no_grad():
                    at_token = enc_all.detach().float()[rows, positions]  # [templates, D]
                    concept_enc.add_(at_token[tpl].sum(0))
                rt.freeze_terms([name], device)
                if rt.gate_positions != "all":
                    if b not in pos_buffers:
                        pos_buffers[b] = tuple(None if m is None else m.new_empty((b, *m.shape[1:]))
                                               for m in masks_all)
                    for buf, m in zip(pos_buffers[b], masks_all):
                        if m is not None:
                            buf.copy_(m[tpl])
                    rt.position_masks = pos_buffers[b]
                loss = denoising_loss(unet_fn, sched, data, now, sl, enc_all[tpl], noise_all[sl], eps_all[sl],
                                      dtype, channels_last)
                scaler(loss * (b / cfg.batch_size)).backward()
                step_loss.add_(loss.detach() * (b / cfg.batch_size))

        def update():
            if world > 1:  # scaled gradients: every process then sees the same inf/NaN and skips the same steps
                _all_reduce_sum([p.grad for p in params] + [concept_enc, step_loss])
            if scaler.unscale([p.grad for p in params]):  # fp16 overflow: this step changes nothing
                opt.step()
                with torch.no_grad():
                    for e, cap in zip(embeddings, caps):
                        if cap:
                            e.mul_((cap / e.norm()).clamp(max=1.0))
                    state.target_input.copy_(cfg.ema * state.target_input + (1 - cfg.ema) * concept_enc / cfg.batch_size)

        graph = None
        record_at = step + CUDA_GRAPH_AFTER if graphable and CUDA_GRAPH_AFTER is not None else -1
        while step < cfg.steps:
            for k, v in now.items():
                v.copy_(data.plan[k][step])
            torch.randn(lat_shape, generator=gen, device=device, out=noise_all)
            torch.randn(lat_shape, generator=gen, device=device, out=eps_all)
            if step == record_at:
                graph = record_step(lambda: (forward_backward(), update()), opt, _warn)
            if graph is not None:
                graph.replay()
            else:
                while True:  # one step; retried with less memory after an out-of-memory error (auto mode)
                    opt.zero_grad(set_to_none=True)
                    try:
                        forward_backward()
                        break
                    except torch.OutOfMemoryError:
                        if not auto_memory or (checkpointing and micro == 1):
                            raise
                    # here, outside the except block, the failed attempt's tensors (held by its traceback) are freed
                    opt.zero_grad(set_to_none=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    if not checkpointing:
                        checkpointing = True
                        unet.enable_gradient_checkpointing()
                        _warn(f"out of memory at micro-batch {micro}: training with gradient checkpointing")
                    else:
                        micro = max(1, micro // 2)
                        _warn(f"out of memory with gradient checkpointing: micro-batch {micro}")
                update()
            rt.touch()
            step += 1
            pending.append(step_loss.clone())
            if len(pending) >= report_every or step == cfg.steps:
                flush()
            if ckpt and (step % cfg.checkpoint_every == 0) and step < cfg.steps and rank == 0:
                flush()
                _save_checkpoint(ckpt, ckpt_meta, step, losses, values, embeddings, state, opt, gen, scaler)
    finally:
        for h in hooks:
            h.remove()
        if restore_convs is not None:
            restore_convs()
        if rt is not None:
            rt.uninstall()
        if checkpointing and not was_checkpointing:
            unet.disable_gradient_checkpointing()
        remove_tokens(pipe, [trigger])
        saved_embeddings.put_back()
        restore()

    meta = concept_metadata(name, version, superclass, trigger, base, covariance, cfg, data.photos, license,
                            description, step, losses)
    if checkpointing:
        meta["training"] = json.dumps(dict(json.loads(meta["training"]), gradient_checkpointing=True,
                                           micro_batch=micro), sort_keys=True)
    concept = Concept(
        metadata=meta,
        token_embedding=embedding.detach().float().cpu(),
        target_input=state.target_input.detach().float().cpu(),
        superclass_input=i_super.float().cpu(),
        value_targets={p: v.detach().float().cpu() for p, v in values.items()},
        extra_embeddings={embedding_key(k): e.detach().float().cpu() for k, e in enumerate(embeddings) if k},
    )
    out = Path(out_path)
    if _world()[1] != 0:  # data-parallel: every process holds the same concept; the first one writes
        return TrainResult(concept, out, [], losses, time.perf_counter() - t0, warnings_seen)
    save_concept(concept, out, dtype=concept_dtype(text.family, cfg.save_dtype))
    if ckpt and ckpt.exists():
        ckpt.unlink()
    previews = []
    if cfg.previews:
        from perfusion_hub.render import render_previews

        previews = render_previews(base, concept, covariance, out.with_suffix(""), count=cfg.previews,
                                   steps=cfg.preview_steps, seed=cfg.seed)
        unload_concepts(pipe, [name])  # the pipeline's loaded concepts are as before training
    return TrainResult(concept, out, previews, losses, time.perf_counter() - t0, warnings_seen)


def _world() -> tuple[int, int]:
    """(processes, this process's rank) when torch.distributed is running, else (1, 0)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum gradients and statistics over the processes in one flat all-reduce."""
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    pos = 0
    for t in tensors:
        t.copy_(flat[pos : pos + t.numel()].view_as(t))
        pos += t.numel()


def sampling_plan(cfg: TrainConfig, n_images: int, n_timesteps: int) -> dict[str, torch.Tensor]:
    """Which latent (photo or mirror), template and timestep every sample of every step uses, drawn
    from the seed up front ([steps, batch] each): a resumed run reads the same plan."""
    g = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.steps, cfg.batch_size)
    return {
        "template": torch.randint(len(cfg.templates), shape, generator=g),
        "image": torch.randint(n_images, shape, generator=g),
        "timestep": torch.randint(0, n_timesteps, shape, generator=g),
    }


class _InputGradConv2d(torch.autograd.Function):
    """conv2d of frozen weights whose backward computes the input gradient alone, as the transposed convolution of
    the channels-last output gradient.

    Why: torch's own convolution backward reaches cuDNN with the output gradient in whatever layout the compiled
    graph's tracing gave it (NCHW after group norms), and cuDNN's wrapper then copies it to channels-last before
    every call. As a transposed convolution in the graph, the layout change is one more graph operation that the
    compiler fuses into the kernel producing the gradient. Same math (the adjoint of the forward convolution)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.geometry = (stride, padding, dilation, groups, tuple(x.shape[-2:]))
        return torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, groups, size = ctx.geometry
        # the input rows and columns that the forward's striding left out come back as output padding
        extra = [size[i] - ((grad.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (weight.shape[2 + i] - 1)
                            + 1) for i in range(2)]
        grad = grad.contiguous(memory_format=torch.channels_last)
        dx = torch.nn.functional.conv_transpose2d(grad, weight, None, stride, padding, extra, groups, dilation)
        return dx, None, None, None, None, None, None


class _FrozenConv2d(torch.nn.Conv2d):
    def _conv_forward(self, input, weight, bias):
        return _InputGradConv2d.apply(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def input_grad_convolutions(module: torch.nn.Module) -> Callable[[], None]:
    """Make the frozen, zero-padded Conv2d modules of `module` compute their backward as _InputGradConv2d does
    (their forward is unchanged); returns the function that puts them back. Used by `fast=True` training."""
    convs = [m for m in module.modules() if type(m) is torch.nn.Conv2d and m.padding_mode == "zeros"
             and not isinstance(m.padding, str) and not m.weight.requires_grad
             and (m.bias is None or not m.bias.requires_grad)]
    for m in convs:
        m.__class__ = _FrozenConv2d

    def restore():
        for m in convs:
            m.__class__ = torch.nn.Conv2d

    return restore


CUDA_GRAPH_AFTER: int | None = 2  # steps a fast CUDA run takes (and compiles) before it records its step; None: never


def record_step(step_fn: Callable[[], None], opt: torch.optim.Optimizer, warn: Callable[[str], None]
                ) -> torch.cuda.CUDAGraph | None:
    """`step_fn` (a whole training step: forward, backward, optimizer update) recorded as one CUDA graph, whose
    replay launches all of the step's kernels at once: the host's speed then no longer sets the step's
    (bench/README.md, "Training on the H200"). Used by `fast=True` on CUDA after CUDA_GRAPH_AFTER ordinary steps.

    Recording runs nothing; a replay repeats the recorded kernels on the same memory, so `step_fn` must read its
    inputs from tensors refilled before every replay and update what it changes in place (`opt` capturable). The
    gradients are dropped first, so that the recorded backward allocates them in the graph's memory and every replay
    writes them anew. None (with a warning; the run goes on without the graph) if the step cannot be recorded,
    e.g. out of memory: the graph holds its own copy of the step's working memory."""
    opt.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()  # (entering the recording frees the ordinary steps' cached memory for it)
    try:
        with torch.cuda.graph(graph):
            step_fn()
    except RuntimeError as e:  # (torch.OutOfMemoryError included)
        opt.zero_grad(set_to_none=True)
        del graph
        torch.cuda.empty_cache()
        warn(f"could not record the training step as a CUDA graph ({str(e).splitlines()[0]}); training on without it")
        return None
    return graph


def _fast_unet(unet):
    """The compiled UNet used by `fast=True`: same math, fused kernels.

    PFX_COMPILE_BACKEND picks the torch.compile backend (default inductor). The CPU test uses `aot_eager`, which
    runs the same captured forward+backward graph without generating C++ kernels (inductor's CPU codegen takes
    minutes on 2 cores); inductor's numerics against the eager step are checked on the GPU by bench/engine.py.
    """
    import os

    return torch.compile(unet, dynamic=False, backend=os.environ.get("PFX_COMPILE_BACKEND", "inductor"))


def concept_metadata(name, version, superclass, trigger, base, cov, cfg, photos, license, description, step, losses):
    """The header metadata of a concept trained by `cfg` (spec/perfusion.md section 4)."""
    from perfusion_hub import __version__

    training = {
        "steps": step, "batch_size": cfg.batch_size, "lr_values": cfg.lr_values, "lr_embedding": cfg.lr_embedding,
        "weight_decay": cfg.weight_decay, "train_beta": cfg.train_beta, "train_tau": cfg.train_tau,
        "ema": cfg.ema, "flip": cfg.flip, "seed": cfg.seed, "embedding_norm": cfg.embedding_norm,
        "num_images": len(photos),
        "image_digests": [p.digest for p in photos], "masks": sum(p.mask is not None for p in photos),
        "final_loss": round(sum(losses[-10:]) / max(1, len(losses[-10:])), 6), "resolution": base.resolution,
    }
    text = TextEncoders.of(base.pipe)
    if text.pooled:
        training["pooled"] = "superclass"  # the pooled policy (perfusion_hub.text)
    return apply_card({  # with the card's ModelSpec defaults (title, trigger phrase, architecture...)
        **family_metadata(text.family, text.widths),
        "format": FORMAT, "format_version": format_version_for(text.family), "name": name, "version": version,
        "superclass": superclass, "trigger": trigger, "base_name": base.name, "base_digest": base.digest,
        "covariance_digest": cov.digest, "corpus_digest": cov.corpus_digest,
        "beta": repr(cfg.beta), "tau": repr(cfg.tau), "key_lock": "local", "training": json.dumps(training, sort_keys=True),
        "created": datetime.now(UTC).replace(microsecond=0).isoformat(), "license": license,
        "description": description, "pfx_version": __version__,
    })


def _embedding_name(k: int) -> str:
    return "embedding" if k == 0 else f"embedding_{k + 1}"


def _save_checkpoint(path: Path, meta, step, losses, values, embeddings, state, opt, gen, scaler: _LossScale):
    from safetensors.torch import save

    tensors = {f"value.{p}": v.detach().cpu() for p, v in values.items()}
    for k, e in enumerate(embeddings):
        tensors[_embedding_name(k)] = e.detach().cpu()
    tensors["target_input"] = state.target_input.detach().cpu()
    tensors["generator"] = gen.get_state()
    params = list(values.values()) + list(embeddings)
    for i, p in enumerate(params):
        st = opt.state.get(p, {})
        for k in ("exp_avg", "exp_avg_sq"):
            if k in st:
                tensors[f"opt.{i}.{k}"] = st[k].detach().cpu()
        if "step" in st:
            tensors[f"opt.{i}.step"] = torch.as_tensor(st["step"]).reshape(1).float().cpu()
    body = dict(meta, step=step, losses=losses)
    if scaler.enabled:
        body["loss_scale"] = scaler.state()
    atomic_write_bytes(path, save(tensors, metadata={"pfx_checkpoint": json.dumps(body)}))


def _load_checkpoint(path: Path, meta, values, embeddings, state, opt, gen, scaler: _LossScale):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        body = json.loads(f.metadata()["pfx_checkpoint"])
        if {k: body.get(k) for k in meta} != meta:
            raise BadInput(f"checkpoint {path} belongs to another run (name, photos or settings differ); "
                           "delete it or train without --resume")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    with torch.no_grad():
        for p, v in values.items():
            v.copy_(tensors[f"value.{p}"])
        for k, e in enumerate(embeddings):
            e.copy_(tensors[_embedding_name(k)])
    state.target_input = tensors["target_input"].float().to(embeddings[0].device)
    gen.set_state(tensors["generator"])
    scaler.load(body.get("loss_scale"))
    params = list(values.values()) + list(embeddings)
    on_device = bool(opt.defaults.get("fused") or opt.defaults.get("capturable"))
    for i, p in enumerate(params):
        if f"opt.{i}.exp_avg" in tensors:
            opt.state[p] = {
                # fused and capturable AdamW keep the step count beside the parameter, the others on the CPU
                "step": tensors[f"opt.{i}.step"].reshape(()).to(p.device if on_device else "cpu", copy=True),
                "exp_avg": tensors[f"opt.{i}.exp_avg"].to(p.device),
                "exp_avg_sq": tensors[f"opt.{i}.exp_avg_sq"].to(p.device),
            }
    return int(body["step"]), list(body["losses"])
