"""Base class of the structured matrices that SINGD keeps instead of dense Kronecker factors.

SINGD (Lin, Dangel, Eschenhagen et al., "Structured Inverse-Free Natural Gradient Descent: Memory-Efficient &
Numerically-Stable KFAC", ICML 2024, arXiv:2312.05705) stores ``K`` (``K K^T ≈ A^{-1}``) and ``C`` and their
momenta in a structure ``S`` (diagonal, block-diagonal, triangular, Toeplitz, ...). Two maps onto ``S`` matter:

* ``from_dense(M)`` is the orthogonal (Frobenius) projection ``P_S(M)``: it keeps the entries of ``M`` that the
  structure stores (averaging along a diagonal for Toeplitz structures). On an element of ``S`` it is the identity.
* ``project(M)`` is SINGD's ``Π`` for a *symmetric* ``M``:
  ``Π(M) = P_S(M + M^T) - P_S(P_S(M^T)^T)``. Where the structure stores both ``(i, j)`` and ``(j, i)`` this keeps
  ``M_ij``; where it stores only one of them (the strictly triangular parts) it takes ``M_ij + M_ji = 2 M_ij``.
  This is the map of the SINGD paper (and of its reference code) that turns the Euclidean gradient of the
  local-coordinate loss into an element of the structure's Lie algebra.

A new structure needs ``to_dense``, ``from_dense``, ``tensors``, ``from_tensors`` and ``identity``; everything
else falls back to a naive dense implementation that warns once per class and method. The structures in this
package override every operation the SINGD update uses, so the update runs in memory O(structure).

Structures are immutable values: every operation returns a new object.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from kronfac.errors import KronfacRuntimeWarning, warn

__all__ = ["StructuredMatrix", "all_finite"]

S = TypeVar("S", bound="StructuredMatrix")

_WARNED: set[tuple[str, str]] = set()


class StructuredMatrix(ABC):
    """A square matrix of dimension ``dim`` held in a structure (see the module docstring for the maps).

    Attributes:
        name: Registry name of the structure.
        closed_under_product: Whether the structure is a matrix group, so ``mm`` is exact. Otherwise ``mm``
            returns ``P_S`` of the product (the Toeplitz structure).
        symmetric_pattern: Whether ``S = S^T``, in which case ``Π = P_S``.
    """

    name: ClassVar[str]
    closed_under_product: ClassVar[bool] = True
    symmetric_pattern: ClassVar[bool] = True

    def __init__(self, dim: int) -> None:
        if dim < 1:
            raise ValueError(f"Invalid dim: {dim} (must be >= 1)")
        self.dim = dim

    # ------------------------------------------------------------------ required interface
    @classmethod
    @abstractmethod
    def from_dense(cls: type[S], mat: Tensor, **params: Any) -> S:
        """Orthogonal projection ``P_S(mat)`` of a square matrix onto the structure."""

    @abstractmethod
    def to_dense(self) -> Tensor:
        """The represented ``dim x dim`` matrix."""

    @abstractmethod
    def tensors(self) -> dict[str, Tensor]:
        """The tensors that store the matrix (exactly the structure's parameters; order is fixed)."""

    @classmethod
    @abstractmethod
    def from_tensors(cls: type[S], tensors: dict[str, Tensor], **params: Any) -> S:
        """Rebuild from :meth:`tensors` and :meth:`structure_params`."""

    @classmethod
    @abstractmethod
    def identity(cls: type[S], dim: int, *, dtype: torch.dtype | None = None, device: Any = None, **params: Any) -> S:
        """The identity matrix in this structure."""

    # ------------------------------------------------------------------ generic, structure-agnostic
    def structure_params(self) -> dict[str, int]:
        """Structural hyperparameters (block size, ...) needed to rebuild an object of the same shape."""
        return {}

    @classmethod
    def zeros(cls: type[S], dim: int, *, dtype: torch.dtype | None = None, device: Any = None, **params: Any) -> S:
        """The zero matrix in this structure."""
        eye = cls.identity(dim, dtype=dtype, device=device, **params)
        return eye.scale(0.0)

    def with_tensors(self: S, tensors: dict[str, Tensor]) -> S:
        """A matrix of this structure and structural parameters stored in ``tensors`` (as :meth:`tensors`)."""
        return type(self).from_tensors(tensors, **self.structure_params())

    def zeros_like(self: S) -> S:
        """The zero matrix with this object's structure, dtype and device."""
        return self.with_tensors({k: torch.zeros_like(v) for k, v in self.tensors().items()})

    def like(self: S, mat: Tensor) -> S:
        """``P_S(mat)`` with this object's structural parameters."""
        return type(self).from_dense(mat, **self.structure_params())

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.tensors().values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors().values())).device

    def to(self: S, dtype: torch.dtype | None = None, device: Any = None) -> S:
        return self.with_tensors({k: v.to(dtype=dtype, device=device) for k, v in self.tensors().items()})

    def clone(self: S) -> S:
        return self.with_tensors({k: v.clone() for k, v in self.tensors().items()})

    def num_params(self) -> int:
        """Number of stored scalars (the memory of one matrix in this structure, in elements)."""
        return sum(t.numel() for t in self.tensors().values())

    def is_finite(self) -> bool:
        return all_finite([self])

    def scale(self: S, alpha: float | Tensor) -> S:
        """``alpha * self``."""
        return self.with_tensors({k: v * alpha for k, v in self.tensors().items()})

    def add(self: S, other: S, alpha: float | Tensor = 1.0) -> S:
        """``self + alpha * other`` (same structure and structural parameters)."""
        self._check_same(other)
        mine, theirs = self.tensors(), other.tensors()
        if isinstance(alpha, Tensor):  # a 0-dim tensor coefficient: one fused pass, no host synchronisation
            return self.with_tensors({k: torch.addcmul(mine[k], theirs[k], alpha) for k in mine})
        return self.with_tensors({k: torch.add(mine[k], theirs[k], alpha=alpha) for k in mine})

    def __add__(self: S, other: S) -> S:
        return self.add(other)

    def __sub__(self: S, other: S) -> S:
        return self.add(other, alpha=-1.0)

    def __mul__(self: S, alpha: float | Tensor) -> S:
        return self.scale(alpha)

    __rmul__ = __mul__

    def __neg__(self: S) -> S:
        return self.scale(-1.0)

    def add_mm(self: S, left: S, right: S, alpha: float = 1.0) -> S:
        """``self + alpha * (left @ right)``; structures with a fused kernel (``addmm``) skip the temporary."""
        return self.add(left.mm(right), alpha=alpha)

    def scale_add(
        self: S, alpha: float | Tensor, terms: Sequence[tuple[S, float | Tensor]] = (), diagonal: float = 0.0
    ) -> S:
        """``alpha * self + Σ c_i M_i + diagonal * I`` for ``terms = [(M_i, c_i), ...]``, into one new set of
        tensors (one pass per term, no intermediate matrices; the coefficients may be 0-dim tensors)."""
        out = {k: v * alpha for k, v in self.tensors().items()}  # fresh tensors: the in-place updates are safe
        for other, coeff in terms:
            self._check_same(other)
            for key, tensor in other.tensors().items():
                if isinstance(coeff, Tensor):
                    out[key].addcmul_(tensor, coeff)
                else:
                    out[key].add_(tensor, alpha=coeff)
        result = self.with_tensors(out)
        if diagonal and not result._add_diagonal_inplace(diagonal):
            result = result.add_diagonal(diagonal)
        return result

    def _add_diagonal_inplace(self, value: float) -> bool:
        """Add ``value * I`` to this object's own tensors and return True, where the structure can; only
        :meth:`scale_add` calls it, on the tensors it has just made."""
        return False

    def add_diagonal(self: S, value: float | Tensor) -> S:
        """``self + value * I``."""
        eye = type(self).identity(self.dim, dtype=self.dtype, device=self.device, **self.structure_params())
        return self.add(eye, alpha=value)

    def state_dict(self) -> dict[str, Any]:
        """Plain-data description: structure name, dim, structural parameters, and the tensors."""
        return {
            "structure": self.name,
            "dim": self.dim,
            "params": dict(self.structure_params()),
            "tensors": dict(self.tensors()),
        }

    def _check_same(self, other: StructuredMatrix) -> None:
        if type(other) is not type(self) or other.dim != self.dim:
            raise ValueError(
                f"Structure mismatch: {type(self).__name__}(dim={self.dim}) vs {type(other).__name__}(dim={other.dim})"
            )
        if other.structure_params() != self.structure_params():
            raise ValueError(f"Structure parameters differ: {self.structure_params()} vs {other.structure_params()}")

    @classmethod
    def _warn_naive(cls, method: str) -> None:
        key = (cls.__name__, method)
        if key not in _WARNED:
            _WARNED.add(key)
            warn(
                f"kronfac: {cls.__name__}.{method} uses the naive dense fallback (O(dim^2) memory); "
                f"implement it with the structure to save memory and time",
                KronfacRuntimeWarning,
            )

    # ------------------------------------------------------------------ overridable, naive fallbacks
    def matmul(self, mat: Tensor) -> Tensor:
        """``self @ mat`` for a dense ``dim x n`` matrix."""
        self._warn_naive("matmul")
        return self.to_dense() @ mat

    def matmul_t(self, mat: Tensor) -> Tensor:
        """``self^T @ mat`` for a dense ``dim x n`` matrix."""
        self._warn_naive("matmul_t")
        return self.to_dense().T @ mat

    def rmatmul(self, mat: Tensor) -> Tensor:
        """``mat @ self`` for a dense ``n x dim`` matrix (through ``matmul_t``)."""
        return self.matmul_t(mat.T).T

    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, StructuredMatrix):
            return self.mm(other)
        if isinstance(other, Tensor):
            return self.matmul(other)
        return NotImplemented

    def mm(self: S, other: S) -> S:
        """``self @ other`` in the structure (exact for groups, ``P_S`` of the product otherwise)."""
        self._check_same(other)
        self._warn_naive("mm")
        return self.like(self.to_dense() @ other.to_dense())

    def outer(self) -> StructuredMatrix | None:
        """``self @ self^T`` in a form that one product applies, or ``None`` where the structure has none.

        SINGD's preconditioner ``C C^T ∇W K K^T`` then costs two products instead of four. The result may be of
        another structure (dense for the triangular ones); it is symmetric, so ``matmul`` and ``rmatmul`` apply it
        from either side. Structures whose own products are cheaper than a product with their outer (Toeplitz,
        hierarchical) keep the default ``None``.
        """
        return None

    def outer_cost(self) -> int | None:
        """What forming :meth:`outer` costs, in columns of a product with ``self`` (``None``: no outer).

        The outer pays off when it serves more columns than this before ``self`` changes: in SINGD, ``K K^T`` serves
        ``d_o`` columns a step for ``T`` steps, so it is cached when ``outer_cost() < T d_o``.
        """
        return None

    def trace(self) -> Tensor:
        """Trace of the represented matrix (0-dim tensor)."""
        self._warn_naive("trace")
        return self.to_dense().diagonal().sum()

    def project(self: S, sym_mat: Tensor) -> S:
        """SINGD's ``Π(sym_mat)`` for a symmetric ``dim x dim`` matrix, with this object's parameters."""
        if self.symmetric_pattern:
            return self.like(sym_mat)
        transposed_part = self.like(self.like(sym_mat.T).to_dense().T)
        return self.like(sym_mat + sym_mat.T).add(transposed_part, alpha=-1.0)

    def _project_gram(self: S, factor: Tensor) -> S:
        """``Π(factor @ factor^T)`` for a ``dim x n`` matrix; override to avoid the ``dim x dim`` product."""
        return self.project(factor @ factor.T)

    def from_inner(self: S, mat: Tensor | None = None) -> S:
        """``Π(self^T X X^T self)`` for ``X = mat`` (``dim x n``), or ``Π(self^T self)`` when ``mat`` is None.

        With ``X = a^T / sqrt(N)`` (``a``: ``N x dim`` batch of layer inputs) this is ``Π(K^T A K)`` without
        forming ``A``.
        """
        if mat is None:
            self._warn_naive("from_inner")
            return self._project_gram(self.to_dense().T)
        return self._project_gram(self.matmul_t(mat))

    def from_inner_matrix(self: S, sym_mat: Tensor) -> S:
        """``Π(self^T M self)`` for a symmetric ``dim x dim`` matrix ``M`` (or its diagonal as a vector)."""
        if sym_mat.ndim == 1:
            sym_mat = torch.diag(sym_mat)
        left = self.matmul_t(sym_mat)  # K^T M
        return self.project(self.matmul_t(left.T).T)  # (K^T (K^T M)^T)^T = K^T M K for symmetric M

    def __repr__(self) -> str:
        params = "".join(f", {k}={v}" for k, v in self.structure_params().items())
        return f"{type(self).__name__}(dim={self.dim}{params}, dtype={self.dtype})"


def _total(t: Tensor) -> Tensor:
    # half-precision sums would overflow long before the entries do
    return (t.sum(dtype=torch.float32) if t.dtype.itemsize < 4 else t.sum()).float()


def all_finite(matrices: Iterable[StructuredMatrix]) -> bool:
    """Whether every entry of every matrix is finite, with one reduction per tensor and one host synchronisation.

    A NaN or Inf anywhere makes a tensor's sum non-finite; that costs one pass without a boolean ``d x d`` mask
    (``isfinite(t).all()`` costs about as much as a ``d x d`` product on a CPU). Only when a sum is not finite are
    the entries checked one by one, since the sum of huge finite entries may overflow.
    """
    tensors = [t for m in matrices for t in m.tensors().values() if t.numel()]
    if not tensors or bool(torch.isfinite(torch.stack([_total(t) for t in tensors])).all()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)
