"""Properties of the gated rank-one edit (spec/perfusion.md section 8, items 1-3) in plain torch."""

import pytest
import torch

from perfusion_hub.edit import apply_edit, gates, inverse_and_root, make_basis
from perfusion_hub.errors import IncompatibleConcepts

D, DL = 24, 10


def _setup(n=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(500, D, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, D, dtype=torch.float64)
    cov = x.T @ x / x.shape[0]
    c_inv, root = inverse_and_root(cov)
    i_star = torch.randn(n, D, generator=g, dtype=torch.float64)
    i_super = torch.randn(n, D, generator=g, dtype=torch.float64)
    w = torch.randn(DL, D, generator=g)
    return c_inv, root, i_star, i_super, w, g


def _basis(i_star, c_inv, root, exact=True, beta=0.7, tau=0.15):
    n = i_star.shape[0]
    return make_basis(i_star, c_inv, root, torch.full((n,), beta), torch.full((n,), tau), exact=exact)


@pytest.mark.parametrize("exact", [True, False])
def test_key_lock_gate_open_at_target_gives_superclass_key(exact):
    c_inv, root, i_star, i_super, w_k, _ = _setup(n=1)
    basis = _basis(i_star, c_inv, root, exact)
    o_k = (w_k.double() @ i_super.T).T.float()  # o*_K = W_K i_super
    out = apply_edit(w_k, i_star.float(), basis, o_k, gate_override=torch.ones(1))
    torch.testing.assert_close(out, o_k, rtol=1e-4, atol=1e-4)
    # and the plain projection does NOT give the superclass key: the lock is the edit's doing
    assert not torch.allclose(i_star.float() @ w_k.T, o_k, atol=1e-2)


def test_gate_shut_leaves_only_orthogonal_part():
    c_inv, root, i_star, _, w, g = _setup(n=2)
    basis = _basis(i_star, c_inv, root)
    e = torch.randn(7, D, generator=g, dtype=torch.float64)
    targets = torch.randn(2, DL, generator=g)
    out = apply_edit(w, e.float(), basis, targets, gate_override=torch.zeros(2))
    # reference: W (e - P e) with P the C^-1-orthogonal projector onto span{i*}, built independently
    m = i_star.T  # [D, 2]
    p = m @ torch.linalg.solve(m.T @ c_inv @ m, m.T @ c_inv)
    ref = (e - e @ p.T) @ w.double().T
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    # the orthogonal part is C^-1-orthogonal to every i*: W P e vanishes for e in the complement
    assert torch.allclose((e - e @ p.T) @ c_inv @ m, torch.zeros(7, 2, dtype=torch.float64), atol=1e-8)


def test_multi_concept_path_with_one_concept_equals_single_concept_formula():
    c_inv, root, i_star, _, w, g = _setup(n=1)
    e = torch.randn(5, 77, D, generator=g)
    e[0, 3] = i_star[0].float()  # one position exactly at the target
    targets = torch.randn(1, DL, generator=g)
    exact = apply_edit(w, e, _basis(i_star, c_inv, root, exact=True), targets)
    # the single-concept formula written out from the spec
    i = i_star[0]
    s = (e.double() @ (c_inv @ i)) / (i @ c_inv @ i)
    e_perp = e.double() - s[..., None] * i
    gate = torch.sigmoid((s - 0.7) / 0.15)
    ref = e_perp @ w.double().T + gate[..., None] * targets.double()
    torch.testing.assert_close(exact.double(), ref, rtol=1e-4, atol=1e-4)
    assert gate[0, 3] == pytest.approx(torch.sigmoid(torch.tensor((1 - 0.7) / 0.15)).item(), abs=1e-6)


def test_approximate_variant_matches_exact_only_for_orthogonal_targets():
    c_inv, root, i_star, _, w, g = _setup(n=2)
    e = torch.randn(9, D, generator=g)
    targets = torch.randn(2, DL, generator=g)
    ex = apply_edit(w, e, _basis(i_star, c_inv, root, True), targets, gate_override=torch.zeros(2))
    ap = apply_edit(w, e, _basis(i_star, c_inv, root, False), targets, gate_override=torch.zeros(2))
    assert (ex - ap).abs().max() > 1e-3  # generic i*'s: the approximation differs
    # make the second target C^-1-orthogonal to the first: now both agree
    a, b = i_star[0], i_star[1]
    b = b - (a @ c_inv @ b) / (a @ c_inv @ a) * a
    orth = torch.stack([a, b])
    ex = apply_edit(w, e, _basis(orth, c_inv, root, True), targets, gate_override=torch.zeros(2))
    ap = apply_edit(w, e, _basis(orth, c_inv, root, False), targets, gate_override=torch.zeros(2))
    torch.testing.assert_close(ex, ap, rtol=1e-4, atol=1e-4)


def test_dependent_targets_refused():
    c_inv, root, i_star, _, _, _ = _setup(n=1)
    dependent = torch.cat([i_star, 2.0 * i_star + 1e-9])
    for exact in (True, False):
        with pytest.raises(IncompatibleConcepts, match="linearly dependent"):
            _basis(dependent, c_inv, root, exact)


def test_per_concept_beta_tau_and_gate_values():
    c_inv, root, i_star, _, _, _ = _setup(n=2)
    beta, tau = torch.tensor([0.75, 0.4]), torch.tensor([0.1, 0.15])
    basis = make_basis(i_star, c_inv, root, beta, tau)
    gv = gates(i_star.float(), basis)  # row c = encoding i*_c
    assert gv[0, 0].item() == pytest.approx(torch.sigmoid(torch.tensor(2.5)).item(), abs=1e-5)  # 0.924
    assert gv[1, 1].item() == pytest.approx(torch.sigmoid(torch.tensor(0.6 / 0.15)).item(), abs=1e-5)


def test_half_precision_inputs_use_fp32_arithmetic():
    c_inv, root, i_star, _, w, g = _setup(n=1)
    basis = _basis(i_star, c_inv, root)
    e = (torch.randn(4, 77, D, generator=g) * 30).half()  # large activations overflow fp16 products
    targets = torch.randn(1, DL, generator=g)
    out = apply_edit(w.half(), e, basis, targets)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    ref = apply_edit(w.half().float(), e.float(), basis, targets)
    torch.testing.assert_close(out, ref)
