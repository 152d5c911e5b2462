"""Toeplitz SINGD factor: ``K[i, j] = c[j - i + d - 1]``, ``2d - 1`` coefficients (memory O(d)).

SINGD (Lin, Dangel, Eschenhagen et al., ICML 2024) uses Toeplitz structure for its O(d) preconditioners. General
Toeplitz matrices are not closed under products, so ``K m_K`` is projected (``P_S``: the mean along each
diagonal) to keep ``K`` Toeplitz; the triangular Toeplitz structures are groups and need no projection. The
pattern is symmetric, so ``Π = P_S``. Products with dense matrices are convolutions, and ``Π(S S^T)`` is a sum
of column autocorrelations, so the update never forms a ``d x d`` matrix.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kronfac.curvature.structures._toeplitz_ops import (
    diagonal_counts,
    diagonal_sums,
    gram_diagonal_sums,
    product_diagonal_sums,
    toeplitz_dense,
    toeplitz_matmul,
)
from kronfac.curvature.structures.base import StructuredMatrix

__all__ = ["ToeplitzMatrix"]


class ToeplitzMatrix(StructuredMatrix):
    """General (non-symmetric) Toeplitz matrix from its ``2d - 1`` diagonal values."""

    name = "toeplitz"
    closed_under_product = False

    def __init__(self, coeffs: Tensor) -> None:
        if coeffs.ndim != 1 or coeffs.shape[0] % 2 != 1:
            raise ValueError(f"Invalid coeffs: shape {tuple(coeffs.shape)} (must be a vector of odd length 2d-1)")
        super().__init__((coeffs.shape[0] + 1) // 2)
        self.coeffs = coeffs

    def _from_sums(self, sums: Tensor) -> ToeplitzMatrix:
        return ToeplitzMatrix(sums / diagonal_counts(self.dim, sums.dtype, sums.device))

    @classmethod
    def from_dense(cls, mat: Tensor, **params: Any) -> ToeplitzMatrix:
        counts = diagonal_counts(mat.shape[0], mat.dtype, mat.device)
        return cls(diagonal_sums(mat) / counts)

    def to_dense(self) -> Tensor:
        return toeplitz_dense(self.coeffs)

    def tensors(self) -> dict[str, Tensor]:
        return {"coeffs": self.coeffs}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], **params: Any) -> ToeplitzMatrix:
        return cls(tensors["coeffs"])

    @classmethod
    def identity(
        cls, dim: int, *, dtype: torch.dtype | None = None, device: Any = None, **params: Any
    ) -> ToeplitzMatrix:
        coeffs = torch.zeros(2 * dim - 1, dtype=dtype, device=device)
        coeffs[dim - 1] = 1.0
        return cls(coeffs)

    def add_diagonal(self, value: float | Tensor) -> ToeplitzMatrix:
        coeffs = self.coeffs.clone()
        coeffs[self.dim - 1] += value
        return ToeplitzMatrix(coeffs)

    def matmul(self, mat: Tensor) -> Tensor:
        return toeplitz_matmul(self.coeffs, mat)

    def matmul_t(self, mat: Tensor) -> Tensor:
        return toeplitz_matmul(self.coeffs.flip(0), mat)

    def mm(self, other: ToeplitzMatrix) -> ToeplitzMatrix:
        self._check_same(other)
        return self._from_sums(product_diagonal_sums(self.coeffs, other.coeffs))

    def trace(self) -> Tensor:
        return self.dim * self.coeffs[self.dim - 1]

    def project(self, sym_mat: Tensor) -> ToeplitzMatrix:
        return self.from_dense(sym_mat)

    def _project_gram(self, factor: Tensor) -> ToeplitzMatrix:
        return self._from_sums(gram_diagonal_sums(factor))

    def from_inner(self, mat: Tensor | None = None) -> ToeplitzMatrix:
        if mat is None:
            return self._from_sums(product_diagonal_sums(self.coeffs.flip(0), self.coeffs))
        return self._project_gram(self.matmul_t(mat))
