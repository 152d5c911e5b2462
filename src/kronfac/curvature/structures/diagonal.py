"""Diagonal SINGD factor (SINGD, Lin, Dangel, Eschenhagen et al., ICML 2024). Memory ``d``.

The diagonal structure needs only the diagonal of ``A``, which also makes it the natural choice for the input
side of an Embedding layer, whose ``A`` is diagonal (token counts).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kronfac.curvature.structures.base import StructuredMatrix

__all__ = ["DiagonalMatrix"]


class DiagonalMatrix(StructuredMatrix):
    """``diag(d)``; ``P_S`` and ``Π`` keep the diagonal."""

    name = "diagonal"

    def __init__(self, diag: Tensor) -> None:
        if diag.ndim != 1:
            raise ValueError(f"Invalid diag: shape {tuple(diag.shape)} (must be a vector)")
        super().__init__(diag.shape[0])
        self.diag = diag

    @classmethod
    def from_dense(cls, mat: Tensor, **params: Any) -> DiagonalMatrix:
        return cls(mat.diagonal().clone())

    def to_dense(self) -> Tensor:
        return torch.diag(self.diag)

    @property
    def dtype(self) -> torch.dtype:
        return self.diag.dtype

    def tensors(self) -> dict[str, Tensor]:
        return {"diag": self.diag}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], **params: Any) -> DiagonalMatrix:
        return cls(tensors["diag"])

    @classmethod
    def identity(
        cls, dim: int, *, dtype: torch.dtype | None = None, device: Any = None, **params: Any
    ) -> DiagonalMatrix:
        return cls(torch.ones(dim, dtype=dtype, device=device))

    def add_diagonal(self, value: float | Tensor) -> DiagonalMatrix:
        return DiagonalMatrix(self.diag + value)

    def _add_diagonal_inplace(self, value: float) -> bool:
        self.diag.add_(value)
        return True

    def matmul(self, mat: Tensor) -> Tensor:
        return self.diag[:, None] * mat

    def matmul_t(self, mat: Tensor) -> Tensor:
        return self.diag[:, None] * mat

    def rmatmul(self, mat: Tensor) -> Tensor:
        return mat * self.diag[None, :]

    def mm(self, other: DiagonalMatrix) -> DiagonalMatrix:
        self._check_same(other)
        return DiagonalMatrix(self.diag * other.diag)

    def add_mm(self, left: DiagonalMatrix, right: DiagonalMatrix, alpha: float = 1.0) -> DiagonalMatrix:
        self._check_same(left)
        self._check_same(right)
        return DiagonalMatrix(torch.addcmul(self.diag, left.diag, right.diag, value=alpha))

    def outer(self) -> DiagonalMatrix:
        return DiagonalMatrix(self.diag * self.diag)

    def outer_cost(self) -> int:
        return 1

    def trace(self) -> Tensor:
        return self.diag.sum()

    def project(self, sym_mat: Tensor) -> DiagonalMatrix:
        return DiagonalMatrix(sym_mat.diagonal().clone())

    def _project_gram(self, factor: Tensor) -> DiagonalMatrix:
        return DiagonalMatrix((factor * factor).sum(1))

    def from_inner(self, mat: Tensor | None = None) -> DiagonalMatrix:
        squared = self.diag * self.diag
        if mat is None:
            return DiagonalMatrix(squared)
        return DiagonalMatrix(squared * (mat * mat).sum(1))

    def from_inner_matrix(self, sym_mat: Tensor) -> DiagonalMatrix:
        diag = sym_mat if sym_mat.ndim == 1 else sym_mat.diagonal()
        return DiagonalMatrix(self.diag * self.diag * diag)
