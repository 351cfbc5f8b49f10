"""Per-row concept sets: each row of the UNet's text encodings edited by its own concepts and gates.

What lets images that use different concepts share one denoising batch (perfusion_hub.batch.render_batch): a
PerfusionRuntime given rows (activate_rows) edits each group of rows that share a concept set with that set's own
projector and gates, and leaves rows without concepts with the stock K/V. Kept apart from batch.py so that the
runtime (processor.py) can use it without importing the rendering side.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from perfusion_hub.edit import Basis, edited_projection


@dataclass(frozen=True)
class RowSet:
    """The concepts that edit one row of encoder_hidden_states, in order, each with its gate (beta, tau).
    Empty: the row is not edited. Hashable: rows with equal sets are edited together."""

    names: tuple[str, ...] = ()
    beta: tuple[float, ...] = ()
    tau: tuple[float, ...] = ()

    def __post_init__(self):
        if not (len(self.names) == len(self.beta) == len(self.tau)):
            raise ValueError("RowSet: names, beta and tau must have the same length")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"RowSet: a concept is named twice: {list(self.names)}")

    @classmethod
    def of(cls, gates: Mapping[str, tuple[float, float]] | None) -> RowSet:
        """From {name: (beta, tau)}, in the mapping's order."""
        gates = dict(gates or {})
        return cls(tuple(gates), tuple(float(b) for b, _ in gates.values()), tuple(float(t) for _, t in gates.values()))

    def __bool__(self) -> bool:
        return bool(self.names)


class RowPlan:
    """Per-row concept sets on one runtime (made by PerfusionRuntime.activate_rows, which the processors ask).

    Caches, per layer, the batch's edited K/V for the encoder_hidden_states object the pipeline passes at every
    step (a strong reference is held, so the key cannot be recycled), and bases and layer terms per concept
    set; everything is recomputed when the runtime's version moves (concepts, gates or weights changed)."""

    MAX_TERMS = 512  # (layer, concept set) entries kept

    def __init__(self, runtime, rows):
        self.rt = runtime
        sets = [r if isinstance(r, RowSet) else RowSet.of(r) for r in rows]
        unknown = sorted({n for r in sets for n in r.names if n not in runtime.concepts})
        if unknown:
            raise KeyError(f"concepts not loaded: {', '.join(unknown)}")
        for r in sets:
            if any(t <= 0 for t in r.tau):
                raise ValueError(f"tau must be positive (row with {', '.join(r.names)})")
        for names in {r.names for r in sets if len(r.names) > 1}:
            runtime.check_composable(list(names))
        if runtime.global_lock and any(sets):
            raise ValueError("global key-locking is not available with per-row concept sets")
        self.rows: tuple[RowSet, ...] = tuple(sets)
        self.groups: dict[RowSet, list[int]] = {}
        for i, r in enumerate(sets):
            if r:
                self.groups.setdefault(r, []).append(i)
        self._version = runtime.version
        self._kv: dict[str, tuple] = {}
        self._terms: OrderedDict = OrderedDict()
        self._bases: dict[tuple, Basis] = {}
        self._masks: tuple | None = None  # (encoder_hidden_states, {RowSet: (positions, gates_at)})

    def edits(self) -> bool:
        """Whether any row has a concept (if not, the stock processors run)."""
        return bool(self.groups)

    def _fresh(self) -> None:
        if self.rt.version != self._version:
            self._version = self.rt.version
            self._kv.clear()
            self._terms.clear()
            self._bases.clear()
            self._masks = None

    def basis(self, rs: RowSet, device) -> Basis:
        """The runtime's basis for these concepts (U, A, G depend on the set only) with this row's gates."""
        key = (rs, str(device))
        b = self._bases.get(key)
        if b is None:
            shared = self.rt.basis(list(rs.names), device)
            f32 = {"device": device, "dtype": torch.float32}
            b = Basis(shared.U, shared.A, shared.G, torch.tensor(rs.beta, **f32), torch.tensor(rs.tau, **f32))
            self._bases[key] = b
        return b

    def terms(self, path: str, attn, rs: RowSet, basis: Basis):
        key = (path, rs.names)
        hit = self._terms.get(key)
        if hit is None:
            hit = self._terms[key] = self.rt.layer_terms(path, attn, list(rs.names), basis)
            if len(self._terms) > self.MAX_TERMS:
                self._terms.popitem(last=False)
        return hit

    def _positions(self, ehs: torch.Tensor, rs: RowSet, sub: torch.Tensor):
        if self._masks is None or self._masks[0] is not ehs:
            self._masks = (ehs, {})
        masks = self._masks[1]
        if rs not in masks:
            masks[rs] = self.rt.positions(sub, list(rs.names))
        return masks[rs]

    def key_value(self, path: str, attn, ehs: torch.Tensor):
        """The batch's K/V at one layer: the stock projections, with each concept group's rows edited."""
        if ehs.shape[0] != len(self.rows):
            raise ValueError(f"per-row concept sets were given for {len(self.rows)} rows, but the UNet was called "
                             f"with {ehs.shape[0]} (with guidance, one set per negative and per positive row)")
        self._fresh()
        cacheable = not torch.is_grad_enabled()
        hit = self._kv.get(path)
        if cacheable and hit is not None and hit[0] is ehs:
            return hit[1], hit[2]
        key = value = None
        whole = len(self.groups) == 1 and len(next(iter(self.groups.values()))) == ehs.shape[0]
        if not whole:
            key, value = attn.to_k(ehs), attn.to_v(ehs)
        for rs, rows in self.groups.items():
            idx = torch.tensor(rows, device=ehs.device)
            sub = ehs if whole else ehs.index_select(0, idx)
            basis = self.basis(rs, ehs.device)
            wk_u, wv_u, o_k, o_v = self.terms(path, attn, rs, basis)
            pos, at = self._positions(ehs, rs, sub)
            override = self.rt.gate_override
            k = edited_projection(attn.to_k(sub), sub, basis, wk_u, o_k, gate_override=override, positions=pos,
                                  gates_at=at).to(ehs.dtype)
            v = edited_projection(attn.to_v(sub), sub, basis, wv_u, o_v, gate_override=override, positions=pos,
                                  gates_at=at).to(ehs.dtype)
            if whole:
                key, value = k, v
            else:
                key, value = key.index_copy(0, idx, k), value.index_copy(0, idx, v)
        if cacheable:
            self._kv[path] = (ehs, key, value)
        return key, value
