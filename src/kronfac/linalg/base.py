"""Inverse backends: how the damped Kronecker factors of one layer turn into a preconditioner.

A backend is chosen by a typed config (``EighConfig``, ``CholeskyConfig``, ...). ``config.build(A, G, damping)``
returns a :class:`KroneckerInverse`, whose ``precondition(V)`` maps a gradient matrix ``V`` (``d_o x d_i``) to
the preconditioned update. ``A`` is ``d_i x d_i`` or, for layers whose input factor is diagonal (Embedding), a
vector of length ``d_i``; ``G`` is ``d_o x d_o``.

Robustness lives in :func:`build_inverse`, shared by every backend: factors are symmetrized and upcast to
float32, a failure is retried in float64, and if that fails too the last good inverse is kept with a warning.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from kronfac.errors import KronfacRuntimeWarning, warn

__all__ = ["InverseConfig", "KroneckerInverse", "build_inverse", "symmetrize"]


def symmetrize(matrix: Tensor) -> Tensor:
    """Return ``(M + M^T) / 2`` for a matrix, or the vector unchanged (a diagonal factor)."""
    if matrix.ndim == 1:
        return matrix
    return 0.5 * (matrix + matrix.T)


class KroneckerInverse(ABC):
    """A damped inverse of ``G ⊗ A`` (row-major vec) for one layer, applied without forming it."""

    #: Name under which the config registry finds the class again when a state_dict is loaded.
    kind: ClassVar[str]

    @abstractmethod
    def precondition(self, grad: Tensor) -> Tensor:
        """Return the preconditioned gradient matrix (same shape and dtype as ``grad``, ``d_o x d_i``)."""

    @abstractmethod
    def tensors(self) -> dict[str, Tensor]:
        """Everything needed to rebuild this inverse exactly (for ``state_dict``)."""

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> KroneckerInverse:
        """Rebuild from :meth:`tensors`; the default passes them as keyword arguments."""
        return cls(**tensors)

    def is_finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in self.tensors().values())


_INVERSE_KINDS: dict[str, type[KroneckerInverse]] = {}


def register_inverse(cls: type[KroneckerInverse]) -> type[KroneckerInverse]:
    """Class decorator: make a :class:`KroneckerInverse` loadable from a state_dict by its ``kind``."""
    _INVERSE_KINDS[cls.kind] = cls
    return cls


def inverse_from_state(state: dict[str, Any]) -> KroneckerInverse:
    """Inverse of :meth:`KroneckerInverse.tensors` plus its kind, as stored in an optimizer state_dict."""
    kind = state["kind"]
    if kind not in _INVERSE_KINDS:
        raise ValueError(f"Unknown inverse kind {kind!r} in state_dict; known: {sorted(_INVERSE_KINDS)}")
    return _INVERSE_KINDS[kind].from_tensors(dict(state["tensors"]))


def inverse_to_state(inverse: KroneckerInverse) -> dict[str, Any]:
    return {"kind": inverse.kind, "tensors": {k: v.clone() for k, v in inverse.tensors().items()}}


@dataclass(kw_only=True)
class InverseConfig(ABC):
    """Base of the typed configs that select an inverse backend."""

    @abstractmethod
    def build(self, a_factor: Tensor, g_factor: Tensor, damping: float) -> KroneckerInverse:
        """Factorize the damped factors. May raise ``torch.linalg.LinAlgError`` or return non-finite tensors;
        :func:`build_inverse` handles both."""


def build_inverse(
    config: InverseConfig,
    a_factor: Tensor,
    g_factor: Tensor,
    damping: float,
    *,
    previous: KroneckerInverse | None,
    layer: str,
) -> KroneckerInverse | None:
    """Build an inverse robustly: fp32 (or the factors' wider dtype) first, then float64, else keep ``previous``.

    Returns ``previous`` (possibly ``None``) with a :class:`RuntimeWarning` when both attempts fail.
    """
    a_factor, g_factor = symmetrize(a_factor), symmetrize(g_factor)
    first = torch.promote_types(a_factor.dtype, torch.float32)
    dtypes = [first] if first == torch.float64 else [first, torch.float64]
    error: Exception | None = None
    for dtype in dtypes:
        try:
            inverse = config.build(a_factor.to(dtype), g_factor.to(dtype), damping)
        except (torch.linalg.LinAlgError, RuntimeError) as exc:  # eigh/cholesky failures
            error = exc
            continue
        if inverse.is_finite():
            return inverse
        error = FloatingPointError("non-finite inverse")
    warn(
        f"kronfac: inverting the factors of layer {layer!r} failed ({error}); keeping the last good inverse"
        + ("" if previous is not None else " (none yet: the layer takes a damped gradient step)"),
        KronfacRuntimeWarning,
    )
    return previous
