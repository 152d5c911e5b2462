"""Toeplitz kernels shared by the Toeplitz SINGD structures (SINGD, Lin, Dangel, Eschenhagen et al., ICML 2024).

A ``d x d`` Toeplitz matrix ``T`` is stored as ``2d - 1`` coefficients ``c`` with ``T[i, j] = c[j - i + d - 1]``
(``c[d - 1]`` is the main diagonal, larger indices are upper diagonals). Products with dense matrices are 1-D
convolutions; the projections only need the *sums along diagonals* of ``S S^T`` or of ``T_1 T_2``. Up to
``DENSE_MAX_DIM`` (``PRODUCT_DENSE_MAX_DIM`` for ``T_1 T_2``) these kernels use dense BLAS on a transient
``d x d`` matrix, which is much faster on CPUs for such sizes; above it they use 1-D convolutions and a chunked
O(d^2) sum that never form a ``d x d`` matrix. The stored state is O(d) either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "diagonal_counts",
    "diagonal_sums",
    "gram_diagonal_sums",
    "product_diagonal_sums",
    "toeplitz_dense",
    "toeplitz_matmul",
]

_CHUNK_ELEMENTS = 1 << 22
#: Largest dimension for which products and Gram sums go through a transient dense matrix.
DENSE_MAX_DIM = 2048
#: Largest dimension for which ``T_1 T_2`` is formed densely (O(d^3) time).
PRODUCT_DENSE_MAX_DIM = 512


def diagonal_counts(dim: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Length ``d - |k|`` of each of the ``2d - 1`` diagonals, in coefficient order."""
    offsets = torch.arange(-(dim - 1), dim, device=device)
    return (dim - offsets.abs()).to(dtype)


def toeplitz_dense(coeffs: Tensor) -> Tensor:
    """The dense Toeplitz matrix of ``2d - 1`` coefficients."""
    dim = (coeffs.shape[0] + 1) // 2
    idx = torch.arange(dim, device=coeffs.device)
    return coeffs[idx[None, :] - idx[:, None] + dim - 1]


def toeplitz_matmul(coeffs: Tensor, mat: Tensor) -> Tensor:
    """``T @ mat`` for a ``d x n`` matrix, as a cross-correlation over rows (no ``d x d`` matrix)."""
    dim = (coeffs.shape[0] + 1) // 2
    if mat.shape[0] != dim:
        raise ValueError(f"Invalid mat: {mat.shape[0]} rows for a Toeplitz matrix of dimension {dim}")
    if mat.shape[1] == 0:
        return mat.clone()
    if dim <= DENSE_MAX_DIM:
        return toeplitz_dense(coeffs.to(mat.dtype)) @ mat
    # out[i] = sum_t c[t] x[i + t - (d - 1)]  (conv1d is a cross-correlation)
    out = F.conv1d(mat.T.unsqueeze(1), coeffs.to(mat.dtype).view(1, 1, -1), padding=dim - 1)
    return out.squeeze(1).T


def diagonal_sums(mat: Tensor) -> Tensor:
    """Sum of each diagonal of a square matrix, in coefficient order (index ``j - i + d - 1``)."""
    dim = mat.shape[0]
    idx = torch.arange(dim, device=mat.device)
    which = (idx[None, :] - idx[:, None] + dim - 1).flatten()
    sums = mat.new_zeros(2 * dim - 1)
    return sums.scatter_add_(0, which, mat.flatten())


def gram_diagonal_sums(factor: Tensor) -> Tensor:
    """Diagonal sums of ``S S^T`` for a ``d x n`` matrix ``S``: autocorrelations of its columns, summed."""
    dim = factor.shape[0]
    if factor.shape[1] == 0:
        return factor.new_zeros(2 * dim - 1)
    if dim <= DENSE_MAX_DIM:
        return diagonal_sums(factor @ factor.T)
    rows = factor.T.unsqueeze(0)  # (1, n, d): the n columns act as channels
    return F.conv1d(rows, rows, padding=dim - 1).flatten()


def product_diagonal_sums(left: Tensor, right: Tensor) -> Tensor:
    """Diagonal sums of ``T(left) @ T(right)`` in O(d^2) time, in chunks of O(d) memory each.

    ``(T_1 T_2)[i, i + k] = sum_u c_1[u] c_2[k - u]`` over the ``u = j - i`` for which row ``i``, column ``i + u``
    and column ``i + k`` exist; their number is ``max(0, d - max(0, u, k) - max(0, -u, -k))``.
    """
    dim = (left.shape[0] + 1) // 2
    if dim <= PRODUCT_DENSE_MAX_DIM:
        return diagonal_sums(toeplitz_dense(left) @ toeplitz_dense(right))
    u = torch.arange(-(dim - 1), dim, device=left.device)
    right_ext = F.pad(right, (dim - 1, dim - 1))  # index q + 2d - 2 holds c_2[q] for |q| <= d - 1, else 0
    out = left.new_empty(2 * dim - 1)
    chunk = max(1, _CHUNK_ELEMENTS // (2 * dim - 1))
    for start in range(0, 2 * dim - 1, chunk):
        k = torch.arange(start - (dim - 1), min(start + chunk, 2 * dim - 1) - (dim - 1), device=left.device)
        kk, uu = k[:, None], u[None, :]
        zero = torch.zeros_like(kk)
        upper = torch.maximum(torch.maximum(zero, uu), kk)
        lower = torch.maximum(torch.maximum(zero, -uu), -kk)
        count = (dim - upper - lower).clamp(min=0).to(left.dtype)
        values = right_ext[kk - uu + 2 * dim - 2] * left[None, :] * count
        out[start : start + k.shape[0]] = values.sum(1)
    return out
