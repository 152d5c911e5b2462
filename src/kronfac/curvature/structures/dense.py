"""Dense (unstructured) SINGD factor: the structure of the original inverse-free K-FAC.

Lin et al., "Simplifying Momentum-based Positive-definite Submanifold Optimization with Applications to Deep
Learning" (ICML 2023) and SINGD (Lin, Dangel, Eschenhagen et al., ICML 2024). Memory ``d^2``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kronfac.curvature.structures.base import StructuredMatrix

__all__ = ["DenseMatrix"]


class DenseMatrix(StructuredMatrix):
    """A general ``d x d`` matrix; ``P_S`` and ``Π`` are the identity on (symmetric) inputs."""

    name = "dense"

    def __init__(self, mat: Tensor) -> None:
        if mat.ndim != 2 or mat.shape[0] != mat.shape[1]:
            raise ValueError(f"Invalid mat: shape {tuple(mat.shape)} (must be square)")
        super().__init__(mat.shape[0])
        self.mat = mat

    @classmethod
    def from_dense(cls, mat: Tensor, **params: Any) -> DenseMatrix:
        return cls(mat)

    def to_dense(self) -> Tensor:
        return self.mat

    @property
    def dtype(self) -> torch.dtype:
        return self.mat.dtype

    def tensors(self) -> dict[str, Tensor]:
        return {"mat": self.mat}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], **params: Any) -> DenseMatrix:
        return cls(tensors["mat"])

    @classmethod
    def identity(cls, dim: int, *, dtype: torch.dtype | None = None, device: Any = None, **params: Any) -> DenseMatrix:
        return cls(torch.eye(dim, dtype=dtype, device=device))

    def add_diagonal(self, value: float | Tensor) -> DenseMatrix:
        mat = self.mat.clone()
        mat.diagonal().add_(value)
        return DenseMatrix(mat)

    def _add_diagonal_inplace(self, value: float) -> bool:
        self.mat.diagonal().add_(value)
        return True

    def matmul(self, mat: Tensor) -> Tensor:
        return self.mat @ mat

    def matmul_t(self, mat: Tensor) -> Tensor:
        return self.mat.T @ mat

    def rmatmul(self, mat: Tensor) -> Tensor:
        return mat @ self.mat

    def mm(self, other: DenseMatrix) -> DenseMatrix:
        self._check_same(other)
        return DenseMatrix(self.mat @ other.mat)

    def add_mm(self, left: DenseMatrix, right: DenseMatrix, alpha: float = 1.0) -> DenseMatrix:
        self._check_same(left)
        self._check_same(right)
        return DenseMatrix(torch.addmm(self.mat, left.mat, right.mat, alpha=alpha))

    def outer(self) -> DenseMatrix:
        return DenseMatrix(self.mat @ self.mat.T)

    def outer_cost(self) -> int:
        return self.dim

    def trace(self) -> Tensor:
        return self.mat.diagonal().sum()

    def project(self, sym_mat: Tensor) -> DenseMatrix:
        return DenseMatrix(sym_mat)

    def _project_gram(self, factor: Tensor) -> DenseMatrix:
        return DenseMatrix(factor @ factor.T)

    def from_inner(self, mat: Tensor | None = None) -> DenseMatrix:
        if mat is None:
            return DenseMatrix(self.mat.T @ self.mat)
        return self._project_gram(self.mat.T @ mat)

    def from_inner_matrix(self, sym_mat: Tensor) -> DenseMatrix:
        if sym_mat.ndim == 1:
            return DenseMatrix(self.mat.T @ (sym_mat[:, None] * self.mat))
        return DenseMatrix(self.mat.T @ sym_mat @ self.mat)
