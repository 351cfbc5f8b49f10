"""Load Perfusion concepts into a diffusers StableDiffusionPipeline or StableDiffusionXLPipeline, in the style of
`load_textual_inversion` / `load_lora_weights` + `set_adapters`.

    load_concepts(pipe, files, covariance=...)   add tokens + embeddings, install attn2 processors
    set_concept_params(pipe, name, beta=, tau=)  per-concept gate
    unload_concepts(pipe, names=None)            remove tokens and edits; with none left, the stock
                                                 processors are back and the pipeline is as before

Every concept is checked against the pipeline's base (family, digest, dimensions, layers) and against the
covariance (same caption corpus) before anything in the pipeline changes. The concept token goes into every
tokenizer of the pipeline (both for SDXL), with the concept's embedding for each text encoder; on SDXL the
pooled embedding follows the superclass-pooled policy (perfusion_hub.text, SuperclassPooled).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from perfusion_hub.bases import compute_digest
from perfusion_hub.concept import Concept, check_fits_base, load_concept
from perfusion_hub.covariance import Covariance
from perfusion_hub.errors import IncompatibleConcepts
from perfusion_hub.processor import (
    ConceptState,
    PerfusionRuntime,
    check_concepts_composable,
    cross_attention_modules,
)
from perfusion_hub.text import SuperclassPooled, TextEncoders


def runtime_of(pipe) -> PerfusionRuntime | None:
    return getattr(pipe.unet, "_pfx_runtime", None)


def loaded_concepts(pipe) -> list[str]:
    rt = runtime_of(pipe)
    return list(rt.concepts) if rt else []


def _as_covariance(covariance) -> Covariance:
    if isinstance(covariance, Covariance):
        return covariance
    if isinstance(covariance, str | os.PathLike):
        return Covariance.load(covariance)
    if isinstance(covariance, torch.Tensor):
        return Covariance(covariance.double(), base_digest="", corpus_digest="", count=0)
    raise TypeError("covariance must be a Covariance, a path to a covariance file, or a [D, D] tensor")


def load_concepts(
    pipe,
    concepts: Iterable[str | os.PathLike | bytes | Concept],
    *,
    covariance,
    base_name: str | None = None,
    compatible_bases: Iterable[str] = (),
    exact: bool | None = None,
    runtime_class: type[PerfusionRuntime] = PerfusionRuntime,
) -> list[str]:
    """Load concepts (files, bytes or Concept objects) into `pipe`; returns their names.

    `covariance` is the base's C (a Covariance, its file, or a tensor). All concepts of a pipeline share one
    C, so a later call with another covariance is refused (IncompatibleConcepts) while concepts are loaded:
    unload them first to switch (the concepts were trained against their C; silently keeping the old one,
    as before, or swapping it under them would both be wrong for one side). A copy of the same C (a
    Covariance with the same base and corpus digests, recomputed elsewhere) counts as the same, and the
    pipeline keeps its own.

    `exact`: compose several concepts with the exact projector (True) or the cheaper per-concept subtraction
    (False); it sets the mode of the whole pipeline, on a later call too. None keeps the current mode (exact
    for the first call).

    `runtime_class`: the runtime created for a pipeline that has none yet (a PerfusionRuntime subclass changes
    how key targets are formed: research variants, e.g. toyworld.ablations).

    A concept already loaded under the same name is replaced. Nothing in the pipeline changes unless every
    concept passes its checks; these include that the pipeline's concepts after the call can be composed
    with each other (fewer of them than the text encodings have dimensions, and no numerically dependent
    target inputs: errors name them).
    """
    items = [c if isinstance(c, Concept) else load_concept(c) for c in concepts]
    cov = _as_covariance(covariance)
    digest = compute_digest(pipe)
    layers = {p: m.to_k.out_features for p, m in cross_attention_modules(pipe.unet).items()}
    text = TextEncoders.of(pipe)
    for c in items:
        check_fits_base(c, base_name=base_name or "the pipeline's base", base_digest=digest, dim=text.dim,
                        layers=layers, compatible=set(compatible_bases), family=text.family, text_dims=text.widths)
    pooled_ids = {}
    if text.pooled:  # the superclass must be one token of the pooled encoder's tokenizer, to stand in for the concept
        for c in items:
            pooled_ids[c.trigger] = text.word_ids(c.superclass)[-1]
    rt = runtime_of(pipe)
    if rt is not None and not rt.uses_covariance(cov.matrix, (cov.base_digest, cov.corpus_digest)):
        raise IncompatibleConcepts(
            f"this pipeline's concepts ({', '.join(rt.concepts)}) were loaded with another covariance, and "
            "all concepts of a pipeline share one; pass the same covariance, or unload them first "
            "(unload_concepts) to load concepts with this one"
        )
    corpora = {c.metadata["corpus_digest"] for c in items} | ({rt.corpus_digest} if rt else set())
    if cov.corpus_digest:
        corpora.add(cov.corpus_digest)
    if len(corpora) > 1:
        raise IncompatibleConcepts(
            "these concepts were trained against covariances from different caption corpora "
            f"({', '.join(sorted(d[:19] for d in corpora))}); retrain them with one corpus"
        )
    triggers = [c.trigger for c in items]
    if len(set(triggers)) != len(triggers):
        raise IncompatibleConcepts(f"two concepts use the same token: {triggers}")
    if len({c.name for c in items}) != len(items):
        raise IncompatibleConcepts("the same concept name was given twice")
    new = {c.name: c.target_input for c in items}
    kept = {n: s.target_input for n, s in (rt.concepts.items() if rt else ()) if n not in new}
    check_concepts_composable(kept | new, cov.matrix)

    if rt is None:
        rt = runtime_class(pipe.unet, cov.matrix, exact=True if exact is None else exact,
                              gate_positions=getattr(pipe, "_pfx_gate_positions", "all"),
                              covariance_identity=(cov.base_digest, cov.corpus_digest))
        rt.corpus_digest = next(iter(corpora))
        rt.eos_id = pipe.tokenizer.eos_token_id
        rt.embeddings = SavedEmbeddings(pipe)  # put back by the last unload
        pipe.unet._pfx_runtime = rt
        rt.hook = pipe.text_encoder.register_forward_hook(_observe(rt), with_kwargs=True)
        if text.pooled:
            pipe._pfx_pooled = SuperclassPooled(pipe.text_encoder_2, pipe.tokenizer_2)
    replaced = [c.name for c in items if c.name in rt.concepts]
    if replaced:
        unload_concepts(pipe, replaced, _keep_runtime=True)
    taken = [c.trigger for c in items if text.in_vocab(c.trigger)]
    if taken:
        raise IncompatibleConcepts(f"token {taken[0]} is already in use by the tokenizer")
    if exact is not None:
        rt.set_exact(exact)
    add_tokens(pipe, [c.trigger for c in items], [c.embeddings() for c in items])
    for token, sup in pooled_ids.items():
        pipe._pfx_pooled.set(token, sup)
    for c, (target, superclass, values) in zip(items, _on_device(items, pipe.unet.device)):
        rt.add(ConceptState(
            name=c.name, token=c.trigger, token_id=pipe.tokenizer.convert_tokens_to_ids(c.trigger),
            target_input=target, superclass_input=superclass, value_targets=values,
            beta=c.beta, tau=c.tau, metadata=dict(c.metadata, file_digest=c.digest),
        ))
    rt.install()
    return [c.name for c in items]


def _on_device(items: list[Concept], device) -> list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
    """(i*, i_super, value targets) of each concept, fp32, on the UNet's device: one host-to-device copy for all
    of them, where per-tensor copies (every layer of every concept) would each wait for the device."""
    parts = [[c.target_input, c.superclass_input, *c.value_targets.values()] for c in items]
    flat = torch.cat([t.detach().reshape(-1).float().cpu() for p in parts for t in p]).to(device)
    out, pos = [], 0
    for c, p in zip(items, parts):
        views = []
        for t in p:
            views.append(flat[pos : pos + t.numel()].view(t.shape))
            pos += t.numel()
        out.append((views[0], views[1], dict(zip(c.value_targets, views[2:]))))
    return out


class SavedEmbeddings:
    """Each text encoder's token-embedding module, weight and config.vocab_size, to put back after tokens added
    to them (add_tokens) are removed again (remove_tokens: diffusers' unload_textual_inversion).

    Adding tokens resizes the module's weight and raises config.vocab_size (transformers); unloading them
    installs a new nn.Embedding (trainable, in training mode, viewing a storage that still holds the removed
    rows) and leaves config.vocab_size as it was raised. So every training run, and every load/unload of
    concepts, left the text encoder a little different (and a pipeline saved afterwards would not load:
    vocab_size != rows). put_back() reinstalls the module and weight saved here when unloading gave back as
    many rows: the same rows, since only the added tokens' rows were ever written, and unloading removed them.
    """

    def __init__(self, pipe):
        self.saved = [(te, te.get_input_embeddings(), te.get_input_embeddings().weight.data, te.config.vocab_size)
                      for te in (e.text_encoder for e in TextEncoders.of(pipe).encoders)]

    def put_back(self) -> None:
        for te, module, weight, vocab_size in self.saved:
            if te.get_input_embeddings().weight.shape != weight.shape:  # not what unloading gives: keep it
                continue
            module.weight.data = weight
            module.num_embeddings = weight.shape[0]
            te.set_input_embeddings(module)
            te.config.vocab_size = vocab_size


def add_tokens(pipe, tokens: list[str], embeddings: list) -> list[int]:
    """Add plain tokens to every tokenizer of the pipeline (what `unload_concepts` removes) and write their
    embedding rows; embeddings[i] is token i's vector, or its list of vectors, one per text encoder (SDXL).
    Returns the ids in the first tokenizer (TextEncoders.add_tokens)."""
    return TextEncoders.of(pipe).add_tokens(tokens, embeddings)[0]


def remove_tokens(pipe, tokens: list[str]) -> None:
    """Remove tokens (and their embedding rows) from every tokenizer / text encoder of the pipeline."""
    TextEncoders.of(pipe).remove_tokens(pipe, tokens)


def _observe(rt: PerfusionRuntime):
    def hook(module, args, kwargs, output):
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is not None:
            rt.observe_tokens(ids, output[0])

    return hook


def suspend(pipe):
    """Take the loaded concepts out of the way (their attention processors and text-encoder hook), for
    training against the bare base. Returns the function that puts them back as they were."""
    rt = runtime_of(pipe)
    if rt is None:
        return lambda: None
    rt.uninstall()
    rt.hook.remove()
    pooled = getattr(pipe, "_pfx_pooled", None)
    if pooled is not None:
        pooled.remove()

    def restore():
        rt.hook = pipe.text_encoder.register_forward_hook(_observe(rt), with_kwargs=True)
        if pooled is not None:
            pooled.attach()
        rt.refresh_token_ids(pipe.tokenizer)
        rt.install()

    return restore


def set_concept_params(pipe, name: str, *, beta: float | None = None, tau: float | None = None) -> None:
    rt = runtime_of(pipe)
    if rt is None or name not in rt.concepts:
        raise KeyError(f"concept {name!r} is not loaded")
    rt.set_gate(name, beta=beta, tau=tau)


def unload_concepts(pipe, names: Iterable[str] | None = None, *, _keep_runtime: bool = False) -> None:
    """Remove concepts (all by default). With none left, the pipeline is exactly as before loading."""
    rt = runtime_of(pipe)
    if rt is None:
        return
    names = list(rt.concepts) if names is None else list(names)
    tokens = [rt.concepts[n].token for n in names if n in rt.concepts]
    for n in names:
        rt.remove(n)
    pooled = getattr(pipe, "_pfx_pooled", None)
    if tokens:
        remove_tokens(pipe, tokens)
        rt.refresh_token_ids(pipe.tokenizer)
        if pooled is not None:
            pooled.drop(tokens)
    if not rt.concepts and not _keep_runtime:
        rt.uninstall()
        rt.hook.remove()
        rt.embeddings.put_back()
        del pipe.unet._pfx_runtime
        if pooled is not None:
            pooled.remove()
            del pipe._pfx_pooled
