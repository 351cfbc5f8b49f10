"""The attention processor that applies Perfusion edits on every cross-attention module (`attn2`).

One `PerfusionRuntime` per UNet holds the concepts, the covariance and which concepts are active. A
`PerfusionAttnProcessor` on each attn2 asks the runtime for the edited K/V; with no active concept it
hands the call to the processor it replaced, so a prompt without concepts runs exactly the stock code
(bit-identical images). Self-attention (`attn1`) is never touched.

Which concepts are active: set explicitly (`runtime.activate([...])`, what `render` and the trainer do),
or detected from the token ids the text encoder last saw (so a plain `pipe("a photo of <cat-mittens>")`
works after `load_concepts`), or per row of the UNet batch (`runtime.activate_rows([...])` /
`rows_activated`: each row of encoder_hidden_states its own concept set and gates; perfusion_hub.batch holds
that math and render_batch, which renders images with different concepts in one batch).

At inference the edited text K/V are computed once per prompt and reused across denoising steps: the
pipeline passes the same `encoder_hidden_states` tensor at every step, so the cache is keyed by that
object (a strong reference is held, so the key cannot be recycled), by the runtime's version, which
any change of concepts, gates or weights bumps, and by the global key-locking state (`set_global_lock`), which
changes what the keys are for the same encodings. The cache is bypassed whenever gradients are enabled.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from perfusion_hub.edit import (
    Basis,
    check_composable,
    edit_terms,
    edited_projection,
    inverse_and_root,
    make_basis,
)
from perfusion_hub.errors import IncompatibleConcepts
from perfusion_hub.rows import RowPlan

GATE_POSITIONS = ("all", "prompt", "span")


def positions_from_ids(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[B, L] float mask of token ids [B, L]: 1 on each prompt's start token, words and first end-of-text token."""
    is_eos = (ids == eos_id)
    is_eos[:, -1] = True  # a truncated prompt ends at the last position
    first = is_eos.float().argmax(1)
    return (torch.arange(ids.shape[1], device=ids.device)[None] <= first[:, None]).float()


def cross_attention_modules(unet) -> dict[str, torch.nn.Module]:
    """attn2 module path -> module, in the UNet's module order."""
    from diffusers.models.attention_processor import Attention

    return {n: m for n, m in unet.named_modules() if isinstance(m, Attention) and m.is_cross_attention}


_FACTORS: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


_KEYS: dict[int, tuple] = {}  # id(tensor) -> (weak reference, version, key): a matrix is hashed once


def covariance_key(covariance: torch.Tensor) -> str:
    """sha1 of the covariance's fp64 bytes: which matrix a runtime was built with. Remembered per tensor object
    (until it is modified in place), so loading concepts does not re-hash a 768x768 (or 2048x2048) matrix."""
    import hashlib
    import weakref

    hit = _KEYS.get(id(covariance))
    if hit is not None and hit[0]() is covariance and hit[1] == covariance._version:
        return hit[2]
    key = hashlib.sha1(covariance.detach().cpu().double().contiguous().numpy().tobytes()).hexdigest()
    for k in [k for k, v in _KEYS.items() if v[0]() is None]:
        del _KEYS[k]
    _KEYS[id(covariance)] = (weakref.ref(covariance), covariance._version, key)
    return key


def _factor(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """C^-1 and its Cholesky root, cached by the covariance's bytes (a runtime is rebuilt whenever all
    concepts are unloaded; the factorisation of a 768x768 matrix need not be)."""
    key = covariance_key(covariance)
    if key not in _FACTORS:
        if len(_FACTORS) > 8:
            _FACTORS.pop(next(iter(_FACTORS)))
        _FACTORS[key] = inverse_and_root(covariance.detach().cpu().double().contiguous())
    return _FACTORS[key]


def check_concepts_composable(targets: dict[str, torch.Tensor], covariance: torch.Tensor) -> None:
    """edit.check_composable for concepts given as name -> target input i*, under this covariance (what
    load_concepts checks before it changes anything in the pipeline)."""
    if len(targets) < 2:
        return
    _, root = _factor(covariance)
    check_composable(torch.stack([t.detach().cpu().double() for t in targets.values()]), root, list(targets))


@dataclass
class ConceptState:
    """A concept as the runtime uses it. Tensors are fp32; value targets may be trainable Parameters."""

    name: str
    token: str
    token_id: int | None
    target_input: torch.Tensor  # i* [D]
    superclass_input: torch.Tensor  # i_super [D]
    value_targets: dict[str, torch.Tensor]  # attn2 path -> o*_V [d_l]
    beta: float
    tau: float
    metadata: dict[str, str] = field(default_factory=dict)


class PerfusionRuntime:
    def __init__(self, unet, covariance: torch.Tensor, *, exact: bool = True, gate_positions: str = "all",
                 covariance_identity: tuple[str, str] = ("", "")):
        """`covariance_identity`: the covariance's (base digest, corpus digest) if known (uses_covariance)."""
        if gate_positions not in GATE_POSITIONS:
            raise ValueError(f"gate_positions must be one of {GATE_POSITIONS}")
        self.unet = unet
        # "all": every one of the 77 positions may open a gate (the paper; spec section 2). "prompt": only the
        # prompt's own tokens (start, words, first end-of-text) are edited, for bases whose padding encodings copy
        # the last word: there the gates would open on ~70 padding positions. "span": as "prompt", and each
        # concept's gate opens only from its own token up to the next concept's token, for bases whose causal
        # text encoder carries one concept into the encodings of the words after it (the embedded toy base):
        # there a second concept's token would open the first one's gate as well. With one concept in the
        # prompt (as in training) "span" gates as "prompt" does after the concept's token.
        self.gate_positions = gate_positions
        # training sets masks_from_ids of its rows of text encodings; otherwise each row is found among the text
        # encoder's outputs (see positions)
        self.position_masks: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._observed: list[tuple[torch.Tensor, torch.Tensor]] = []  # (text encodings, their token ids)
        self._auto_positions: tuple | None = None
        self.eos_id: int | None = None  # the tokenizer's end-of-text id (set by load_concepts)
        self.layers = cross_attention_modules(unet)
        if not self.layers:
            raise IncompatibleConcepts("this UNet has no cross-attention modules to edit")
        self.c_inv, self.root = _factor(covariance)
        self.covariance_key, self.covariance_identity = covariance_key(covariance), tuple(covariance_identity)
        self.dim = self.c_inv.shape[0]
        self.exact = exact
        self.concepts: dict[str, ConceptState] = {}
        self.training = False
        self._key_states: torch.Tensor | None = None  # global key-locking: encodings with superclass words
        self.gate_override: torch.Tensor | None = None  # tests: force gates open/shut
        self._explicit: list[str] | None = None
        self._seen: list[str] = []
        self._unet_ran = True
        self.version = 0
        self._basis_cache: tuple | None = None
        self._layer_cache: dict[str, tuple] = {}
        self._kv_cache: dict[str, tuple] = {}
        self._originals: dict[str, object] = {}
        self._frozen: dict[str, tuple] = {}
        self._cinv_device: dict[str, torch.Tensor] = {}
        self.corpus_digest = ""
        self.hook = None  # the text encoder's pre-hook that feeds observe_tokens
        self._rows = None  # a perfusion_hub.rows.RowPlan while per-row concept sets are active

    # ---- concepts -------------------------------------------------------------------------------
    def add(self, state: ConceptState) -> None:
        if state.target_input.shape[0] != self.dim:
            raise IncompatibleConcepts(
                f"{state.name} has {state.target_input.shape[0]}-d encodings; the covariance is {self.dim}-d"
            )
        missing = set(self.layers) - set(state.value_targets)
        if missing:
            raise IncompatibleConcepts(f"{state.name} lacks value targets for {min(missing)}")
        self.concepts[state.name] = state
        self.touch()

    def remove(self, name: str) -> None:
        self.concepts.pop(name, None)
        if self._explicit is not None:
            self._explicit = [n for n in self._explicit if n != name]
        self.touch()

    def set_gate(self, name: str, *, beta: float | None = None, tau: float | None = None) -> None:
        c = self.concepts[name]
        if beta is not None:
            c.beta = float(beta)
        if tau is not None:
            if tau <= 0:
                raise ValueError("tau must be positive")
            c.tau = float(tau)
        self.touch()

    def set_exact(self, exact: bool) -> None:
        """Compose several concepts with the exact projector (True) or the per-concept subtraction (False)."""
        if bool(exact) != self.exact:
            self.exact = bool(exact)
            self.touch()

    def uses_covariance(self, covariance: torch.Tensor, identity: tuple[str, str] = ("", "")) -> bool:
        """Whether `covariance` is this runtime's C: the same matrix, or a copy with the same known (base
        digest, corpus digest), which spec section 5 makes interchangeable (recomputed elsewhere, only
        rounding differs)."""
        if all(identity) and tuple(identity) == self.covariance_identity:
            return True
        return covariance_key(covariance) == self.covariance_key

    def refresh_token_ids(self, tokenizer) -> None:
        """Token ids shift when another concept's token is removed from the tokenizer."""
        for c in self.concepts.values():
            c.token_id = tokenizer.convert_tokens_to_ids(c.token)

    def touch(self) -> None:
        """Invalidate every cache (concepts, gates, targets or weights changed)."""
        self.version += 1
        self._basis_cache = None
        self._layer_cache.clear()
        self._kv_cache.clear()

    # ---- global key-locking ---------------------------------------------------------------------
    @property
    def global_lock(self) -> bool:
        return self._key_states is not None

    @property
    def key_states(self) -> torch.Tensor | None:
        return self._key_states

    def set_global_lock(self, key_states: torch.Tensor | None) -> None:
        """Global key-locking (spec section 3) for encodings of `key_states`' shape: the keys of every
        position are W_K applied to `key_states` (the prompt's encodings with each concept token replaced by
        its superclass word); the values stay edited. None: local key-locking (the default). Cached text
        K/V are dropped, so the same encodings give the keys of the mode now set."""
        self._key_states = key_states
        self._kv_cache.clear()

    @contextmanager
    def global_locked(self, key_states: torch.Tensor):
        """set_global_lock(key_states) for the block; local key-locking again after it, however it ends."""
        self.set_global_lock(key_states)
        try:
            yield self
        finally:
            self.set_global_lock(None)

    # ---- activation -----------------------------------------------------------------------------
    def activate(self, names: list[str] | None) -> None:
        """Use exactly these concepts (None: detect them from the prompt's tokens). A set that cannot be
        composed is refused here (check_composable), before any UNet call."""
        if names is not None:
            unknown = [n for n in names if n not in self.concepts]
            if unknown:
                raise KeyError(f"concepts not loaded: {', '.join(unknown)}")
            names = list(dict.fromkeys(names))
            self.check_composable(names)
        self._explicit = names
        self._kv_cache.clear()

    def check_composable(self, names: list[str]) -> None:
        """Refuse (IncompatibleConcepts, naming them) concepts that cannot be composed: as many as the
        encodings have dimensions, or numerically dependent target inputs (edit.check_composable)."""
        if len(names) > 1:
            targets = torch.stack([self.concepts[n].target_input.detach().cpu().double() for n in names])
            check_composable(targets, self.root, names)

    def active(self) -> list[str]:
        return self._explicit if self._explicit is not None else self._seen

    # ---- per-row concept sets (perfusion_hub.batch) ---------------------------------------------
    def activate_rows(self, rows: list | None) -> None:
        """Give every row of the UNet's encoder_hidden_states its own concept set and gates: `rows` holds one
        perfusion_hub.rows.RowSet (or a {name: (beta, tau)} mapping; empty: no concept) per row, in batch order
        (with classifier-free guidance, [negative rows..., positive rows...]). While set, it replaces activate()'s
        single set for the whole batch; the rows are checked here (names loaded, tau > 0, each set composable),
        before any UNet call. None: back to activate()'s behaviour."""
        if rows is None:
            self._rows = None
            return
        self._rows = RowPlan(self, rows)

    @contextmanager
    def rows_activated(self, rows: list):
        """activate_rows(rows) for the block; the whole-batch behaviour again after it, however it ends."""
        self.activate_rows(rows)
        try:
            yield self
        finally:
            self.activate_rows(None)

    def row_plan(self):
        """The active perfusion_hub.rows.RowPlan, or None."""
        return self._rows

    def observe_tokens(self, input_ids: torch.Tensor, encodings: torch.Tensor | None = None) -> None:
        """Called after every text-encoder forward: remember which concept tokens the prompt holds (and, for
        gate_positions other than "all", the token ids behind these encodings)."""
        if self._unet_ran:
            self._seen = []
            self._observed = []
            self._unet_ran = False
        if encodings is not None and self.gate_positions != "all" and encodings.shape[:2] == input_ids.shape:
            self._observed.append((encodings.detach(), input_ids.detach()))
        present = set(torch.unique(input_ids).tolist())
        for name, c in self.concepts.items():
            if c.token_id in present and name not in self._seen:
                self._seen.append(name)

    # ---- math -----------------------------------------------------------------------------------
    def basis(self, names: list[str], device) -> Basis:
        key = (tuple(names), str(device))
        if self._basis_cache is not None and self._basis_cache[0] == key:
            return self._basis_cache[1]
        if len(names) == 1 and torch.device(device).type != "mps":
            b = self._single_basis(self.concepts[names[0]], device)
            self._basis_cache = (key, b)
            return b
        cs = [self.concepts[n] for n in names]
        targets = torch.stack([c.target_input.detach().cpu().double() for c in cs])
        beta = torch.tensor([c.beta for c in cs], dtype=torch.float64)
        tau = torch.tensor([c.tau for c in cs], dtype=torch.float64)
        b = make_basis(targets, self.c_inv, self.root, beta, tau, exact=self.exact, names=list(names))
        b = Basis(*(t.to(device) for t in (b.U, b.A, b.G, b.beta, b.tau)))
        self._basis_cache = (key, b)
        return b

    def _single_basis(self, c: ConceptState, device) -> Basis:
        """One concept: P e = s(e) i*, so U = i* and A = G = C^-1 i* / E (the exact projector for N = 1),
        computed in fp64 where i* lives (no host round trip while training moves i* every step)."""
        c_inv = self._cinv_device.get(str(device))
        if c_inv is None:
            c_inv = self._cinv_device.setdefault(str(device), self.c_inv.to(device))
        i = c.target_input.detach().to(device, torch.float64)
        ci = c_inv @ i
        g = (ci / (i @ ci)).float()[:, None]
        f32 = {"device": device, "dtype": torch.float32}
        # (filled on the device, not copied from the host: a training step recorded as a CUDA graph computes this)
        return Basis(i.float()[:, None], g, g, torch.full((1,), c.beta, **f32), torch.full((1,), c.tau, **f32))

    def layer_terms(self, path: str, attn, names: list[str], basis: Basis):
        """(W_K U, W_V U, O_K, O_V) for one layer, fp32. O_V stays differentiable during training."""
        key = tuple(names)
        cached = self._layer_cache.get(path)
        if cached is not None and cached[0] == key and not self.training:
            return cached[1]
        wk = attn.to_k.weight.detach().float()
        wv = attn.to_v.weight.detach().float()
        o_k = self.key_targets(path, wk, names)
        o_v = torch.stack([self.concepts[n].value_targets[path].to(wk.device).float() for n in names])
        terms = (wk @ basis.U, wv @ basis.U, o_k, o_v)
        if not self.training:
            self._layer_cache[path] = (key, terms)
        return terms

    def key_targets(self, path: str, wk: torch.Tensor, names: list[str]) -> torch.Tensor:
        """O_K [N, d] of one layer: key-locking, o*_K = W_K i_super, frozen (spec/perfusion.md section 3).

        The one place a subclass may change how keys are targeted (research variants such as trained keys in
        toyworld.ablations; pass the subclass to load_concepts(runtime_class=...))."""
        supers = torch.stack([self.concepts[n].superclass_input.detach().to(wk.device).float() for n in names])
        return supers @ wk.T

    def freeze_terms(self, names: list[str], device) -> None:
        """Training: compute every layer's terms once per forward, outside the UNet call.

        The processors then only read plain tensors, so a compiled UNet sees no Python-side math (no
        graph breaks, no recompiles when i* moves); O_V stays attached to its trainable parameters.
        """
        b = self.basis(names, device)
        self._frozen = {}
        for path, attn in self.layers.items():
            wk_u, wv_u, o_k, o_v = self.layer_terms(path, attn, names, b)
            self._frozen[path] = (b.A, b.G, b.beta, b.tau, wk_u, wv_u, o_k, o_v)

    def masks_from_ids(self, ids: torch.Tensor, names: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(edited positions [B, L, 1], where each concept's gate may open [B, L, N] or None) for token ids
        [B, L]; a row of -1 (encodings not found) is edited, and may open gates, everywhere."""
        unknown = (ids < 0).any(1, keepdim=True)
        edited = (positions_from_ids(ids, self.eos_id).bool() | unknown).float()[..., None]
        if self.gate_positions != "span":
            return edited, None
        tokens = torch.tensor([self.concepts[n].token_id for n in names], device=ids.device)
        hits = ids[..., None] == tokens  # [B, L, N]
        at = torch.arange(ids.shape[1], device=ids.device)[None, :, None]
        latest = torch.where(hits, at, -1).amax(-1).cummax(1).values  # the last concept token at or before j
        owner = torch.gather(ids, 1, latest.clamp_min(0))
        spans = (owner[..., None] == tokens) & (latest >= 0)[..., None]
        return edited, (spans | unknown[..., None]).float()

    def positions(self, ehs: torch.Tensor, names: list[str]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """masks_from_ids for these encodings; (None, None) for gate_positions "all" (every position).

        position_masks when they fit (training); otherwise each row of `ehs` is found among the text encoder's
        outputs since the last UNet run (pipelines only repeat and concatenate them, e.g. [negative, prompt])."""
        if self.gate_positions == "all":
            return None, None
        m = self.position_masks
        if m is not None and tuple(m[0].shape[:2]) == tuple(ehs.shape[:2]):
            return m
        hit = self._auto_positions
        if hit is not None and hit[0] is ehs and hit[1] == tuple(names):
            return hit[2]
        rows = []
        for row in ehs:
            found = next((t[j] for enc, t in self._observed for j in range(len(enc))
                          if enc.shape[1:] == row.shape and torch.equal(enc[j].to(row.dtype), row)), None)
            rows.append(found.to(ehs.device) if found is not None
                        else torch.full((ehs.shape[1],), -1, device=ehs.device))
        masks = self.masks_from_ids(torch.stack(rows), names)
        self._auto_positions = (ehs, tuple(names), masks)
        return masks

    def key_value(self, path: str, attn, ehs: torch.Tensor, names: list[str]):
        frozen = self._frozen.get(path) if self.training else None
        if frozen is not None:
            a, g, beta, tau, wk_u, wv_u, o_k, o_v = frozen
            pos, at = self.positions(ehs, names)
            key = edit_terms(attn.to_k(ehs), ehs, a, g, beta, tau, wk_u, o_k, None, pos, at).to(ehs.dtype)
            value = edit_terms(attn.to_v(ehs), ehs, a, g, beta, tau, wv_u, o_v, None, pos, at).to(ehs.dtype)
            return key, value
        cacheable = not self.training and not torch.is_grad_enabled()
        if cacheable:
            hit = self._kv_cache.get(path)
            if (hit is not None and hit[0] is ehs and hit[1] == (self.version, tuple(names))
                    and hit[4] is self._key_states):
                return hit[2], hit[3]
        basis = self.basis(names, ehs.device)
        wk_u, wv_u, o_k, o_v = self.layer_terms(path, attn, names, basis)
        override, (pos, at) = self.gate_override, self.positions(ehs, names)
        if self._key_states is not None and self._key_states.shape == ehs.shape:
            key = attn.to_k(self._key_states)
        else:
            key = edited_projection(attn.to_k(ehs), ehs, basis, wk_u, o_k, gate_override=override,
                                    positions=pos, gates_at=at).to(ehs.dtype)
        value = edited_projection(attn.to_v(ehs), ehs, basis, wv_u, o_v, gate_override=override,
                                  positions=pos, gates_at=at).to(ehs.dtype)
        if cacheable:
            self._kv_cache[path] = (ehs, (self.version, tuple(names)), key, value, self._key_states)
        return key, value

    # ---- installation ---------------------------------------------------------------------------
    def install(self) -> None:
        foreign = [p for p, a in self.layers.items()
                   if isinstance(a.processor, PerfusionAttnProcessor) and a.processor.runtime is not self]
        if foreign:  # stacking on it would leave this runtime's concepts unused (perfusion_hub.loaders.suspend)
            raise RuntimeError(f"{foreign[0]} already runs another Perfusion runtime's processor")
        for path, attn in self.layers.items():
            if isinstance(attn.processor, PerfusionAttnProcessor):
                continue
            self._originals[path] = attn.processor
            attn.set_processor(PerfusionAttnProcessor(self, path, attn.processor))

    def uninstall(self) -> None:
        for path, attn in self.layers.items():
            if isinstance(attn.processor, PerfusionAttnProcessor) and path in self._originals:
                attn.set_processor(self._originals[path])
        self._originals.clear()

    def installed(self) -> bool:
        return all(isinstance(a.processor, PerfusionAttnProcessor) for a in self.layers.values())


class PerfusionAttnProcessor:
    """Mirror of diffusers' AttnProcessor2_0 whose K/V come from the runtime's edit."""

    def __init__(self, runtime: PerfusionRuntime, path: str, original):
        self.runtime = runtime
        self.path = path
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        rt = self.runtime
        if not rt.training:
            rt._unet_ran = True
        plan = rt.row_plan()
        names = rt.active() if plan is None else None
        if encoder_hidden_states is None or (not names if plan is None else not plan.edits()):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        if plan is not None:  # each row its own concept set; rows without one get the stock K/V
            key, value = plan.key_value(self.path, attn, encoder_hidden_states)
        else:
            key, value = rt.key_value(self.path, attn, encoder_hidden_states, names)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                       is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
