"""Architecture facts derived from a diffusers UNet config, without building the model.

`attn2_widths_from_config(unet_config)` lists every cross-attention module (`attn2`) of a
`UNet2DConditionModel` by its diffusers module path, in `named_modules()` order (down blocks, then up
blocks, then the mid block, as the UNet registers them), with its K/V output width d_l. A Perfusion
concept stores one value target of width d_l per such module, so the concept size follows from this map
alone (spec section 8.7).

Supported: the SD1.x, SD2.x and SDXL UNets (`CrossAttnDownBlock2D` / `CrossAttnUpBlock2D`,
`UNetMidBlock2DCrossAttn`, int or per-block `layers_per_block` / `transformer_layers_per_block`: SDXL's [1, 2, 10]
with a plain first down block and 10 transformer layers in the mid block gives its 70 attn2 modules, 10 of width 640
and 60 of 1280, 83,200 in all). Other block types contribute no `attn2` (plain `DownBlock2D`/`UpBlock2D`); unknown
cross-attention block types are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

_CROSS_DOWN = {"CrossAttnDownBlock2D"}
_CROSS_UP = {"CrossAttnUpBlock2D"}
_PLAIN = {"DownBlock2D", "UpBlock2D", "AttnDownBlock2D", "AttnUpBlock2D", "ResnetDownsampleBlock2D",
          "ResnetUpsampleBlock2D"}


def _per_block(value, n: int, name: str) -> list[int]:
    if isinstance(value, int):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} entries for {n} blocks")
    if any(isinstance(v, (list, tuple)) for v in value):
        raise ValueError(f"{name}: nested per-layer lists are not supported")
    return [int(v) for v in value]


def load_unet_config(path: str | Path) -> dict:
    """A UNet config.json (a file, or a directory holding config.json or unet/config.json)."""
    p = Path(path)
    if p.is_dir():
        p = p / "unet" / "config.json" if (p / "unet" / "config.json").exists() else p / "config.json"
    return json.loads(p.read_text("utf-8"))


def attn2_widths_from_config(unet_config: dict) -> dict[str, int]:
    """{attn2 module path: K/V output width} for a UNet2DConditionModel config (no model built)."""
    cfg = unet_config
    channels = list(cfg["block_out_channels"])
    down = list(cfg.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
    up = list(cfg.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
    n = len(down)
    if len(channels) != n or len(up) != n:
        raise ValueError("block_out_channels, down_block_types and up_block_types differ in length")
    layers = _per_block(cfg.get("layers_per_block", 2), n, "layers_per_block")
    tlayers = _per_block(cfg.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block")
    rev_t = cfg.get("reverse_transformer_layers_per_block")
    rev_tlayers = _per_block(rev_t, n, "reverse_transformer_layers_per_block") if rev_t is not None else tlayers[::-1]
    rev_channels = channels[::-1]
    rev_layers = layers[::-1]

    out: dict[str, int] = {}
    for i, bt in enumerate(down):
        if bt in _CROSS_DOWN:
            for a in range(layers[i]):
                for t in range(tlayers[i]):
                    out[f"down_blocks.{i}.attentions.{a}.transformer_blocks.{t}.attn2"] = channels[i]
        elif bt not in _PLAIN:
            raise ValueError(f"unsupported down block type {bt!r}")
    for i, bt in enumerate(up):
        if bt in _CROSS_UP:
            for a in range(rev_layers[i] + 1):
                for t in range(rev_tlayers[i]):
                    out[f"up_blocks.{i}.attentions.{a}.transformer_blocks.{t}.attn2"] = rev_channels[i]
        elif bt not in _PLAIN:
            raise ValueError(f"unsupported up block type {bt!r}")
    mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid == "UNetMidBlock2DCrossAttn":
        for t in range(tlayers[-1]):
            out[f"mid_block.attentions.0.transformer_blocks.{t}.attn2"] = channels[-1]
    elif mid not in (None, "UNetMidBlock2D"):
        raise ValueError(f"unsupported mid block type {mid!r}")
    return out


def text_dim_from_config(unet_config: dict) -> int:
    """The text-encoding width the cross-attention consumes (768 for SD1.x, 1024 for SD2.x, 2048 for SDXL)."""
    d = unet_config.get("cross_attention_dim", 1280)
    if isinstance(d, (list, tuple)):
        if len(set(d)) != 1:
            raise ValueError("per-block cross_attention_dim is not supported")
        d = d[0]
    return int(d)


def concept_float_count(unet_config: dict, text_dims: list[int] | None = None) -> int:
    """Floats in a concept for this UNet: one token embedding per text encoder (`text_dims`; default one encoder
    as wide as the cross-attention input, as in v1), i* and i_super (text width each) and one value target per attn2.
    SD1.5: 3 x 768 + 12,480 = 14,784; SDXL (text_dims [768, 1280]): 2,048 + 2 x 2,048 + 83,200 = 89,344."""
    dim = text_dim_from_config(unet_config)
    dims = list(text_dims) if text_dims is not None else [dim]
    if sum(dims) != dim:
        raise ValueError(f"text encoder widths {dims} do not add up to the UNet's cross_attention_dim {dim}")
    return sum(dims) + 2 * dim + sum(attn2_widths_from_config(unet_config).values())
