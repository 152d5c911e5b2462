"""Conjugate gradient on damped Kronecker systems, applied matrix-free (Chen 2021, CG-FAC).

CG-FAC: Chen, "An iterative K-FAC algorithm for Deep Learning", arXiv:2101.00218, 2021. The layer's system
``(G ⊗ A + λI) vec(U) = vec(V)`` (row-major vec) is the matrix equation ``G U A + λ U = V``; CG only needs the
map ``U -> G U A + λ U``, never ``G ⊗ A`` itself.

:func:`batch_operator` supplies it from the batch matrices ``a`` (``N x d_i``) and ``g`` (``N x d_o``) with
``A = a^T a / n_a`` and ``G = g^T g / n_g``; ``G U A = g^T (g U) a^T a / (n_a n_g)`` costs ``4 N d_i d_o`` and
never forms ``A`` or ``G``. :class:`~kronfac.CGFAC` is the one optimizer that solves by CG.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["CGResult", "batch_operator", "cg_solve"]

MatrixOperator = Callable[[Tensor], Tensor]


class CGResult(NamedTuple):
    """Solution of a CG solve, the iterations it took and its final relative residual ``||r|| / ||b||``."""

    solution: Tensor
    iterations: int
    relative_residual: float


def cg_solve(
    operator: MatrixOperator, rhs: Tensor, *, x0: Tensor | None = None, max_iters: int = 50, tol: float = 1e-6
) -> CGResult:
    """Solve ``operator(X) = rhs`` for a symmetric positive definite ``operator`` by conjugate gradient.

    Matrices are treated as vectors with the Frobenius inner product, so ``rhs`` may have any shape.

    Args:
        operator: the SPD linear map.
        rhs: the right-hand side ``B``.
        x0: warm start (zeros if ``None``).
        max_iters: at most this many iterations (0 returns ``x0``).
        tol: stop when ``||B - operator(X)|| <= tol ||B||``.

    Returns:
        The :class:`CGResult`.

    Raises:
        ValueError: if ``max_iters < 0`` or ``tol < 0``, or ``x0`` does not match ``rhs``.
    """
    if max_iters < 0:
        raise ValueError(f"Invalid max_iters: {max_iters} (must be >= 0)")
    if tol < 0:
        raise ValueError(f"Invalid tol: {tol} (must be >= 0)")
    if x0 is not None and x0.shape != rhs.shape:
        raise ValueError(f"Invalid x0: shape {tuple(x0.shape)} (must match rhs {tuple(rhs.shape)})")
    rhs_norm = float(torch.linalg.vector_norm(rhs))
    if rhs_norm == 0.0:
        return CGResult(torch.zeros_like(rhs), 0, 0.0)
    x = torch.zeros_like(rhs) if x0 is None else x0.clone()
    r = rhs - operator(x) if x0 is not None else rhs.clone()
    p = r.clone()
    rr = float((r * r).sum())
    threshold = (tol * rhs_norm) ** 2
    iterations = 0
    while iterations < max_iters and rr > threshold:
        q = operator(p)
        pq = float((p * q).sum())
        if pq <= 0.0:  # round-off broke positive definiteness: keep the best iterate so far
            break
        alpha = rr / pq
        x.add_(p, alpha=alpha)
        r.sub_(q, alpha=alpha)
        rr_new = float((r * r).sum())
        p.mul_(rr_new / rr).add_(r)
        rr = rr_new
        iterations += 1
    return CGResult(x, iterations, rr**0.5 / rhs_norm)


def batch_operator(
    a_rows: Tensor, g_rows: Tensor, damping: float, *, a_scale: float = 1.0, g_scale: float = 1.0
) -> MatrixOperator:
    """``U -> G U A + λ U`` with ``A = a_scale a^T a`` (or ``diag(a_scale a)`` for a vector ``a``) and
    ``G = g_scale g^T g``, evaluated as ``g^T (g U) a^T a``: four ``N d_i d_o`` products, ``A`` and ``G`` are
    never formed.

    Args:
        a_rows: ``N_a x d_i`` layer inputs, or a length-``d_i`` vector holding a diagonal ``A`` (Embedding).
        g_rows: ``N_g x d_o`` output gradients.
        damping: ``λ``.
        a_scale: normaliser of ``A`` (e.g. ``1 / N_a``).
        g_scale: normaliser of ``G``.
    """
    scale = a_scale * g_scale

    def apply(u: Tensor) -> Tensor:
        gu = g_rows.T @ (g_rows @ u)  # G U without G
        gua = gu * a_rows if a_rows.ndim == 1 else (gu @ a_rows.T) @ a_rows
        return gua.mul_(scale).add_(u, alpha=damping)

    return apply
