"""Block-diagonal SINGD factor (SINGD, Lin, Dangel, Eschenhagen et al., ICML 2024).

``blockdiag(B_1, ..., B_n, L)`` with ``n = d // b`` dense ``b x b`` blocks and a last, smaller ``r x r`` block
``L`` (``r = d mod b``, possibly empty). Memory ``n b^2 + r^2``. The pattern is symmetric, so ``Π = P_S`` keeps
the diagonal blocks, and only the diagonal blocks of ``A`` enter ``Π(K^T A K)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kronfac.curvature.structures.base import StructuredMatrix

__all__ = ["BlockDiagonalMatrix"]


class BlockDiagonalMatrix(StructuredMatrix):
    """Block-diagonal matrix with square blocks of size ``block_size`` (the last one may be smaller)."""

    name = "block_diagonal"

    def __init__(self, blocks: Tensor, last: Tensor) -> None:
        if blocks.ndim != 3 or blocks.shape[1] != blocks.shape[2] or blocks.shape[1] < 1:
            raise ValueError(f"Invalid blocks: shape {tuple(blocks.shape)} (must be n x b x b, b >= 1)")
        if last.ndim != 2 or last.shape[0] != last.shape[1] or last.shape[0] >= blocks.shape[1]:
            raise ValueError(f"Invalid last: shape {tuple(last.shape)} (must be r x r with r < block size)")
        super().__init__(blocks.shape[0] * blocks.shape[1] + last.shape[0])
        self.blocks = blocks
        self.last = last
        self.block_size = blocks.shape[1]

    def structure_params(self) -> dict[str, int]:
        return {"block_size": self.block_size}

    @staticmethod
    def _check_block_size(block_size: int) -> None:
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"Invalid block_size: {block_size} (must be an integer >= 1)")

    def _split_rows(self, mat: Tensor) -> tuple[Tensor, Tensor]:
        n, b = self.blocks.shape[0], self.block_size
        head, tail = mat[: n * b], mat[n * b :]
        return head.reshape(n, b, *mat.shape[1:]), tail

    @classmethod
    def from_dense(cls, mat: Tensor, **params: Any) -> BlockDiagonalMatrix:
        block_size = int(params.get("block_size", 0))
        cls._check_block_size(block_size)
        dim = mat.shape[0]
        n = dim // block_size
        head = mat[: n * block_size, : n * block_size].reshape(n, block_size, n, block_size)
        idx = torch.arange(n, device=mat.device)
        blocks = head[idx, :, idx, :].clone()  # (n, b, b)
        last = mat[n * block_size :, n * block_size :].clone()
        return cls(blocks, last)

    def to_dense(self) -> Tensor:
        return torch.block_diag(*self.blocks.unbind(0), self.last)

    def tensors(self) -> dict[str, Tensor]:
        return {"blocks": self.blocks, "last": self.last}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], **params: Any) -> BlockDiagonalMatrix:
        return cls(tensors["blocks"], tensors["last"])

    @classmethod
    def identity(
        cls, dim: int, *, dtype: torch.dtype | None = None, device: Any = None, **params: Any
    ) -> BlockDiagonalMatrix:
        block_size = int(params.get("block_size", 0))
        cls._check_block_size(block_size)
        n, r = divmod(dim, block_size)
        blocks = torch.eye(block_size, dtype=dtype, device=device).expand(n, block_size, block_size).clone()
        return cls(blocks, torch.eye(r, dtype=dtype, device=device))

    def add_diagonal(self, value: float | Tensor) -> BlockDiagonalMatrix:
        blocks, last = self.blocks.clone(), self.last.clone()
        blocks.diagonal(dim1=1, dim2=2).add_(value)
        last.diagonal().add_(value)
        return BlockDiagonalMatrix(blocks, last)

    def _add_diagonal_inplace(self, value: float) -> bool:
        self.blocks.diagonal(dim1=1, dim2=2).add_(value)
        self.last.diagonal().add_(value)
        return True

    def _apply(self, mat: Tensor, transpose: bool) -> Tensor:
        head, tail = self._split_rows(mat)
        blocks = self.blocks.transpose(1, 2) if transpose else self.blocks
        last = self.last.T if transpose else self.last
        out_head = torch.bmm(blocks, head).reshape(-1, *mat.shape[1:])
        return torch.cat([out_head, last @ tail], dim=0)

    def matmul(self, mat: Tensor) -> Tensor:
        return self._apply(mat, transpose=False)

    def matmul_t(self, mat: Tensor) -> Tensor:
        return self._apply(mat, transpose=True)

    def mm(self, other: BlockDiagonalMatrix) -> BlockDiagonalMatrix:
        self._check_same(other)
        return BlockDiagonalMatrix(torch.bmm(self.blocks, other.blocks), self.last @ other.last)

    def add_mm(self, left: BlockDiagonalMatrix, right: BlockDiagonalMatrix, alpha: float = 1.0) -> BlockDiagonalMatrix:
        self._check_same(left)
        self._check_same(right)
        blocks = torch.baddbmm(self.blocks, left.blocks, right.blocks, alpha=alpha)
        return BlockDiagonalMatrix(blocks, torch.addmm(self.last, left.last, right.last, alpha=alpha))

    def outer(self) -> BlockDiagonalMatrix:
        return BlockDiagonalMatrix(torch.bmm(self.blocks, self.blocks.transpose(1, 2)), self.last @ self.last.T)

    def outer_cost(self) -> int:
        return self.block_size

    def trace(self) -> Tensor:
        return self.blocks.diagonal(dim1=1, dim2=2).sum() + self.last.diagonal().sum()

    def project(self, sym_mat: Tensor) -> BlockDiagonalMatrix:
        return self.like(sym_mat)

    def _project_gram(self, factor: Tensor) -> BlockDiagonalMatrix:
        head, tail = self._split_rows(factor)
        return BlockDiagonalMatrix(torch.bmm(head, head.transpose(1, 2)), tail @ tail.T)

    def from_inner(self, mat: Tensor | None = None) -> BlockDiagonalMatrix:
        if mat is None:
            return BlockDiagonalMatrix(torch.bmm(self.blocks.transpose(1, 2), self.blocks), self.last.T @ self.last)
        return self._project_gram(self.matmul_t(mat))

    def from_inner_matrix(self, sym_mat: Tensor) -> BlockDiagonalMatrix:
        if sym_mat.ndim == 1:
            head, tail = self._split_rows(sym_mat)
            blocks = torch.bmm(self.blocks.transpose(1, 2), head[:, :, None] * self.blocks)
            return BlockDiagonalMatrix(blocks, self.last.T @ (tail[:, None] * self.last))
        diag_blocks = self.like(sym_mat)
        blocks = torch.bmm(torch.bmm(self.blocks.transpose(1, 2), diag_blocks.blocks), self.blocks)
        return BlockDiagonalMatrix(blocks, self.last.T @ diag_blocks.last @ self.last)
