"""The text side of a base: its tokenizers and text encoders as one object, shared by training, rendering, the
covariance estimate and the loaders, so that none of them branches on the model family.

Families (detected from the pipeline's components: `family_of`):

  sd1   one CLIP ViT-L text encoder (OpenAI CLIP, quick_gelu); the UNet's context is its last hidden state
        (after the final layer norm), 768-d. The embedded toy base is of this family (a small CLIP text
        encoder of the same kind, 128-d). Concept files: format v1, unchanged.
  sd2   one OpenCLIP ViT-H text encoder (gelu); the context is its last hidden state after the final layer norm
        (diffusers' SD2 text encoder has 23 layers: the original model's penultimate layer), 1024-d.
        768x768 models predict v (the scheduler's prediction_type; training follows it). Concept files: v2.
  sdxl  CLIP ViT-L (768) and OpenCLIP ViT-bigG (1280): the context is the concatenation of both encoders'
        penultimate hidden states (`hidden_states[-2]`, no final layer norm), 2048-d per token, exactly as
        `StableDiffusionXLPipeline.encode_prompt` builds it. The pooled (projected) bigG embedding and six time
        ids go to the UNet's `add_embedding`. Concept files: v2, with one token embedding per encoder.

For Perfusion a base is one D-dimensional text space: i*, i_super, the gates and the covariance C live in the
concatenated D-d space (2048 for SDXL; C computed jointly over both encoders), and the concept token is one
new token in every tokenizer, with one trained input-embedding row per encoder.

Pooled embedding (SDXL): computed from the prompt with every concept token replaced by its superclass word
("superclass pooled"). This is the key-locking-consistent choice: the pooled vector conditions the whole image
through the time embedding of every ResNet block, ungated and not local to the concept's tokens, so letting
the concept token move it would give the concept a global pathway that the gated rank-one edit cannot switch
off (a prompt's other words and the other concepts would feel it), and training would push identity into it
(the Textual-Inversion pathway that key-locking avoids). With the superclass pooled vector the concept acts
only through its gated K/V edit, as on SD1.x. Measured on a small random SDXL-shaped base (bench/sdxl_pooled.py,
bench/README.md "SDXL pooled embedding policy"): allowed to move, the pooled vector shifts by ~21% of its norm
(median over 12 prompts) once the bigG embedding is trained, the pooled path carries 4% of the concept's effect on
the UNet's prediction and 8% when training also flows through it, and the training loss gains nothing (within
0.5%). Training uses the superclass templates' pooled vectors;
rendering (also a plain `pipe(prompt)` call after `load_concepts`) gets them from `SuperclassPooled`, a forward hook
on text_encoder_2 that re-encodes the prompt with concept tokens replaced by their superclass tokens. The time
ids are the pipeline's defaults for the base resolution: (H, W, 0, 0, H, W).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from perfusion_hub.concept import FAMILIES, describe_family, embedding_key  # noqa: F401 (re-exported)
from perfusion_hub.errors import BadInput, BaseNotAvailable


def family_of(pipe) -> str:
    """"sdxl" when the pipeline has a second text encoder; "sd2" for an OpenCLIP text encoder (gelu activations;
    1024-d for SD2's ViT-H); "sd1" otherwise (OpenAI CLIP, quick_gelu: SD1.x and the toy base)."""
    if getattr(pipe, "text_encoder", None) is None:
        raise BaseNotAvailable("this pipeline has no (first) text encoder (an SDXL refiner?); pfx needs the base "
                               "model's text encoders")
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    cfg = pipe.text_encoder.config
    if getattr(cfg, "hidden_act", "quick_gelu") == "gelu" or cfg.hidden_size == 1024:
        return "sd2"
    return "sd1"


@dataclass
class Encoder:
    tokenizer: object
    text_encoder: object
    width: int
    penultimate: bool  # the UNet reads hidden_states[-2] (SDXL) instead of the last hidden state


class TextEncoders:
    """The (tokenizer, text encoder) pairs of a pipeline, in the order their encodings are concatenated."""

    def __init__(self, family: str, encoders: list[Encoder], pooled: bool = False):
        self.family = family
        self.encoders = encoders
        self.pooled = pooled  # the last encoder's projected output goes to the UNet's add_embedding (SDXL)

    @classmethod
    def of(cls, pipe) -> TextEncoders:
        family = family_of(pipe)
        if family == "sdxl":
            pairs = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
            return cls(family, [Encoder(t, e, int(e.config.hidden_size), True) for t, e in pairs], pooled=True)
        return cls(family, [Encoder(pipe.tokenizer, pipe.text_encoder, int(pipe.text_encoder.config.hidden_size),
                                    False)])

    @classmethod
    def single(cls, tokenizer, text_encoder, family: str = "sd1") -> TextEncoders:
        return cls(family, [Encoder(tokenizer, text_encoder, int(text_encoder.config.hidden_size), False)])

    # ---- shapes ---------------------------------------------------------------------------------
    @property
    def widths(self) -> list[int]:
        return [e.width for e in self.encoders]

    @property
    def dim(self) -> int:
        return sum(self.widths)

    @property
    def device(self):
        return self.encoders[0].text_encoder.device

    @property
    def tokenizer(self):
        return self.encoders[0].tokenizer

    def embedding_keys(self) -> list[str]:
        return [embedding_key(k) for k in range(len(self.encoders))]

    # ---- encoding -------------------------------------------------------------------------------
    def tokenize(self, prompts: list[str], device=None) -> list[torch.Tensor]:
        """Token ids [B, 77] per encoder (padded to the tokenizer's max length, truncated, as the pipelines do)."""
        device = device if device is not None else self.device
        return [e.tokenizer(prompts, padding="max_length", max_length=e.tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device) for e in self.encoders]

    def encode(self, ids: list[torch.Tensor], *, with_pooled: bool = False):
        """The UNet's context [B, L, D] for token ids per encoder (and, with_pooled, the pooled embedding [B, P]
        of a pooled family, else None)."""
        outs, pooled = [], None
        for e, i in zip(self.encoders, ids):
            if e.penultimate:
                out = e.text_encoder(i, output_hidden_states=True)
                outs.append(out.hidden_states[-2])
                if self.pooled and e is self.encoders[-1]:
                    pooled = out[0]
            else:
                outs.append(e.text_encoder(i)[0])
        enc = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return (enc, pooled) if with_pooled else enc

    def pooled_of(self, ids: list[torch.Tensor]) -> torch.Tensor | None:
        """The pooled embedding alone (SDXL: text_encoder_2's projected output)."""
        if not self.pooled:
            return None
        return self.encoders[-1].text_encoder(ids[-1])[0]

    # ---- tokens ---------------------------------------------------------------------------------
    def word_ids(self, word: str) -> list[int]:
        """The id of `word` in every tokenizer; it must be one token in each (BadInput names the pieces)."""
        out = []
        for k, e in enumerate(self.encoders):
            ids = e.tokenizer(word.strip().lower(), add_special_tokens=False).input_ids
            if len(ids) != 1:
                pieces = [t.replace("</w>", "") for t in e.tokenizer.convert_ids_to_tokens(ids)]
                which = "" if len(self.encoders) == 1 else f" (tokenizer {k + 1})"
                raise BadInput(
                    f"superclass {word!r} is {len(ids)} tokens for this base{which} ({' + '.join(pieces)}); "
                    "choose a single-token word such as a plain noun (cat, dog, chair)"
                )
            out.append(ids[0])
        return out

    def token_ids(self, token: str) -> list[int]:
        return [e.tokenizer.convert_tokens_to_ids(token) for e in self.encoders]

    def in_vocab(self, token: str) -> bool:
        return any(token in e.tokenizer.get_vocab() for e in self.encoders)

    def input_embeddings(self) -> list[torch.nn.Module]:
        return [e.text_encoder.get_input_embeddings() for e in self.encoders]

    def add_tokens(self, tokens: list[str], embeddings: list) -> list[list[int]]:
        """Add plain tokens to every tokenizer (what `remove_tokens` / `unload_textual_inversion` removes) and write
        their embedding rows; embeddings[i] is token i's vector (one encoder) or its list of vectors per encoder.

        One resize per encoder for all tokens, and no mean-resizing: the rows are overwritten at once, so sampling
        them from the old embeddings' distribution (transformers' default, slow on a 49k-token vocabulary) is waste.
        """
        per_token = [list(e) if isinstance(e, list | tuple) else [e] for e in embeddings]
        if any(len(v) != len(self.encoders) for v in per_token):
            raise ValueError(f"each token needs {len(self.encoders)} embedding(s), one per text encoder")
        out = []
        for k, e in enumerate(self.encoders):
            e.tokenizer.add_tokens(tokens)
            e.text_encoder.resize_token_embeddings(len(e.tokenizer), mean_resizing=False)
            ids = e.tokenizer.convert_tokens_to_ids(tokens)
            weight = e.text_encoder.get_input_embeddings().weight
            with torch.no_grad():
                weight[ids] = torch.stack([v[k].detach() for v in per_token]).to(weight.device, weight.dtype)
            out.append(ids)
        return out

    def remove_tokens(self, pipe, tokens: list[str]) -> None:
        """Remove tokens (and their embedding rows) from every tokenizer / text encoder. diffusers' unloading builds a
        new embedding module that requires grad; the frozen state of the one it replaces is kept."""
        frozen = [not m.weight.requires_grad for m in self.input_embeddings()]
        if len(self.encoders) == 1:
            pipe.unload_textual_inversion(tokens)  # exactly what SD1.x pipelines always did
        else:
            for e in self.encoders:
                pipe.unload_textual_inversion(tokens, tokenizer=e.tokenizer, text_encoder=e.text_encoder)
        for m, f in zip(self.input_embeddings(), frozen):
            if f:
                m.weight.requires_grad_(False)


def time_ids(size: int, batch: int, device, dtype=torch.float32) -> torch.Tensor:
    """SDXL's micro-conditioning as the pipeline computes it by default: original size = target size = (size, size),
    crop top-left (0, 0). Training photos are centre-cropped and resized to the base resolution, so this is also
    what a render at that resolution asks for."""
    return torch.tensor([[size, size, 0, 0, size, size]], device=device, dtype=dtype).expand(batch, -1)


def prompt_embeds(pipe, prompt: str, count: int, cfg: bool, negative_prompt: str | None) -> dict:
    """The pipeline's own prompt encoding as keyword arguments of its __call__ (prompt_embeds,
    negative_prompt_embeds, and for SDXL the pooled pair), so a render can pass encodings instead of text."""
    if getattr(pipe, "text_encoder_2", None) is None:
        pos, neg = pipe.encode_prompt(prompt, pipe.device, count, cfg, negative_prompt)
        return {"prompt_embeds": pos, "negative_prompt_embeds": neg}
    pos, neg, pooled, neg_pooled = pipe.encode_prompt(prompt=prompt, device=pipe.device, num_images_per_prompt=count,
                                                      do_classifier_free_guidance=cfg, negative_prompt=negative_prompt)
    return {"prompt_embeds": pos, "negative_prompt_embeds": neg, "pooled_prompt_embeds": pooled,
            "negative_pooled_prompt_embeds": neg_pooled}


class SuperclassPooled:
    """Forward hook on text_encoder_2 (SDXL) that applies the pooled-embedding policy: when the token ids hold a loaded
    concept's token, the pooled output (`text_embeds`) is replaced by that of the same ids with every concept token
    replaced by its superclass token. The hidden states (the UNet's context) are left alone, and prompts without
    concept tokens are not touched at all (the hook returns nothing)."""

    def __init__(self, text_encoder, tokenizer):
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.superclass: dict[str, int] = {}  # concept token -> its superclass word's id in this tokenizer
        self._busy = False
        self.handle = None
        self.attach()

    def attach(self) -> None:
        if self.handle is None:
            self.handle = self.text_encoder.register_forward_hook(self._hook, with_kwargs=True)

    def set(self, token: str, superclass_id: int) -> None:
        self.superclass[token] = superclass_id

    def drop(self, tokens) -> None:
        for t in tokens:
            self.superclass.pop(t, None)

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def substitute(self, ids: torch.Tensor) -> torch.Tensor | None:
        """`ids` with concept tokens replaced by their superclass tokens, or None when it holds none."""
        out = None
        for token, sup in self.superclass.items():
            tid = self.tokenizer.convert_tokens_to_ids(token)
            hit = ids == tid
            if hit.any():
                out = (ids if out is None else out).masked_fill(hit, sup)
        return out

    def _hook(self, module, args, kwargs, output):
        if self._busy:
            return None
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is None:
            return None
        sub = self.substitute(ids)
        if sub is None:
            return None
        self._busy = True
        try:
            pooled = module(sub)[0]
        finally:
            self._busy = False
        output["text_embeds"] = pooled
        return output
