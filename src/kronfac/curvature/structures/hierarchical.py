"""Hierarchical SINGD factor (SINGD, Lin, Dangel, Eschenhagen et al., ICML 2024, the "hierarchical" structure).

With ``m = d - k1 - k2`` the matrix is::

    [[A, B_C, B_E],      A: k1 x k1 dense,   B = [B_C, B_E]: k1 x (d - k1) dense,
     [0, diag(c), 0],    c: m diagonal entries,
     [0, D,   E  ]]      D: k2 x m dense,    E: k2 x k2 dense.

Memory ``k1^2 + k1 (d - k1) + m + k2 m + k2^2``, i.e. O(d) for fixed ``k1, k2``. Such matrices form a group.
When ``d`` is too small for all blocks, ``A`` is filled first (``d <= k1``), then ``E`` (``d <= k1 + k2``), as in
the reference implementation. ``Π`` of a symmetric ``M`` keeps ``A, c, E`` and doubles ``B`` and ``D``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kronfac.curvature.structures.base import StructuredMatrix

__all__ = ["HierarchicalMatrix"]


def block_dims(dim: int, k1: int, k2: int) -> tuple[int, int, int]:
    """Sizes ``(k1', m, k2')`` of ``A``, the diagonal, and ``E`` for a matrix of dimension ``dim``."""
    if dim <= k1:
        return dim, 0, 0
    if dim <= k1 + k2:
        return k1, 0, dim - k1
    return k1, dim - k1 - k2, k2


class HierarchicalMatrix(StructuredMatrix):
    """Hierarchical matrix with a dense ``k1`` head, a diagonal middle and a dense ``k2`` tail."""

    name = "hierarchical"
    symmetric_pattern = False

    def __init__(self, A: Tensor, B: Tensor, c: Tensor, D: Tensor, E: Tensor, *, k1: int, k2: int) -> None:
        self._check_sizes(k1, k2)
        n1, m, n2 = A.shape[0], c.shape[0], E.shape[0]
        dim = n1 + m + n2
        if (n1, m, n2) != block_dims(dim, k1, k2) or A.shape != (n1, n1) or E.shape != (n2, n2):
            raise ValueError(f"Invalid blocks for dim={dim}, k1={k1}, k2={k2}: A {tuple(A.shape)}, E {tuple(E.shape)}")
        if B.shape != (n1, m + n2) or D.shape != (n2, m):
            raise ValueError(f"Invalid B {tuple(B.shape)} or D {tuple(D.shape)} for blocks ({n1}, {m}, {n2})")
        super().__init__(dim)
        self.A, self.B, self.c, self.D, self.E = A, B, c, D, E
        self.k1, self.k2 = k1, k2
        self._sizes = (n1, m, n2)

    @staticmethod
    def _check_sizes(k1: int, k2: int) -> None:
        for name, value in (("k1", k1), ("k2", k2)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"Invalid {name}: {value} (must be an integer >= 0)")

    def structure_params(self) -> dict[str, int]:
        return {"k1": self.k1, "k2": self.k2}

    @staticmethod
    def _params(params: dict[str, Any]) -> tuple[int, int]:
        if "k1" not in params or "k2" not in params:
            raise ValueError("HierarchicalMatrix needs the structure parameters k1 and k2")
        return int(params["k1"]), int(params["k2"])

    @classmethod
    def from_dense(cls, mat: Tensor, **params: Any) -> HierarchicalMatrix:
        k1, k2 = cls._params(params)
        n1, m, _ = block_dims(mat.shape[0], k1, k2)
        s = n1 + m
        return cls(
            mat[:n1, :n1].clone(),
            mat[:n1, n1:].clone(),
            mat.diagonal()[n1:s].clone(),
            mat[s:, n1:s].clone(),
            mat[s:, s:].clone(),
            k1=k1,
            k2=k2,
        )

    def to_dense(self) -> Tensor:
        n1, m, _ = self._sizes
        s = n1 + m
        mat = self.A.new_zeros(self.dim, self.dim)
        mat[:n1, :n1] = self.A
        mat[:n1, n1:] = self.B
        mat[n1:s, n1:s] = torch.diag(self.c)
        mat[s:, n1:s] = self.D
        mat[s:, s:] = self.E
        return mat

    def tensors(self) -> dict[str, Tensor]:
        return {"A": self.A, "B": self.B, "c": self.c, "D": self.D, "E": self.E}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], **params: Any) -> HierarchicalMatrix:
        k1, k2 = cls._params(params)
        return cls(tensors["A"], tensors["B"], tensors["c"], tensors["D"], tensors["E"], k1=k1, k2=k2)

    @classmethod
    def identity(
        cls, dim: int, *, dtype: torch.dtype | None = None, device: Any = None, **params: Any
    ) -> HierarchicalMatrix:
        k1, k2 = cls._params(params)
        n1, m, n2 = block_dims(dim, k1, k2)
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        return cls(
            torch.eye(n1, **kw),
            torch.zeros(n1, m + n2, **kw),
            torch.ones(m, **kw),
            torch.zeros(n2, m, **kw),
            torch.eye(n2, **kw),
            k1=k1,
            k2=k2,
        )

    def _with(self, A: Tensor, B: Tensor, c: Tensor, D: Tensor, E: Tensor) -> HierarchicalMatrix:
        return HierarchicalMatrix(A, B, c, D, E, k1=self.k1, k2=self.k2)

    def add_diagonal(self, value: float | Tensor) -> HierarchicalMatrix:
        A, E = self.A.clone(), self.E.clone()
        A.diagonal().add_(value)
        E.diagonal().add_(value)
        return self._with(A, self.B, self.c + value, self.D, E)

    def _add_diagonal_inplace(self, value: float) -> bool:
        self.A.diagonal().add_(value)
        self.c.add_(value)
        self.E.diagonal().add_(value)
        return True

    def _split(self, mat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n1, m, n2 = self._sizes
        top, mid, bottom = mat.split([n1, m, n2], dim=0)
        return top, mid, bottom

    # Products with a dense matrix: B multiplies the middle and bottom rows at once, and the sums are fused
    # (addmm, addcmul), so a product is six kernels instead of eleven.
    def matmul(self, mat: Tensor) -> Tensor:
        n1 = self._sizes[0]
        top, mid, bottom = self._split(mat)
        out_top = torch.addmm(self.A @ top, self.B, mat[n1:])
        out_bottom = torch.addmm(self.E @ bottom, self.D, mid)
        return torch.cat([out_top, self.c[:, None] * mid, out_bottom], dim=0)

    def matmul_t(self, mat: Tensor) -> Tensor:
        m = self._sizes[1]
        top, mid, bottom = self._split(mat)
        Bt_top = self.B.T @ top
        out_mid = torch.addmm(torch.addcmul(Bt_top[:m], self.c[:, None], mid), self.D.T, bottom)
        out_bottom = torch.addmm(Bt_top[m:], self.E.T, bottom)
        return torch.cat([self.A.T @ top, out_mid, out_bottom], dim=0)

    def mm(self, other: HierarchicalMatrix) -> HierarchicalMatrix:
        self._check_same(other)
        m, n2 = self._sizes[1], self._sizes[2]
        B_C, B_E = self.B.split([m, n2], dim=1)
        oB_C, oB_E = other.B.split([m, n2], dim=1)
        B = torch.cat([self.A @ oB_C + B_C * other.c[None, :] + B_E @ other.D, self.A @ oB_E + B_E @ other.E], dim=1)
        D = self.D * other.c[None, :] + self.E @ other.D
        return self._with(self.A @ other.A, B, self.c * other.c, D, self.E @ other.E)

    def trace(self) -> Tensor:
        return self.A.diagonal().sum() + self.c.sum() + self.E.diagonal().sum()

    def project(self, sym_mat: Tensor) -> HierarchicalMatrix:
        n1, m, _ = self._sizes
        s = n1 + m
        B = sym_mat[:n1, n1:] + sym_mat[n1:, :n1].T
        D = sym_mat[s:, n1:s] + sym_mat[n1:s, s:].T
        return self._with(sym_mat[:n1, :n1], B, sym_mat.diagonal()[n1:s], D, sym_mat[s:, s:])

    def _project_gram(self, factor: Tensor) -> HierarchicalMatrix:
        top, mid, bottom = self._split(factor)
        B = 2 * torch.cat([top @ mid.T, top @ bottom.T], dim=1)
        return self._with(top @ top.T, B, (mid * mid).sum(1), 2 * bottom @ mid.T, bottom @ bottom.T)

    def from_inner(self, mat: Tensor | None = None) -> HierarchicalMatrix:
        if mat is not None:
            return self._project_gram(self.matmul_t(mat))
        # Π(K^T K) from the blocks of K^T K, never forming a d x d matrix
        B_C, B_E = self.B.split([self._sizes[1], self._sizes[2]], dim=1)
        c = self.c * self.c + (B_C * B_C).sum(0) + (self.D * self.D).sum(0)
        D = 2 * (B_E.T @ B_C + self.E.T @ self.D)
        return self._with(self.A.T @ self.A, 2 * self.A.T @ self.B, c, D, B_E.T @ B_E + self.E.T @ self.E)
