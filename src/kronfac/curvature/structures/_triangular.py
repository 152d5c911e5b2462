"""Shared implementation of the lower- and upper-triangular SINGD factors.

Triangular matrices with the usual product form a group, so ``K <- K (I - β m_K)`` stays triangular. Since the
pattern is not symmetric, SINGD's ``Π`` of a symmetric ``M`` keeps the diagonal and doubles the strictly
triangular part (SINGD, Lin, Dangel, Eschenhagen et al., ICML 2024). The entries are stored packed,
``d (d + 1) / 2`` of them, in row-major order of the triangle.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from kronfac.curvature.structures.base import StructuredMatrix
from kronfac.curvature.structures.dense import DenseMatrix

__all__ = ["TriangularMatrix"]


class TriangularMatrix(StructuredMatrix):
    """Packed triangular matrix; subclasses choose the triangle with ``lower``."""

    lower: ClassVar[bool]
    symmetric_pattern = False

    def __init__(self, entries: Tensor) -> None:
        if entries.ndim != 1:
            raise ValueError(f"Invalid entries: shape {tuple(entries.shape)} (must be a vector)")
        dim = round(((8 * entries.shape[0] + 1) ** 0.5 - 1) / 2)
        if dim * (dim + 1) // 2 != entries.shape[0]:
            raise ValueError(f"Invalid entries: length {entries.shape[0]} is not d (d + 1) / 2 for an integer d")
        super().__init__(dim)
        self.entries = entries

    @classmethod
    def _indices(cls, dim: int, device: Any) -> tuple[Tensor, Tensor]:
        fn = torch.tril_indices if cls.lower else torch.triu_indices
        rows, cols = fn(dim, dim, device=device)
        return rows, cols

    @classmethod
    def from_dense(cls, mat: Tensor, **params: Any) -> TriangularMatrix:
        rows, cols = cls._indices(mat.shape[0], mat.device)
        return cls(mat[rows, cols])

    def to_dense(self) -> Tensor:
        rows, cols = self._indices(self.dim, self.entries.device)
        mat = self.entries.new_zeros(self.dim, self.dim)
        mat[rows, cols] = self.entries
        return mat

    def tensors(self) -> dict[str, Tensor]:
        return {"entries": self.entries}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], **params: Any) -> TriangularMatrix:
        return cls(tensors["entries"])

    @classmethod
    def identity(
        cls, dim: int, *, dtype: torch.dtype | None = None, device: Any = None, **params: Any
    ) -> TriangularMatrix:
        rows, cols = cls._indices(dim, device)
        return cls((rows == cols).to(dtype or torch.get_default_dtype()))

    def _diagonal_mask(self) -> Tensor:
        rows, cols = self._indices(self.dim, self.entries.device)
        return rows == cols

    def add_diagonal(self, value: float | Tensor) -> TriangularMatrix:
        return type(self)(self.entries + value * self._diagonal_mask().to(self.entries.dtype))

    def matmul(self, mat: Tensor) -> Tensor:
        return self.to_dense() @ mat

    def matmul_t(self, mat: Tensor) -> Tensor:
        return self.to_dense().T @ mat

    def rmatmul(self, mat: Tensor) -> Tensor:
        return mat @ self.to_dense()

    def mm(self, other: TriangularMatrix) -> TriangularMatrix:
        self._check_same(other)
        return self.like(self.to_dense() @ other.to_dense())

    def outer(self) -> DenseMatrix:
        """``L L^T`` is dense: ``d^2`` entries where ``L`` stores ``d (d + 1) / 2``, applied in one dense product
        (``matmul`` of a triangular matrix is a dense product too)."""
        dense = self.to_dense()
        return DenseMatrix(dense @ dense.T)

    def outer_cost(self) -> int:
        return self.dim

    def trace(self) -> Tensor:
        return self.entries[self._diagonal_mask()].sum()

    def project(self, sym_mat: Tensor) -> TriangularMatrix:
        rows, cols = self._indices(self.dim, sym_mat.device)
        strict = (rows != cols).to(sym_mat.dtype)
        return type(self)(sym_mat[rows, cols] + strict * sym_mat[cols, rows])

    def from_inner(self, mat: Tensor | None = None) -> TriangularMatrix:
        dense = self.to_dense()
        factor = dense.T if mat is None else dense.T @ mat
        return self._project_gram(factor)
