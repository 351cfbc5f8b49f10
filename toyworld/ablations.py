"""What toyworld.quality compares Perfusion with: three ablations trained at the same budget and recipe.

  trained_keys    key targets o*_K trained like the values, instead of locked to W_K i_super;
  embedding_only  Textual-Inversion style: the token embedding alone, no edit;
  full_kv         Custom-Diffusion style: the embedding plus every attn2 to_k/to_v weight, no edit.

They run perfusion_hub.train's recipe (same data, sampling plan, noise, optimizer and learning rates) through
its public pieces (`prepare_training`, `denoising_loss`), in a loop of their own: the product's loop carries
no experiment. No checkpoints, data parallelism, compilation or loss scaling here (CPU fp32 or GPU bf16 runs).
`train_method("perfusion", ...)` is plain `train_concept`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from perfusion_hub.concept import Concept
from perfusion_hub.loaders import (
    SavedEmbeddings,
    add_tokens,
    load_concepts,
    remove_tokens,
    runtime_of,
    suspend,
    unload_concepts,
)
from perfusion_hub.processor import ConceptState, PerfusionRuntime, cross_attention_modules
from perfusion_hub.train import (
    EmbeddingOverride,
    TrainConfig,
    base_defaults,
    concept_metadata,
    denoising_loss,
    micro_batch,
    prepare_training,
    tokenize,
    train_concept,
)

METHODS = ("perfusion", "trained_keys", "embedding_only", "full_kv")
LR_KV = 2e-4  # full_kv: learning rate of the K/V weights


class TrainedKeysRuntime(PerfusionRuntime):
    """A runtime whose concepts' key targets are free per-layer vectors instead of W_K i_super."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trained_keys: dict[str, dict[str, torch.Tensor]] = {}  # concept -> attn2 path -> o*_K

    def key_targets(self, path, wk, names):
        locked = super().key_targets(path, wk, names)
        return torch.stack([self.trained_keys[n][path].to(wk.device).float() if n in self.trained_keys else locked[i]
                            for i, n in enumerate(names)])


@dataclass
class MethodResult:
    method: str
    concept: Concept  # the concept's tensors (for the ablations without an edit: value targets at their start)
    path: Path  # every learned tensor, as safetensors: what the method would have to store
    losses: list[float]
    seconds: float
    learned: dict[str, torch.Tensor] = field(default_factory=dict)  # trained keys or K/V weights


@torch.no_grad()
def swap_kv_weights(layers: dict, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Write {"<attn2 path>.to_k" / ".to_v": weight} into those layers; returns copies of what they held."""
    old = {}
    for k, w in weights.items():
        path, which = k.rsplit(".", 1)
        lin = getattr(layers[path], which)
        old[k] = lin.weight.detach().clone()
        lin.weight.copy_(w)
    return old


def train_method(method: str, base, photos_dir, *, name: str, superclass: str, covariance, out_path,
                 config: TrainConfig | None = None) -> MethodResult:
    """Train `name` by `method` on `base`; the base is left exactly as it was."""
    if method not in METHODS:
        raise ValueError(f"unknown training method {method!r}; one of {', '.join(METHODS)}")
    cfg = config or TrainConfig()
    if method == "perfusion":
        res = train_concept(base, photos_dir, name=name, superclass=superclass, covariance=covariance,
                            out_path=out_path, config=replace(cfg, previews=0))
        return MethodResult(method, res.concept, res.path, res.losses, res.seconds)
    t0 = time.perf_counter()
    pipe = base.pipe
    cfg = base_defaults(cfg, base)
    tok, te, sched = pipe.tokenizer, pipe.text_encoder, pipe.scheduler
    device, dtype = torch.device(base.device), base.dtype
    data = prepare_training(base, photos_dir, superclass, cfg, lambda msg: None)
    micro = micro_batch(cfg, base)
    trigger = f"<{name}>"
    layers = cross_attention_modules(pipe.unet)
    restore = suspend(pipe)
    embeddings = SavedEmbeddings(pipe)
    add_tokens(pipe, [trigger], [data.emb_init])
    rt = hook = None
    kv_saved: dict[str, torch.Tensor] = {}
    try:
        token_id = tok.convert_tokens_to_ids(trigger)
        template_ids = tokenize(tok, [t.format(trigger) for t in cfg.templates], device)
        positions = (template_ids == token_id).float().argmax(1)
        rows = torch.arange(len(cfg.templates), device=device)
        values = {p: torch.nn.Parameter(a.to_v.weight.detach().float() @ data.i_super) for p, a in layers.items()}
        embedding = torch.nn.Parameter(data.emb_init.to(device))
        state = ConceptState(name, trigger, token_id, data.i_super.clone(), data.i_super.clone(), values,
                             cfg.train_beta, cfg.train_tau)
        groups = [{"params": [embedding], "lr": cfg.lr_embedding}]
        if method == "trained_keys":
            rt = TrainedKeysRuntime(pipe.unet, covariance.matrix,
                                    gate_positions=getattr(pipe, "_pfx_gate_positions", "all"))
            rt.eos_id = tok.eos_token_id
            keys = {p: torch.nn.Parameter(a.to_k.weight.detach().float() @ data.i_super) for p, a in layers.items()}
            rt.trained_keys[name] = keys
            groups += [{"params": list(values.values()), "lr": cfg.lr_values},
                       {"params": list(keys.values()), "lr": cfg.lr_values}]
            rt.add(state)
            rt.training = True
            rt.install()
            rt.activate([name])
            masks_all = rt.masks_from_ids(template_ids, [name])
        elif method == "full_kv":
            kv_saved = {f"{p}.{w}": getattr(a, w).weight.detach().clone() for p, a in layers.items()
                        for w in ("to_k", "to_v")}
            kv = [getattr(a, w).weight for a in layers.values() for w in ("to_k", "to_v")]
            for w in kv:
                w.requires_grad_(True)
            groups.append({"params": kv, "lr": LR_KV})
        hook = EmbeddingOverride(te.get_input_embeddings(), token_id, embedding)
        opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
        gen = torch.Generator(device).manual_seed(cfg.seed)
        cap = cfg.embedding_norm * float(data.emb_init.norm())
        lat_shape = (cfg.batch_size, *data.mean.shape[1:])
        losses = []
        for step in range(cfg.steps):
            opt.zero_grad(set_to_none=True)
            concept_enc = torch.zeros(te.config.hidden_size, dtype=torch.float32, device=device)
            step_loss = torch.zeros((), device=device)
            noise_all = torch.randn(lat_shape, generator=gen, device=device)
            eps_all = torch.randn(lat_shape, generator=gen, device=device)
            now = {k: v[step] for k, v in data.plan.items()}  # this step's row of the sampling plan
            for start in range(0, cfg.batch_size, micro):
                sl = slice(start, min(start + micro, cfg.batch_size))
                b = sl.stop - sl.start
                tpl = now["template"][sl]
                enc_all = te(template_ids)[0]
                with torch.no_grad():
                    concept_enc += enc_all.detach().float()[rows, positions][tpl].sum(0)
                if rt is not None:
                    rt.freeze_terms([name], device)
                    if rt.gate_positions != "all":
                        rt.position_masks = tuple(None if m is None else m[tpl] for m in masks_all)
                loss = denoising_loss(pipe.unet, sched, data, now, sl, enc_all[tpl], noise_all[sl], eps_all[sl],
                                      dtype)
                (loss * (b / cfg.batch_size)).backward()
                step_loss += loss.detach() * (b / cfg.batch_size)
            opt.step()
            with torch.no_grad():
                if cap:
                    embedding.mul_((cap / embedding.norm()).clamp(max=1.0))
                state.target_input = cfg.ema * state.target_input + (1 - cfg.ema) * concept_enc / cfg.batch_size
            if rt is not None:
                rt.touch()
            losses.append(float(step_loss))
    finally:
        if hook is not None:
            hook.remove()
        if rt is not None:
            rt.uninstall()
        learned: dict[str, torch.Tensor] = {}
        if kv_saved:  # keep what was learned, give the base its weights back
            learned = {k: w.float().cpu() for k, w in swap_kv_weights(layers, kv_saved).items()}
            for a in layers.values():
                a.to_k.weight.requires_grad_(False)
                a.to_v.weight.requires_grad_(False)
        remove_tokens(pipe, [trigger])
        embeddings.put_back()
        restore()
    if method == "trained_keys":
        learned = {f"{p}.key_target": v.detach().float().cpu() for p, v in keys.items()}
    concept = Concept(
        metadata=concept_metadata(name, "0.1.0", superclass, trigger, base, covariance, cfg, data.photos, "",
                                  f"ablation: {method}", cfg.steps, losses),
        token_embedding=embedding.detach().float().cpu(), target_input=state.target_input.detach().float().cpu(),
        superclass_input=data.i_super.float().cpu(),
        value_targets={p: v.detach().float().cpu() for p, v in values.items()},
    )
    from safetensors.torch import save

    from perfusion_hub.concept import atomic_write_bytes

    stored = {"token_embedding": concept.token_embedding, **learned}
    if method == "trained_keys":
        stored.update({f"{p}.value_target": v for p, v in concept.value_targets.items()},
                      target_input=concept.target_input, superclass_input=concept.superclass_input)
    out = Path(out_path)
    atomic_write_bytes(out, save({k: v.contiguous() for k, v in stored.items()}))
    return MethodResult(method, concept, out, losses, time.perf_counter() - t0, learned)


class Loaded:
    """Puts one method's result into the pipeline for rendering (`with Loaded(base, cov, result):`), and takes
    it out again."""

    def __init__(self, base, cov, result: MethodResult):
        self.base, self.cov, self.result = base, cov, result
        self.saved: dict[str, torch.Tensor] = {}

    def __enter__(self):
        c, pipe, m = self.result.concept, self.base.pipe, self.result.method
        if m in ("perfusion", "trained_keys"):
            load_concepts(pipe, [c], covariance=self.cov,
                          runtime_class=TrainedKeysRuntime if m == "trained_keys" else PerfusionRuntime)
            if m == "trained_keys":
                rt = runtime_of(pipe)
                rt.trained_keys[c.name] = {k.rsplit(".", 1)[0]: v for k, v in self.result.learned.items()}
                rt.touch()
            return self
        self.embeddings = SavedEmbeddings(pipe)
        add_tokens(pipe, [c.trigger], [c.token_embedding])
        if m == "full_kv":
            self.saved = swap_kv_weights(cross_attention_modules(pipe.unet), self.result.learned)
        return self

    def __exit__(self, *exc):
        c, pipe, m = self.result.concept, self.base.pipe, self.result.method
        if m in ("perfusion", "trained_keys"):
            unload_concepts(pipe, [c.name])
            return
        if m == "full_kv":
            swap_kv_weights(cross_attention_modules(pipe.unet), self.saved)
        remove_tokens(pipe, [c.trigger])
        self.embeddings.put_back()
