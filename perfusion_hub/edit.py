"""The gated rank-one edit of one projection (W_K or W_V of a cross-attention layer), in plain torch.

For text encodings e (any leading shape, last dim D) and concepts c with target inputs i*_c:

    s_c(e)  = (i*_c^T C^-1 e) / (i*_c^T C^-1 i*_c)
    out(e)  = W e - W P e + sum_c sigmoid((s_c(e) - beta_c) / tau_c) * o*_c

P is the C^-1-orthogonal projector onto span{i*_c}. Both P and the gates are written as matrices so
that one concept and N concepts run the same code:

    P e = U (A^T e)          exact:  C^-1 = L L^T, Q R = qr(L^T I*), U = L^-T Q, A = C^-1 U
                             approx: U = I*, A = C^-1 I* / E      (exact only for C^-1-orthogonal i*'s)
    s(e) = G^T e             G = C^-1 I* / E

so W P e = (e A)(W U)^T. All of this arithmetic runs in fp32 (or the caller's wider dtype) even when the
UNet runs in fp16/bf16: only W e itself uses the module's dtype, exactly as the stock processor does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from perfusion_hub.errors import IncompatibleConcepts

DEPENDENCE_TOL = 1e-4  # |R_jj| below this fraction of the largest |R_ii| means the i*'s are dependent


@dataclass
class Basis:
    """Layer-independent matrices for one set of concepts (all [D, N], fp32)."""

    U: torch.Tensor  # projector's column space
    A: torch.Tensor  # projector's read-out: P e = U (A^T e)
    G: torch.Tensor  # gate read-out: s(e) = G^T e
    beta: torch.Tensor  # [N]
    tau: torch.Tensor  # [N]


def inverse_and_root(covariance: torch.Tensor, ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """C^-1 and its Cholesky factor L (C^-1 = L L^T), computed in fp64.

    A tiny ridge (relative to the mean eigenvalue) keeps C positive definite when the corpus leaves a
    direction unexplored (e.g. padding positions that are nearly constant).
    """
    c = covariance.to(torch.float64)
    c = 0.5 * (c + c.T)
    d = c.shape[0]
    c = c + ridge * torch.trace(c) / d * torch.eye(d, dtype=c.dtype, device=c.device)
    chol_c = torch.linalg.cholesky(c)
    c_inv = torch.cholesky_inverse(chol_c)
    c_inv = 0.5 * (c_inv + c_inv.T)
    root = torch.linalg.cholesky(c_inv)
    return c_inv, root


def make_basis(
    targets: torch.Tensor,
    c_inv: torch.Tensor,
    root: torch.Tensor,
    beta: torch.Tensor,
    tau: torch.Tensor,
    *,
    exact: bool = True,
    dtype: torch.dtype = torch.float32,
    names: list[str] | None = None,
) -> Basis:
    """Build U, A, G for target inputs `targets` [N, D]. Refuses what check_composable refuses (its errors
    name the concepts when `names` are given)."""
    check_composable(targets, root, names)
    i_star = targets.to(torch.float64).T  # [D, N]
    cinv_i = c_inv @ i_star  # [D, N]
    energy = (i_star * cinv_i).sum(0)  # [N]
    if (energy <= 0).any():
        raise IncompatibleConcepts("a concept's target input has zero energy under C^-1")
    gate = cinv_i / energy
    n = i_star.shape[1]
    if not exact:  # the single-concept formula P e = sum_c s_c(e) i*_c, applied per concept
        u, a = i_star, gate
    else:
        q, _ = torch.linalg.qr(root.T @ i_star)  # whiten, orthonormalise
        u = torch.linalg.solve_triangular(root.T, q, upper=True)  # L^-T Q
        a = c_inv @ u
    to = {"dtype": dtype}
    return Basis(u.to(**to), a.to(**to), gate.to(**to), beta.to(**to).reshape(n), tau.to(**to).reshape(n))


def check_composable(targets: torch.Tensor, root: torch.Tensor, names: list[str] | None = None) -> None:
    """Refuse a set of concepts (target inputs `targets` [N, D], C^-1 = root root^T) whose edits cannot be
    composed, naming the concepts involved when `names` are given:

    - N >= D: the target inputs would span every D-dimensional encoding, so the projector is the identity and
      the edit removes the base's own output W e at every position (N > D are also dependent, but a QR of a
      D x N matrix only has D pivots to look at, so the dependence test below would miss them);
    - numerically linearly dependent target inputs (in the C^-1 geometry): the projector onto their span
      cannot tell the concepts apart. Named: the first concept whose i* lies in the span of the ones before
      it, and those of them it mostly consists of.
    """
    n, d = targets.shape
    label = list(names) if names is not None else [f"concept {k + 1}" for k in range(n)]
    if n >= d:
        raise IncompatibleConcepts(
            f"{n} concepts cannot be composed on a {d}-dimensional text encoder: at most {d - 1} (with {d} "
            "or more their target inputs span every encoding and the edit would remove the base's own "
            "output); compose fewer concepts"
        )
    if n < 2:
        return
    _, r = torch.linalg.qr(root.T.to(torch.float64) @ targets.to(torch.float64).T)  # whitened i*'s
    diag = r.diagonal().abs()
    small = (diag < DEPENDENCE_TOL * diag.max()).nonzero().flatten().tolist()
    if not small:
        return
    j = small[0]
    if j == 0:  # the first i* is ~0 next to the others
        raise IncompatibleConcepts(f"{label[0]}'s target input is (numerically) zero next to the others'; "
                                   "retrain it or compose it without them")
    # whitened i*_j = sum_k c_k whitened i*_k (k < j) up to R_jj: name the concepts with a real share of it
    coeff = torch.linalg.solve_triangular(r[:j, :j], r[:j, j : j + 1], upper=True).flatten()
    share = coeff.abs() * r[:j, :j].norm(dim=0)
    involved = [label[k] for k in range(j) if share[k] > 1e-3 * share.max()] + [label[j]]
    who = " and ".join(involved) if len(involved) <= 2 else ", ".join(involved[:-1]) + " and " + involved[-1]
    raise IncompatibleConcepts(
        f"{who} have (numerically) linearly dependent target inputs, so their edits cannot be separated; "
        "compose fewer concepts or retrain one of them"
    )


def gates(e32: torch.Tensor, basis: Basis) -> torch.Tensor:
    """sigmoid((s_c(e) - beta_c) / tau_c) for every position: [..., N]."""
    return torch.sigmoid((e32 @ basis.G - basis.beta) / basis.tau)


def similarity(e32: torch.Tensor, basis: Basis) -> torch.Tensor:
    return e32 @ basis.G


def edited_projection(
    base_out: torch.Tensor,
    e: torch.Tensor,
    basis: Basis,
    w_u: torch.Tensor,
    targets: torch.Tensor,
    *,
    gate_override: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    gates_at: torch.Tensor | None = None,
) -> torch.Tensor:
    """out(e) given base_out = W e (any dtype), w_u = W U [d, N] and targets o* [N, d] (fp32).

    Returns fp32; the caller casts to the module's dtype. `gate_override` ([N] or broadcastable) replaces
    the computed gates, which the property tests use to force a gate fully open or shut. `positions`
    ([B, L, 1], 0 or 1) leaves the positions where it is 0 unedited (bases that edit only a prompt's own tokens).
    `gates_at` ([B, L, N], 0 or 1) shuts concept n's gate where it is 0 (bases that gate a concept only in its
    own span of the prompt).
    """
    return edit_terms(base_out, e, basis.A, basis.G, basis.beta, basis.tau, w_u, targets, gate_override, positions,
                      gates_at)


def edit_terms(base_out, e, a, g, beta, tau, w_u, targets, gate_override=None, positions=None,
               gates_at=None) -> torch.Tensor:
    """The same as edited_projection on plain tensors (what a compiled UNet traces without Python objects)."""
    e32 = e.to(g.dtype)
    coeff = e32 @ a  # [..., N]
    gate = torch.sigmoid((e32 @ g - beta) / tau) if gate_override is None else \
        gate_override.to(e32.dtype).expand_as(coeff)
    if gates_at is not None:
        gate = gate * gates_at
    edit = gate @ targets - coeff @ w_u.T
    if positions is not None:  # positions outside the prompt keep the base's output
        edit = edit * positions
    return base_out.to(e32.dtype) + edit


def apply_edit(
    weight: torch.Tensor,
    e: torch.Tensor,
    basis: Basis,
    targets: torch.Tensor,
    *,
    gate_override: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference form for one projection with weight [d, D]: everything in fp32."""
    w = weight.to(basis.U.dtype)
    return edited_projection(e.to(w.dtype) @ w.T, e, basis, w @ basis.U, targets, gate_override=gate_override)
