"""The Kronecker matrix-vector primitive ``y = (A ⊗ B) x``, applied without forming ``A ⊗ B``.

With ``A`` of shape ``(a1, a2)``, ``B`` of shape ``(b1, b2)`` and the row-major vec convention,
``(A ⊗ B) vec(X) = vec(A X B^T)`` where ``X`` is ``x`` reshaped to ``(a2, b2)``. Of the two ways to
evaluate the
product, ``A (X B^T)`` costs ``a2 b1 (b2 + a1)`` multiply-adds per vector and ``(A X) B^T`` costs
``a1 b2 (a2 + b1)``; :func:`kron_matvec` picks the cheaper one unless told otherwise. Both are plain torch
ops,
so autograd differentiates through them; the dense ``(a1 b1) x (a2 b2)`` matrix never exists.

References:
    C. F. Van Loan, "The ubiquitous Kronecker product", J. Comput. Appl. Math. 123 (2000).
    U. Thakker et al., "Compressing RNNs for IoT devices by 15-38x using Kronecker products",
    arXiv:1906.02876.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["ContractionOrder", "kron_cost", "kron_matvec", "kron_shape"]

ContractionOrder = Literal["auto", "b_first", "a_first"]
_ORDERS = ("auto", "b_first", "a_first")


def kron_shape(a: Tensor, b: Tensor) -> tuple[int, int]:
    """Shape ``(a1 b1, a2 b2)`` of the dense matrix ``A ⊗ B`` (which is never built)."""
    return a.shape[0] * b.shape[0], a.shape[1] * b.shape[1]


def kron_cost(a_shape: tuple[int, int], b_shape: tuple[int, int]) -> dict[str, int]:
    """Multiply-adds per input vector of each contraction order.

    Args:
        a_shape: ``(a1, a2)``.
        b_shape: ``(b1, b2)``.

    Returns:
        ``{"b_first": a2 b1 (b2 + a1), "a_first": a1 b2 (a2 + b1), "dense": a1 b1 a2 b2}``.
    """
    (a1, a2), (b1, b2) = a_shape, b_shape
    return {
        "b_first": a2 * b1 * (b2 + a1),
        "a_first": a1 * b2 * (a2 + b1),
        "dense": a1 * b1 * a2 * b2,
    }


def _resolve_order(a: Tensor, b: Tensor, order: str) -> str:
    if order not in _ORDERS:
        raise ValueError(f"Invalid order: {order!r}; allowed: {_ORDERS}")
    if order != "auto":
        return order
    cost = kron_cost((a.shape[0], a.shape[1]), (b.shape[0], b.shape[1]))
    return "b_first" if cost["b_first"] <= cost["a_first"] else "a_first"


def kron_matvec(a: Tensor, b: Tensor, x: Tensor, *, order: ContractionOrder = "auto") -> Tensor:
    """Compute ``(A ⊗ B) x`` over the last dimension of ``x`` without materialising ``A ⊗ B``.

    Args:
        a: Left factor ``A`` of shape ``(a1, a2)``.
        b: Right factor ``B`` of shape ``(b1, b2)``.
        x: Input of shape ``(..., a2 * b2)``; any number of leading dimensions (including none).
        order: ``"b_first"`` evaluates ``A (X B^T)``, ``"a_first"`` evaluates ``(A X) B^T``, ``"auto"``
            picks the
            one with fewer multiply-adds (see :func:`kron_cost`).

    Returns:
        Tensor of shape ``(..., a1 * b1)`` equal to ``x @ torch.kron(A, B).T``.

    Raises:
        ValueError: If a factor is not 2-D, ``x``'s last dimension is not ``a2 * b2``, or ``order`` is
            unknown.
    """
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"Factors must be 2-D, got A {tuple(a.shape)} and B {tuple(b.shape)}")
    a1, a2 = a.shape
    b1, b2 = b.shape
    if x.ndim == 0 or x.shape[-1] != a2 * b2:
        raise ValueError(f"Invalid x: last dimension must be a2*b2 = {a2}*{b2} = {a2 * b2}, got shape {tuple(x.shape)}")
    resolved = _resolve_order(a, b, order)
    lead = x.shape[:-1]
    xm = x.reshape(-1, a2, b2)
    if resolved == "b_first":
        t = torch.matmul(xm, b.transpose(0, 1))  # (N, a2, b1)
        y = torch.matmul(a, t)  # (N, a1, b1)
    else:
        t = torch.matmul(a, xm)  # (N, a1, b2)
        y = torch.matmul(t, b.transpose(0, 1))  # (N, a1, b1)
    return y.reshape(*lead, a1 * b1)
