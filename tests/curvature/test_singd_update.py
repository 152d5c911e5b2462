"""Tests of the functional SINGD kernel: IKFAC fixed point, a dense step by hand, batch vs factor form, and a
cross-check against the structure operations of the reference package ``singd``."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch
from torch import Tensor

from kronfac.curvature.singd_update import (
    SINGDFactors,
    batch_inner,
    factor_inner,
    precondition,
    singd_step,
    update_factors,
)
from kronfac.curvature.structures import STRUCTURES, make_structure

PARAMS: dict[str, dict[str, int]] = {"block_diagonal": {"block_size": 3}, "hierarchical": {"k1": 3, "k2": 2}}


def spd(dim: int, low: float = 0.3, high: float = 2.0) -> Tensor:
    """A float64 SPD matrix with eigenvalues spread over [low, high]."""
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64))
    return q @ torch.diag(torch.linspace(low, high, dim, dtype=torch.float64)) @ q.T


def identity_factors(structure: str, d_i: int, d_o: int, dtype: torch.dtype = torch.float64) -> SINGDFactors:
    kw = PARAMS.get(structure, {})
    eye = [make_structure(structure, d, dtype=dtype, **kw) for d in (d_i, d_o)]
    zero = [make_structure(structure, d, dtype=dtype, fill="zeros", **kw) for d in (d_i, d_o)]
    return SINGDFactors(eye[0], eye[1], zero[0], zero[1])


@pytest.mark.parametrize("structure", ["dense", "lower_triangular", "upper_triangular"])
def test_ikfac_converges_to_damped_inverse(structure: str) -> None:
    """With fixed A and G, IKFAC's K K^T -> (A + λI)^{-1} and C C^T -> (G + λI)^{-1}."""
    d_i, d_o, damping = 5, 4, 0.1
    A, G = spd(d_i), spd(d_o)
    factors = identity_factors(structure, d_i, d_o)
    for _ in range(300):
        factors = singd_step(factors, a_factor=A, g_factor=G, damping=damping, alpha1=0.0, lr_cov=0.3, kfac_like=True)
    K, C = factors.K.to_dense(), factors.C.to_dense()
    eye_i, eye_o = torch.eye(d_i, dtype=torch.float64), torch.eye(d_o, dtype=torch.float64)
    torch.testing.assert_close(K @ K.T, torch.linalg.inv(A + damping * eye_i), rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(C @ C.T, torch.linalg.inv(G + damping * eye_o), rtol=1e-8, atol=1e-9)
    # IKFAC keeps no momenta; the one it would have had, ½ [K^T (A + λI) K - I], vanishes at the fixed point
    assert factors.m_K is None and factors.m_C is None
    assert (K.T @ (A + damping * eye_i) @ K - eye_i).abs().max() < 1e-9


def test_ikfac_diagonal_fixed_point() -> None:
    """Diagonal IKFAC converges to K_ii^2 = 1 / (A_ii + λ): Π keeps only the diagonal of K^T (A + λI) K."""
    A, damping = spd(6), 0.05
    factors = identity_factors("diagonal", 6, 1)
    for _ in range(300):
        factors = singd_step(
            factors,
            a_factor=A,
            g_factor=torch.ones(1, 1, dtype=torch.float64),
            damping=damping,
            alpha1=0.0,
            lr_cov=0.3,
            kfac_like=True,
        )
    k = factors.K.to_dense().diagonal()
    torch.testing.assert_close(k * k, 1.0 / (A.diagonal() + damping), rtol=1e-8, atol=1e-10)


def test_one_dense_singd_step_by_hand() -> None:
    """One dense SINGD step equals the DESIGN.md formula written out in float64."""
    d_i, d_o, N = 4, 3, 6
    lam, alpha1, beta1 = 1e-2, 0.5, 0.1
    K0 = torch.eye(d_i, dtype=torch.float64) + 0.1 * torch.randn(d_i, d_i, dtype=torch.float64)
    C0 = torch.eye(d_o, dtype=torch.float64) + 0.1 * torch.randn(d_o, d_o, dtype=torch.float64)
    mK0, mC0 = spd(d_i) * 0.1, spd(d_o) * 0.1
    a, g = torch.randn(N, d_i, dtype=torch.float64), torch.randn(N, d_o, dtype=torch.float64)
    A, G = a.T @ a / N, g.T @ g / N

    H_K, H_C = K0.T @ A @ K0, C0.T @ G @ C0
    mK = alpha1 * mK0 + 0.5 * (
        torch.trace(H_C) / d_o * H_K + lam * torch.trace(C0.T @ C0) / d_o * K0.T @ K0 - torch.eye(d_i)
    )
    mC = alpha1 * mC0 + 0.5 * (
        torch.trace(H_K) / d_i * H_C + lam * torch.trace(K0.T @ K0) / d_i * C0.T @ C0 - torch.eye(d_o)
    )
    K1, C1 = K0 - beta1 * K0 @ mK, C0 - beta1 * C0 @ mC

    dense = STRUCTURES["dense"]
    state = SINGDFactors(dense.from_dense(K0), dense.from_dense(C0), dense.from_dense(mK0), dense.from_dense(mC0))
    for new in (
        singd_step(state, a=a, g=g, damping=lam, alpha1=alpha1, lr_cov=beta1),
        singd_step(state, a_factor=A, g_factor=G, damping=lam, alpha1=alpha1, lr_cov=beta1),
    ):
        for got, expected in zip(new, (K1, C1, mK, mC)):
            torch.testing.assert_close(got.to_dense(), expected, rtol=1e-12, atol=1e-13)

    grad = torch.randn(d_o, d_i, dtype=torch.float64)
    expected_update = C1 @ C1.T @ grad @ K1 @ K1.T
    torch.testing.assert_close(precondition(new.K, new.C, grad), expected_update, rtol=1e-12, atol=1e-13)


def test_kfac_like_drops_traces_and_momentum() -> None:
    d = 3
    K0 = torch.eye(d, dtype=torch.float64) + 0.1 * torch.randn(d, d, dtype=torch.float64)
    A, m0, lam = spd(d), spd(d), 0.01
    dense = STRUCTURES["dense"]
    state = SINGDFactors(dense.from_dense(K0), dense.from_dense(K0), dense.from_dense(m0), dense.from_dense(m0))
    new = singd_step(state, a_factor=A, g_factor=3 * A, damping=lam, alpha1=0.9, lr_cov=0.1, kfac_like=True)
    mK = 0.5 * (K0.T @ A @ K0 + lam * K0.T @ K0 - torch.eye(d))  # m0 does not enter, and no momentum is kept
    assert new.m_K is None and new.m_C is None
    torch.testing.assert_close(new.K.to_dense(), K0 - 0.1 * K0 @ mK)


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
def test_batch_form_equals_factor_form(structure: str) -> None:
    K = STRUCTURES[structure].from_dense(torch.randn(7, 7, dtype=torch.float64), **PARAMS.get(structure, {}))
    a = torch.randn(11, 7, dtype=torch.float64)
    torch.testing.assert_close(batch_inner(K, a).to_dense(), factor_inner(K, a.T @ a / 11).to_dense())
    torch.testing.assert_close(batch_inner(K, a, num_samples=2.0).to_dense(), factor_inner(K, a.T @ a / 2).to_dense())


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
def test_bfloat16_update_stays_finite(structure: str) -> None:
    factors = identity_factors(structure, 9, 5, dtype=torch.bfloat16)
    for _ in range(5):
        a, g = torch.randn(16, 9), torch.randn(16, 5)
        factors = singd_step(factors, a=a, g=g, damping=1e-3, alpha1=0.5, lr_cov=1e-2)
    assert all(m.dtype == torch.bfloat16 and m.is_finite() for m in factors)
    out = precondition(factors.K, factors.C, torch.randn(5, 9))
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())


def test_invalid_arguments() -> None:
    factors = identity_factors("dense", 3, 2)
    H_K, H_C = factors.K, factors.C
    with pytest.raises(ValueError, match="damping"):
        update_factors(factors, H_K, H_C, damping=-1.0, alpha1=0.5, lr_cov=0.1)
    with pytest.raises(ValueError, match="alpha1"):
        update_factors(factors, H_K, H_C, damping=0.0, alpha1=1.0, lr_cov=0.1)
    with pytest.raises(ValueError, match="lr_cov"):
        update_factors(factors, H_K, H_C, damping=0.0, alpha1=0.5, lr_cov=-0.1)
    with pytest.raises(ValueError, match="exactly one of a, a_factor"):
        singd_step(factors, g=torch.randn(4, 2), damping=0.0, alpha1=0.5, lr_cov=0.1)
    with pytest.raises(ValueError, match="Invalid x"):
        batch_inner(factors.K, torch.randn(4, 2))
    with pytest.raises(ValueError, match="Invalid grad"):
        precondition(factors.K, factors.C, torch.randn(3, 2))


# ---------------------------------------------------------------------- cross-check with the `singd` package
HAS_SINGD = importlib.util.find_spec("singd") is not None


def _singd_classes() -> dict[str, Any]:
    from singd.structures.blockdiagonal import Block3DiagonalMatrix
    from singd.structures.dense import DenseMatrix
    from singd.structures.diagonal import DiagonalMatrix
    from singd.structures.hierarchical import Hierarchical3_2Matrix
    from singd.structures.triltoeplitz import TrilToeplitzMatrix
    from singd.structures.triutoeplitz import TriuToeplitzMatrix

    return {
        "dense": DenseMatrix,
        "diagonal": DiagonalMatrix,
        "block_diagonal": Block3DiagonalMatrix,
        "hierarchical": Hierarchical3_2Matrix,
        "lower_toeplitz": TrilToeplitzMatrix,
        "upper_toeplitz": TriuToeplitzMatrix,
    }


def _singd_reference_update(
    K: Any, C: Any, m_K: Any, m_C: Any, a: Tensor, g: Tensor, lam: float, alpha1: float, beta1: float
) -> tuple[Any, Any, Any, Any]:
    """The preconditioner update as the `singd` optimizer composes it from its structure operations."""
    H_K, H_C = K.from_inner(X=a.T / a.shape[0] ** 0.5), C.from_inner(X=g.T / g.shape[0] ** 0.5)
    K_tK, C_tC = K.from_inner(), C.from_inner()
    (dim_K,), (dim_C,) = set(K.shape), set(C.shape)
    new_m_K = K.zeros(dim_K, dtype=a.dtype)
    new_m_K.add_(H_K, alpha=H_C.average_trace())
    new_m_K.add_(K_tK, alpha=lam * C_tC.average_trace())
    new_m_K.diag_add_(-1.0).mul_(0.5)
    new_m_C = C.zeros(dim_C, dtype=a.dtype)
    new_m_C.add_(H_C, alpha=H_K.average_trace())
    new_m_C.add_(C_tC, alpha=lam * K_tK.average_trace())
    new_m_C.diag_add_(-1.0).mul_(0.5)
    new_m_K.add_(m_K, alpha=alpha1)
    new_m_C.add_(m_C, alpha=alpha1)
    return (K + (K @ new_m_K) * (-beta1), C + (C @ new_m_C) * (-beta1), new_m_K, new_m_C)


@pytest.mark.skipif(not HAS_SINGD, reason="the reference package singd is not installed")
@pytest.mark.parametrize("structure", ["dense", "diagonal", "hierarchical", "lower_toeplitz", "upper_toeplitz"])
def test_matches_singd_package(structure: str) -> None:
    """Five updates and the preconditioned gradient agree with `singd`'s structures (float32).

    Block-diagonal is checked separately below: `singd`'s ``BlockDiagonalMatrix`` multiplies by ``K`` where
    ``K^T`` is meant (``rmatmat``, and ``K K^T`` in ``from_inner()``), which only agrees for symmetric blocks,
    while SINGD's ``K`` stops being symmetric after the first update.
    """
    import warnings

    ref_cls = _singd_classes()[structure]
    d_i, d_o = 8, 6
    ours = identity_factors(structure, d_i, d_o, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singd warns about its own naive fallbacks
        ref = (
            ref_cls.eye(d_i, dtype=torch.float32),
            ref_cls.eye(d_o, dtype=torch.float32),
            ref_cls.zeros(d_i, dtype=torch.float32),
            ref_cls.zeros(d_o, dtype=torch.float32),
        )
        for _ in range(5):
            a, g = torch.randn(10, d_i), torch.randn(10, d_o)
            ours = singd_step(ours, a=a, g=g, damping=1e-2, alpha1=0.5, lr_cov=0.1)
            ref = _singd_reference_update(*ref, a, g, 1e-2, 0.5, 0.1)
        grad = torch.randn(d_o, d_i)
        K_ref, C_ref = ref[0], ref[1]
        ref_update = C_ref @ C_ref.rmatmat((K_ref @ K_ref.rmatmat(grad.T)).T)
    for got, expected in zip(ours, ref):
        torch.testing.assert_close(got.to_dense(), expected.to_dense(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(precondition(ours.K, ours.C, grad), ref_update, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not HAS_SINGD, reason="the reference package singd is not installed")
def test_block_diagonal_matches_singd_on_symmetric_blocks() -> None:
    ref_cls = _singd_classes()["block_diagonal"]
    sym = torch.randn(8, 8)
    sym = sym + sym.T
    ours = STRUCTURES["block_diagonal"].from_dense(sym, block_size=3)
    ref = ref_cls.from_dense(sym)
    X = torch.randn(8, 5)
    torch.testing.assert_close(ours.to_dense(), ref.to_dense())
    torch.testing.assert_close(ours.from_inner(X).to_dense(), ref.from_inner(X).to_dense())
    torch.testing.assert_close(ours.from_inner().to_dense(), ref.from_inner().to_dense())
    torch.testing.assert_close(ours.mm(ours).to_dense(), (ref @ ref).to_dense())
    # with non-symmetric blocks ours is K^T X X^T K (checked against dense in the structure suite), not K X X^T K^T
    K = STRUCTURES["block_diagonal"].from_dense(torch.randn(8, 8), block_size=3)
    Kd = K.to_dense()
    expected = STRUCTURES["block_diagonal"].from_dense(Kd.T @ X @ X.T @ Kd, block_size=3).to_dense()
    torch.testing.assert_close(K.from_inner(X).to_dense(), expected)
