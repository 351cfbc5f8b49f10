"""Engine helpers: synthetic concepts on the embedded toy base, photo folders (imports torch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from perfusion_hub.concept import FORMAT, FORMAT_VERSION, Concept
from perfusion_hub.train import TEMPLATES

TOY = Path(__file__).resolve().parents[2] / "perfusion_hub" / "data" / "toy"
needs_toy = pytest.mark.skipif(not (TOY / "unet").is_dir(), reason="the embedded toy base is not built yet")


@torch.no_grad()
def superclass_encoding(pipe, word: str) -> torch.Tensor:
    tok, te = pipe.tokenizer, pipe.text_encoder
    wid = tok(word, add_special_tokens=False).input_ids[0]
    ids = tok([t.format(word) for t in TEMPLATES], padding="max_length", max_length=77, return_tensors="pt").input_ids
    enc = te(ids.to(te.device))[0].float()
    return enc[ids.to(te.device) == wid].mean(0).cpu()


@torch.no_grad()
def synthetic_concept(base, cov, name: str, superclass: str, *, seed: int = 0, scale: float = 1.0,
                      version: str = "0.1.0", target_shift: float = 0.3) -> Concept:
    """A concept at its superclass initialisation, with value targets (and i*) moved by a seeded random
    direction: what training produces, without training."""
    g = torch.Generator().manual_seed(seed)
    i_super = superclass_encoding(base.pipe, superclass)
    from perfusion_hub.processor import cross_attention_modules

    values = {}
    for path, attn in cross_attention_modules(base.pipe.unet).items():
        v = attn.to_v.weight.detach().float().cpu() @ i_super
        values[path] = v + scale * v.norm() * torch.randn(v.shape, generator=g) / v.numel() ** 0.5
    wid = base.pipe.tokenizer(superclass, add_special_tokens=False).input_ids[0]
    emb = base.pipe.text_encoder.get_input_embeddings().weight[wid].detach().float().cpu()
    i_star = i_super + target_shift * i_super.norm() * torch.randn(i_super.shape, generator=g) / i_super.numel() ** 0.5
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "name": name, "version": version,
        "superclass": superclass, "trigger": f"<{name}>", "base_name": base.name, "base_digest": base.digest,
        "covariance_digest": cov.digest, "corpus_digest": cov.corpus_digest, "beta": "0.7", "tau": "0.15",
        "key_lock": "local", "training": json.dumps({"synthetic": True, "seed": seed}),
        "created": "2026-01-01T00:00:00+00:00", "pfx_version": "test", "license": "", "description": "",
    }
    return Concept(meta, emb + 0.1 * torch.randn(emb.shape, generator=g), i_star, i_super, values)


def photo_folder(folder: Path, n: int = 4, *, seed: int = 0, size=(80, 64)) -> Path:
    """Small synthetic photos: an orange disc on a blue background, moved per photo."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", size, (40 + 20 * i, 90, 200))
        d = ImageDraw.Draw(im)
        x = 8 + 6 * i + seed
        d.ellipse((x, 12, x + 30, 42), fill=(250, 140, 20))
        im.save(folder / f"photo{i}.png")
    return folder



def tiny_base(toy_base, dtype: torch.dtype, *, seed: int = 0, out_scale: float = 1 / 64):
    """A base made of the toy base's tokenizer and text encoder, a small random VAE and a small random UNet
    (seeded: every call gives the same weights), all in `dtype` on CPU: cheap to train in fp16 on a CPU.

    `out_scale` scales the UNet's output layer. The gradient entering the UNet's body is
    d mean(err^2) / d pred = 2 err / N times that layer's weights; N is 4 x 4 x 16 x 16 for a batch of 4 here
    and 16 x 4 x 64 x 64 (64x more) for SD1.5's batch, so with 1/64 the body sees gradients of SD1.5's
    magnitude: the ones fp16 loses.
    """
    import copy

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from perfusion_hub.bases import Base, BaseSpec

    src = toy_base.pipe
    cfg = dict(src.unet.config)
    cfg.update(block_out_channels=[8, 16], norm_num_groups=8, attention_head_dim=4,
               down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
               up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(cfg)
        vae = AutoencoderKL(block_out_channels=[8, 8, 8], down_block_types=["DownEncoderBlock2D"] * 3,
                            up_block_types=["UpDecoderBlock2D"] * 3, norm_num_groups=8, sample_size=64)
    with torch.no_grad():
        unet.conv_out.weight.mul_(out_scale)
        unet.conv_out.bias.mul_(out_scale)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=copy.deepcopy(src.text_encoder),
                                   tokenizer=copy.deepcopy(src.tokenizer), unet=unet,
                                   scheduler=DDIMScheduler.from_config(src.scheduler.config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.to("cpu", dtype)
    return Base(BaseSpec("dir", str(TOY), f"tiny-{str(dtype).split('.')[-1]}"), pipe, "cpu", dtype)
