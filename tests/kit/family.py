"""Small SDXL-shaped and SD2-shaped pipelines for CPU tests (random weights, seeded), and concepts for them.

Both use the toy base's tokenizer (every test word is one token). The SDXL one has two CLIP text encoders (64-d
CLIP-style, quick_gelu; 96-d OpenCLIP-style, gelu, with a 32-d projection: the pooled embedding) whose
penultimate states concatenate to a 160-d context; the second tokenizer pads with "!" as SDXL's does. Its UNet
has SDXL's layout: a plain first down block, transformer_layers_per_block (1, 2), linear projections, and
addition_embed_type "text_time" (6 time ids x 8 + 32 pooled = 80 inputs). The SD2 one has one 64-d
OpenCLIP-style encoder (gelu, pads with "!"), linear projections and a v-prediction scheduler. Images are 32x32.
"""

from __future__ import annotations

import copy
import json

import torch

from perfusion_hub.bases import EMBEDDED
from perfusion_hub.concept import FORMAT, Concept, family_metadata, format_version_for

TOY_TOKENIZER = EMBEDDED["toy"] / "tokenizer"


def _tokenizer(pad: str | None = None):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(TOY_TOKENIZER))
    if pad:
        tok.pad_token = pad
    return tok


def _text_config(tok, hidden: int, act: str, projection: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, hidden_act=act,
                          projection_dim=projection or hidden, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[8, 8, 8], down_block_types=["DownEncoderBlock2D"] * 3,
                         up_block_types=["UpDecoderBlock2D"] * 3, norm_num_groups=8, sample_size=32)


def _scheduler(prediction: str = "epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type=prediction)


SDXL_UNET = {
    "block_out_channels": (32, 64), "layers_per_block": 2, "sample_size": 8, "in_channels": 4, "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"), "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (2, 4), "use_linear_projection": True, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8, "transformer_layers_per_block": (1, 2), "projection_class_embeddings_input_dim": 80,
    "cross_attention_dim": 160, "norm_num_groups": 8,
}
SD2_UNET = {
    "block_out_channels": (32, 64), "layers_per_block": 1, "sample_size": 8, "in_channels": 4, "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "attention_head_dim": (2, 4), "use_linear_projection": True, "cross_attention_dim": 64, "norm_num_groups": 8,
}


def tiny_sdxl_pipe(seed: int = 0, dtype=torch.float32):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tok, tok2 = _tokenizer(), _tokenizer(pad="!")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        te = CLIPTextModel(_text_config(tok, 64, "quick_gelu"))
        te2 = CLIPTextModelWithProjection(_text_config(tok2, 96, "gelu", projection=32))
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = _vae()
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                                     unet=unet, scheduler=_scheduler(), force_zeros_for_empty_prompt=True,
                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu", dtype)


def tiny_sd2_pipe(seed: int = 0, dtype=torch.float32):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tok = _tokenizer(pad="!")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        te = CLIPTextModel(_text_config(tok, 64, "gelu"))
        unet = UNet2DConditionModel(**SD2_UNET)
        vae = _vae()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=_scheduler("v_prediction"), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu", dtype)


def as_base(pipe, name: str, location: str = "/nonexistent"):
    from perfusion_hub.bases import Base, BaseSpec

    return Base(BaseSpec("dir", location, name), pipe, "cpu", pipe.unet.dtype)


def small_covariance(base, n: int = 64):
    """C over the first n packaged captions (the test bases are random: n only needs to exceed a few dozen)."""
    from perfusion_hub.captions import corpus_digest, load_captions
    from perfusion_hub.covariance import estimate_for

    lines = load_captions()[:n]
    return estimate_for(base.pipe, lines, base_digest=base.digest, corpus_digest=corpus_digest(lines))


@torch.no_grad()
def synthetic_concept(base, cov, name: str, superclass: str, *, seed: int = 0, scale: float = 1.0,
                      target_shift: float = 0.3) -> Concept:
    """A concept of the base's family at its superclass initialisation, value targets and i* moved by a seeded random
    direction (what training produces, without training)."""
    from perfusion_hub.processor import cross_attention_modules
    from perfusion_hub.text import TextEncoders

    text = TextEncoders.of(base.pipe)
    g = torch.Generator().manual_seed(seed)
    sup_ids = text.word_ids(superclass)
    ids = text.tokenize([f"a photo of a {superclass}", f"an image of the {superclass}"], "cpu")
    i_super = text.encode(ids).float()[ids[0] == sup_ids[0]].mean(0)
    values = {}
    for path, attn in cross_attention_modules(base.pipe.unet).items():
        v = attn.to_v.weight.detach().float() @ i_super
        values[path] = v + scale * v.norm() * torch.randn(v.shape, generator=g) / v.numel() ** 0.5
    embs = [m.weight[i].detach().float().clone() for m, i in zip(text.input_embeddings(), sup_ids)]
    embs = [e + 0.1 * torch.randn(e.shape, generator=g) for e in embs]
    i_star = i_super + target_shift * i_super.norm() * torch.randn(i_super.shape, generator=g) / i_super.numel() ** 0.5
    meta = {
        **family_metadata(text.family, text.widths),
        "format": FORMAT, "format_version": format_version_for(text.family), "name": name, "version": "0.1.0",
        "superclass": superclass, "trigger": f"<{name}>", "base_name": base.name, "base_digest": base.digest,
        "covariance_digest": cov.digest, "corpus_digest": cov.corpus_digest, "beta": "0.7", "tau": "0.15",
        "key_lock": "local", "training": json.dumps({"synthetic": True, "seed": seed}),
        "created": "2026-01-01T00:00:00+00:00", "pfx_version": "test", "license": "", "description": "",
    }
    extra = {f"token_embedding_{k + 1}": e for k, e in enumerate(embs) if k}
    return Concept(meta, embs[0], i_star, i_super, values, extra_embeddings=extra)


def copy_pipe(pipe):
    return copy.deepcopy(pipe)
