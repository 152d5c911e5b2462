"""Functional SINGD kernel: the update of the structured inverse-free factors, independent of any optimizer.

SINGD: Lin, Dangel, Eschenhagen, Bae, Turner, Makhzani, "Structured Inverse-Free Natural Gradient Descent:
Memory-Efficient & Numerically-Stable KFAC", ICML 2024 (arXiv:2312.05705); IKFAC and the dense case: Lin et al.,
ICML 2023. Notation of DESIGN.md: ``A = E[a a^T]`` (``d_i x d_i``), ``G = E[g g^T]`` (``d_o x d_o``). SINGD keeps
``K`` and ``C`` with ``K K^T ≈ A^{-1}``, ``C C^T ≈ G^{-1}``, and momenta ``m_K``, ``m_C``, all in a structure
``S`` with its projection ``Π`` (see :mod:`kronfac.curvature.structures`). One update, with
``H_K = Π(K^T A K)`` and ``H_C = Π(C^T G C)``::

    m_K <- α1 m_K + ½ [ (tr H_C / d_o) H_K + λ (tr Π(C^T C) / d_o) Π(K^T K) - I ]
    m_C <- α1 m_C + ½ [ (tr H_K / d_i) H_C + λ (tr Π(K^T K) / d_i) Π(C^T C) - I ]
    K   <- K - β1 K m_K,        C <- C - β1 C m_C

IKFAC (``kfac_like=True``) drops the trace factors (they become 1) and the Riemannian momentum (``α1 = 0``);
its fixed point is ``K^T (A + λI) K = I``, i.e. ``K K^T = (A + λI)^{-1}`` for the dense and triangular
structures. Without Riemannian momentum (IKFAC, or ``α1 = 0``) ``m_K`` and ``m_C`` are not kept (``None``, which
stands for zero), as the reference package ``singd`` does. The preconditioned gradient is ``C C^T ∇W K K^T``: four
products, or two with ``K K^T`` and ``C C^T`` formed once per update (:meth:`StructuredMatrix.outer`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

from torch import Tensor

from kronfac.curvature.structures.base import StructuredMatrix

__all__ = [
    "SINGDFactors",
    "batch_inner",
    "factor_inner",
    "precondition",
    "singd_step",
    "update_factors",
]


class SINGDFactors(NamedTuple):
    """The SINGD state of one layer: ``K``, ``C`` and their momenta ``m_K``, ``m_C`` (``None``: zero, not kept)."""

    K: StructuredMatrix
    C: StructuredMatrix
    m_K: StructuredMatrix | None = None
    m_C: StructuredMatrix | None = None


def batch_inner(K: StructuredMatrix, x: Tensor, num_samples: float | None = None) -> StructuredMatrix:
    """``Π(K^T A K)`` with ``A = x^T x / num_samples`` from the ``N x d`` batch matrix ``x``, never forming ``A``.

    Args:
        K: The structured factor (``d x d``).
        x: Batch of layer inputs ``a`` (or output gradients ``g``), one row per sample (or location).
        num_samples: Normaliser of ``x^T x``; defaults to the number of rows ``N``.

    Raises:
        ValueError: If ``x`` is not ``N x d`` or ``num_samples`` is not positive.
    """
    if x.ndim != 2 or x.shape[1] != K.dim:
        raise ValueError(f"Invalid x: shape {tuple(x.shape)} (must be N x {K.dim})")
    norm = float(x.shape[0] if num_samples is None else num_samples)
    if norm <= 0:
        raise ValueError(f"Invalid num_samples: {num_samples} (must be > 0)")
    # scale x, not the result, so that half-precision sums do not overflow
    return K.from_inner((x.to(K.dtype) / math.sqrt(norm)).T)


def factor_inner(K: StructuredMatrix, factor: Tensor) -> StructuredMatrix:
    """``Π(K^T A K)`` for a given symmetric ``A`` (``d x d``, or its diagonal as a vector)."""
    if factor.shape[0] != K.dim or factor.ndim not in (1, 2):
        raise ValueError(f"Invalid factor: shape {tuple(factor.shape)} (must be {K.dim} x {K.dim} or {K.dim})")
    return K.from_inner_matrix(factor.to(K.dtype))


def update_factors(
    factors: SINGDFactors,
    H_K: StructuredMatrix,
    H_C: StructuredMatrix,
    *,
    damping: float,
    alpha1: float,
    lr_cov: float,
    kfac_like: bool = False,
    h_scales: tuple[float, float] = (1.0, 1.0),
) -> SINGDFactors:
    """One SINGD (or IKFAC) update of ``K, C, m_K, m_C`` from ``H_K = Π(K^T A K)`` and ``H_C = Π(C^T G C)``.

    Args:
        factors: Current ``K, C, m_K, m_C``.
        H_K: ``Π(K^T A K)`` in ``K``'s structure (see :func:`batch_inner`, :func:`factor_inner`).
        H_C: ``Π(C^T G C)`` in ``C``'s structure.
        damping: ``λ``.
        alpha1: ``α1``, the Riemannian momentum of ``m_K, m_C`` (ignored when ``kfac_like``).
        lr_cov: ``β1``, the step size of ``K`` and ``C``.
        kfac_like: IKFAC: no trace factors and no Riemannian momentum.
        h_scales: ``(s_K, s_C)`` when the arguments are ``H_K / s_K`` and ``H_C / s_C`` (e.g. sums over samples
            with ``s = 1 / N``); the factors are folded into the coefficients, saving a pass over each matrix.

    Returns:
        The updated factors; every matrix stays in its structure. The momenta are ``None`` when the next update
        does not read them (``kfac_like`` or ``alpha1 = 0``), so that IKFAC holds no momentum buffers.

    Raises:
        ValueError: If a hyperparameter is out of range.
    """
    if damping < 0:
        raise ValueError(f"Invalid damping: {damping} (must be >= 0)")
    if not 0.0 <= alpha1 < 1.0:
        raise ValueError(f"Invalid alpha1: {alpha1} (must be in [0, 1))")
    if lr_cov < 0:
        raise ValueError(f"Invalid lr_cov: {lr_cov} (must be >= 0)")
    K, C, m_K, m_C = factors
    KtK, CtC = K.from_inner(), C.from_inner()
    coeff_HK: float | Tensor
    coeff_HC: float | Tensor
    coeff_KtK: float | Tensor
    coeff_CtC: float | Tensor
    s_K, s_C = h_scales
    if kfac_like:
        coeff_HK, coeff_HC = 0.5 * s_K, 0.5 * s_C
        coeff_KtK = coeff_CtC = 0.5 * damping
        alpha1 = 0.0
    else:
        # the traces stay tensors: no host synchronisation on accelerators
        tr_HK, tr_HC = H_K.trace() * (s_K / K.dim), H_C.trace() * (s_C / C.dim)
        coeff_HK, coeff_HC = tr_HC * (0.5 * s_K), tr_HK * (0.5 * s_C)
        coeff_KtK = CtC.trace() * (0.5 * damping / C.dim)
        coeff_CtC = KtK.trace() * (0.5 * damping / K.dim)
    # m = ½ [c_H H + c_KtK KtK - I] (+ α1 m), with the ½ folded into the coefficients; one pass per term
    terms_K: list[tuple[StructuredMatrix, float | Tensor]] = [(KtK, coeff_KtK)]
    terms_C: list[tuple[StructuredMatrix, float | Tensor]] = [(CtC, coeff_CtC)]
    if alpha1 != 0.0 and m_K is not None:
        terms_K.append((m_K, alpha1))
    if alpha1 != 0.0 and m_C is not None:
        terms_C.append((m_C, alpha1))
    new_m_K = H_K.scale_add(coeff_HK, terms_K, diagonal=-0.5)
    new_m_C = H_C.scale_add(coeff_HC, terms_C, diagonal=-0.5)
    new_K = K.add_mm(K, new_m_K, alpha=-lr_cov)
    new_C = C.add_mm(C, new_m_C, alpha=-lr_cov)
    if alpha1 == 0.0:  # the next update does not read them: keep no momentum buffers
        return SINGDFactors(new_K, new_C)
    return SINGDFactors(new_K, new_C, new_m_K, new_m_C)


def singd_step(
    factors: SINGDFactors,
    *,
    a: Tensor | None = None,
    g: Tensor | None = None,
    a_factor: Tensor | None = None,
    g_factor: Tensor | None = None,
    damping: float,
    alpha1: float,
    lr_cov: float,
    kfac_like: bool = False,
    num_a_samples: float | None = None,
    num_g_samples: float | None = None,
) -> SINGDFactors:
    """One SINGD update from either the batch matrices ``a`` (``N x d_i``), ``g`` (``N x d_o``) or the factors.

    Give exactly one of ``a`` / ``a_factor`` and one of ``g`` / ``g_factor``. With batch matrices
    ``A = a^T a / num_a_samples`` and ``G = g^T g / num_g_samples`` (defaults: the number of rows); the batch
    form costs ``O(N d)`` per structure entry instead of ``O(d^3)`` and never forms ``A`` or ``G``.

    Raises:
        ValueError: If not exactly one source is given for a side.
    """
    K, C = factors.K, factors.C
    if (a is None) == (a_factor is None):
        raise ValueError("Invalid inputs: give exactly one of a, a_factor")
    if (g is None) == (g_factor is None):
        raise ValueError("Invalid inputs: give exactly one of g, g_factor")
    H_K = batch_inner(K, a, num_a_samples) if a is not None else factor_inner(K, a_factor)  # type: ignore[arg-type]
    H_C = batch_inner(C, g, num_g_samples) if g is not None else factor_inner(C, g_factor)  # type: ignore[arg-type]
    return update_factors(factors, H_K, H_C, damping=damping, alpha1=alpha1, lr_cov=lr_cov, kfac_like=kfac_like)


def precondition(
    K: StructuredMatrix,
    C: StructuredMatrix,
    grad: Tensor,
    outer_K: StructuredMatrix | None = None,
    outer_C: StructuredMatrix | None = None,
) -> Tensor:
    """``C C^T ∇W K K^T`` for the ``d_o x d_i`` gradient matrix ``∇W``, computed in the factors' dtypes.

    Args:
        K: The input-side factor (``d_i x d_i``).
        C: The output-side factor (``d_o x d_o``).
        grad: ``∇W``.
        outer_K: ``K K^T`` (:meth:`StructuredMatrix.outer`) to apply in one product instead of two, or ``None``.
        outer_C: ``C C^T`` likewise.

    Returns:
        The preconditioned gradient in ``grad``'s dtype.

    Raises:
        ValueError: If the shapes do not match.
    """
    if grad.ndim != 2 or grad.shape != (C.dim, K.dim):
        raise ValueError(f"Invalid grad: shape {tuple(grad.shape)} (must be {C.dim} x {K.dim})")
    dtype_K, dtype_C = K.dtype, C.dtype
    right = grad if grad.dtype == dtype_K else grad.to(dtype_K)
    if outer_K is not None:
        right = outer_K.rmatmul(right)  # K K^T is symmetric
    else:
        # ∇W K K^T = (K (∇W K)^T)^T: both products have the gradient's d_o rows as their short side, which
        # MKL runs faster than K^T ∇W^T with a d_o-column right operand (d_o = 10, d_i = 513: 0.16 vs 0.21 ms)
        right = K.matmul(K.rmatmul(right).T).T
    right = right if dtype_C == dtype_K else right.to(dtype_C)
    out = outer_C.matmul(right) if outer_C is not None else C.matmul(C.matmul_t(right))
    return out if out.dtype == grad.dtype else out.to(grad.dtype)
