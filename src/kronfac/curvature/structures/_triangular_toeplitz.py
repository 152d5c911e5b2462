"""Shared implementation of the lower- and upper-triangular Toeplitz SINGD factors (memory ``d``).

SINGD (Lin, Dangel, Eschenhagen et al., ICML 2024). Triangular Toeplitz matrices are polynomials in the shift
matrix, so they form a commutative group: products are causal convolutions of the ``d`` stored coefficients
``t[k]`` (the value on the ``k``-th sub- or super-diagonal). The pattern is not symmetric, so ``Π`` of a
symmetric ``M`` is ``t[0] = mean(diag M)`` and ``t[k] = 2 mean(k-th diagonal of M)`` for ``k > 0``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from kronfac.curvature.structures._toeplitz_ops import (
    diagonal_counts,
    diagonal_sums,
    gram_diagonal_sums,
    product_diagonal_sums,
    toeplitz_matmul,
)
from kronfac.curvature.structures.base import StructuredMatrix

__all__ = ["TriangularToeplitzMatrix"]


class TriangularToeplitzMatrix(StructuredMatrix):
    """Triangular Toeplitz matrix; subclasses choose the triangle with ``lower``."""

    lower: ClassVar[bool]
    symmetric_pattern = False

    def __init__(self, coeffs: Tensor) -> None:
        if coeffs.ndim != 1:
            raise ValueError(f"Invalid coeffs: shape {tuple(coeffs.shape)} (must be a vector)")
        super().__init__(coeffs.shape[0])
        self.coeffs = coeffs

    def _general(self) -> Tensor:
        """The ``2d - 1`` coefficients of the same matrix as a general Toeplitz matrix."""
        pad = self.coeffs.new_zeros(self.dim - 1)
        return torch.cat([self.coeffs.flip(0), pad]) if self.lower else torch.cat([pad, self.coeffs])

    @classmethod
    def _side(cls, sums: Tensor, dim: int) -> Tensor:
        """Entries ``0, 1, ..., d - 1`` of the stored triangle out of per-diagonal values in coefficient order."""
        return sums[:dim].flip(0) if cls.lower else sums[dim - 1 :]

    @classmethod
    def _other_side(cls, sums: Tensor, dim: int) -> Tensor:
        return sums[dim - 1 :] if cls.lower else sums[:dim].flip(0)

    @classmethod
    def from_dense(cls, mat: Tensor, **params: Any) -> TriangularToeplitzMatrix:
        dim = mat.shape[0]
        means = diagonal_sums(mat) / diagonal_counts(dim, mat.dtype, mat.device)
        return cls(cls._side(means, dim).clone())

    def _symmetric_from_sums(self, sums: Tensor) -> TriangularToeplitzMatrix:
        counts = diagonal_counts(self.dim, sums.dtype, sums.device)
        means = sums / counts
        coeffs = self._side(means, self.dim) + self._other_side(means, self.dim)
        coeffs[0] = means[self.dim - 1]
        return type(self)(coeffs)

    def to_dense(self) -> Tensor:
        idx = torch.arange(self.dim, device=self.coeffs.device)
        offset = idx[:, None] - idx[None, :] if self.lower else idx[None, :] - idx[:, None]
        return torch.where(offset >= 0, self.coeffs[offset.clamp(min=0)], self.coeffs.new_zeros(()))

    def tensors(self) -> dict[str, Tensor]:
        return {"coeffs": self.coeffs}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], **params: Any) -> TriangularToeplitzMatrix:
        return cls(tensors["coeffs"])

    @classmethod
    def identity(
        cls, dim: int, *, dtype: torch.dtype | None = None, device: Any = None, **params: Any
    ) -> TriangularToeplitzMatrix:
        coeffs = torch.zeros(dim, dtype=dtype, device=device)
        coeffs[0] = 1.0
        return cls(coeffs)

    def add_diagonal(self, value: float | Tensor) -> TriangularToeplitzMatrix:
        coeffs = self.coeffs.clone()
        coeffs[0] += value
        return type(self)(coeffs)

    def matmul(self, mat: Tensor) -> Tensor:
        return toeplitz_matmul(self._general(), mat)

    def matmul_t(self, mat: Tensor) -> Tensor:
        return toeplitz_matmul(self._general().flip(0), mat)

    def mm(self, other: TriangularToeplitzMatrix) -> TriangularToeplitzMatrix:
        self._check_same(other)
        # causal convolution: out[k] = sum_{j <= k} t1[j] t2[k - j]
        signal = F.pad(other.coeffs, (self.dim - 1, 0)).view(1, 1, -1)
        out = F.conv1d(signal, self.coeffs.flip(0).view(1, 1, -1)).flatten()
        return type(self)(out)

    def trace(self) -> Tensor:
        return self.dim * self.coeffs[0]

    def project(self, sym_mat: Tensor) -> TriangularToeplitzMatrix:
        return self._symmetric_from_sums(diagonal_sums(sym_mat))

    def _project_gram(self, factor: Tensor) -> TriangularToeplitzMatrix:
        return self._symmetric_from_sums(gram_diagonal_sums(factor))

    def from_inner(self, mat: Tensor | None = None) -> TriangularToeplitzMatrix:
        if mat is None:
            general = self._general()
            return self._symmetric_from_sums(product_diagonal_sums(general.flip(0), general))
        return self._project_gram(self.matmul_t(mat))
