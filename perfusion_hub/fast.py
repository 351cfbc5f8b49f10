"""Fast render mode: compiled UNet + CUDA graphs, with the concepts' text K/V as static buffers.

Perfusion edits only the cross-attention K/V of the text tokens, and those are constant for a whole
denoising run. So in fast mode they are computed once per prompt (eagerly, through the same
PerfusionRuntime math) into fixed buffers, and each attn2 module gets a lean processor that reads them.
The compiled UNet therefore contains no Perfusion logic at all, never recompiles when concepts or
prompts change (the buffers are refilled in place), and even skips the per-step to_k/to_v projections
that the stock pipeline repeats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from perfusion_hub.processor import PerfusionAttnProcessor, cross_attention_modules


class StaticKVAttnProcessor:
    """Cross-attention with K/V taken from buffers (filled per prompt by FastRenderer.prepare)."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor):
        self.key, self.value = key, value

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        batch, channels, height, width = hidden_states.shape if hidden_states.ndim == 4 else (None,) * 4
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        b = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        head_dim = self.key.shape[-1] // attn.heads
        query = query.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        key = self.key.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        value = self.value.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, key, value)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if batch is not None:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        return out / attn.rescale_output_factor


class FastRenderer:
    """Wraps a pipeline for fast renders of prompts that use concepts (batch shape fixed at creation)."""

    def __init__(self, pipe, *, batch: int = 2, cuda_graphs: bool = True):
        self.pipe = pipe
        self.layers = cross_attention_modules(pipe.unet)
        rt = getattr(pipe.unet, "_pfx_runtime", None)
        if rt is None:
            raise ValueError("load concepts before enabling the fast renderer")
        self.rt = rt
        seq = pipe.tokenizer.model_max_length
        dev, dt = pipe.unet.device, pipe.unet.dtype
        self.buffers = {p: (torch.zeros(batch, seq, a.to_k.out_features, device=dev, dtype=dt),
                            torch.zeros(batch, seq, a.to_v.out_features, device=dev, dtype=dt))
                        for p, a in self.layers.items()}
        self._saved = {p: a.processor for p, a in self.layers.items()}
        for p, a in self.layers.items():
            a.set_processor(StaticKVAttnProcessor(*self.buffers[p]))
        pipe.unet.to(memory_format=torch.channels_last)
        self._eager_unet = pipe.unet
        import os

        backend = os.environ.get("PFX_COMPILE_BACKEND", "inductor")
        mode = "reduce-overhead" if cuda_graphs and dev.type == "cuda" and backend == "inductor" else None
        pipe.unet = torch.compile(pipe.unet, mode=mode, fullgraph=True, dynamic=False, backend=backend)

    @torch.no_grad()
    def prepare(self, encoder_hidden_states: torch.Tensor, names: list[str]) -> None:
        """Fill the K/V buffers for this prompt's (CFG-concatenated) encodings and concepts."""
        self.rt.activate(names)
        for p, attn in self.layers.items():
            proc = self._saved[p]
            if isinstance(proc, PerfusionAttnProcessor) and names:
                k, v = self.rt.key_value(p, attn, encoder_hidden_states, names)
            else:
                k, v = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
            self.buffers[p][0].copy_(k)
            self.buffers[p][1].copy_(v)

    def close(self) -> None:
        self.pipe.unet = self._eager_unet
        for p, a in self.layers.items():
            a.set_processor(self._saved[p])
        self.rt.activate(None)
