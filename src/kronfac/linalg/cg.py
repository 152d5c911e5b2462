"""Conjugate gradient on damped Kronecker systems, applied matrix-free (Chen 2021, CG-FAC).

CG-FAC: Chen, "An iterative K-FAC algorithm for Deep Learning", arXiv:2101.00218, 2021. The layer's system
``(G ⊗ A + λI) vec(U) = vec(V)`` (row-major vec) is the matrix equation ``G U A + λ U = V``; CG only needs the
map ``U -> G U A + λ U``, never ``G ⊗ A`` itself.

:func:`batch_operator` supplies it from the batch matrices ``a`` (``N x d_i``) and ``g`` (``N x d_o``) with
``A = a^T a / n_a`` and ``G = g^T g / n_g``; ``G U A = g^T (g U) a^T a / (n_a n_g)`` costs ``4 N d_i d_o`` and
never forms ``A`` or ``G``; :func:`factor_operator` applies formed factors, ``G U A`` in
``d_o d_i (d_o + d_i)``, which is cheaper once the rows outnumber the widths. :func:`operator_costs` counts both, so
a caller can take the cheaper one (:class:`~kronfac.CGFAC` does, per layer). :class:`~kronfac.CGFAC` is the one
optimizer that solves by CG.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["CGResult", "batch_operator", "cg_solve", "factor_operator", "operator_costs"]

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


def factor_operator(a_factor: Tensor, g_factor: Tensor, damping: float) -> MatrixOperator:
    """``U -> G U A + λ U`` with formed factors ``A`` (``d_i x d_i``, or a length-``d_i`` vector for a diagonal
    ``A``) and ``G`` (``d_o x d_o``): ``d_o d_i (d_o + d_i)`` multiply-adds per application."""

    def apply(u: Tensor) -> Tensor:
        gu = g_factor @ u
        gua = gu * a_factor if a_factor.ndim == 1 else gu @ a_factor
        return gua.add_(u, alpha=damping)

    return apply


def operator_costs(
    d_in: int, d_out: int, a_rows: int, g_rows: int, *, iterations: int, diagonal_a: bool = False
) -> tuple[float, float, float]:
    """Multiply-adds of ``iterations`` applications of :func:`batch_operator`, of ``iterations`` applications of
    :func:`factor_operator`, and of forming its factors ``A = a^T a`` and ``G = g^T g`` from the rows.

    Rows: ``2 d_o d_i (N_g + N_a)`` per application (``d_o d_i (2 N_g + 1)`` with a diagonal ``A``); factors:
    ``d_o d_i (d_o + d_i)`` per application (``d_o d_i (d_o + 1)``); forming them ``d_o^2 N_g + d_i^2 N_a``
    (``d_o^2 N_g``).
    """
    size = d_out * d_in
    if diagonal_a:
        return (
            float(iterations * size * (2 * g_rows + 1)),
            float(iterations * size * (d_out + 1)),
            float(d_out * d_out * g_rows),
        )
    return (
        float(iterations * 2 * size * (g_rows + a_rows)),
        float(iterations * size * (d_out + d_in)),
        float(d_out * d_out * g_rows + d_in * d_in * a_rows),
    )
