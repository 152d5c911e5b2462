"""Inverse backends: how the damped Kronecker factors of one layer turn into a preconditioner.

A backend is chosen by a typed config (``EighConfig``, ``CholeskyConfig``, ...). ``config.build(A, G, damping)``
returns a :class:`KroneckerInverse`, whose ``precondition(V)`` maps a gradient matrix ``V`` (``d_o x d_i``) to
the preconditioned update. ``A`` is ``d_i x d_i`` or, for layers whose input factor is diagonal (Embedding), a
vector of length ``d_i``; ``G`` is ``d_o x d_o``.

Robustness lives in :func:`build_inverse`, shared by every backend: factors are symmetrized and upcast to
float32, a failure is retried in float64, and if that fails too the last good inverse is kept with a warning.
:func:`build_inverses` refreshes many layers at once: a backend may batch them (:meth:`InverseConfig.build_batch`;
the warm eigenbasis refresh does), and any layer whose batched result fails takes the one-layer path.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from kronfac.errors import KronfacRuntimeWarning, warn

__all__ = ["InverseConfig", "InverseRequest", "KroneckerInverse", "build_inverse", "build_inverses", "symmetrize"]


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
        # A NaN or Inf anywhere makes the sum non-finite: one reduction per tensor instead of a boolean mask (a
        # float32 sum that overflows on huge finite entries reads as non-finite, and the float64 retry decides).
        return all(bool(torch.isfinite(t.sum())) for t in self.tensors().values() if t.is_floating_point())


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


@dataclass
class InverseRequest:
    """One layer's refresh: its factors, damping and the inverse it replaces (``None`` on the first refresh)."""

    a_factor: Tensor
    g_factor: Tensor
    damping: float
    previous: KroneckerInverse | None = None
    layer: str = ""


@dataclass(kw_only=True)
class InverseConfig(ABC):
    """Base of the typed configs that select an inverse backend."""

    #: The backend reads one triangle of each factor (Cholesky): the factors are not symmetrized for it.
    reads_one_triangle: ClassVar[bool] = False

    @abstractmethod
    def build(self, a_factor: Tensor, g_factor: Tensor, damping: float) -> KroneckerInverse:
        """Factorize the damped factors. May raise ``torch.linalg.LinAlgError`` or return non-finite tensors;
        :func:`build_inverse` handles both."""

    def build_from(
        self, a_factor: Tensor, g_factor: Tensor, damping: float, previous: KroneckerInverse | None
    ) -> KroneckerInverse:
        """:meth:`build`, given the inverse being replaced (a backend may warm-start from it; the default does not)."""
        return self.build(a_factor, g_factor, damping)

    def build_batch(self, requests: Sequence[InverseRequest]) -> list[KroneckerInverse | None]:
        """Build several layers' inverses at once (factors already symmetrized and upcast); ``None`` entries (the
        default: all) take the one-layer path of :func:`build_inverse`. May raise like :meth:`build`."""
        return [None] * len(requests)


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
    if not config.reads_one_triangle:
        a_factor, g_factor = symmetrize(a_factor), symmetrize(g_factor)
    first = torch.promote_types(a_factor.dtype, torch.float32)
    dtypes = [first] if first == torch.float64 else [first, torch.float64]
    error: Exception | None = None
    for dtype in dtypes:
        try:
            inverse = config.build_from(a_factor.to(dtype), g_factor.to(dtype), damping, previous)
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


def build_inverses(config: InverseConfig, requests: Sequence[InverseRequest]) -> list[KroneckerInverse | None]:
    """:func:`build_inverse` for several layers, batched where the backend can (:meth:`InverseConfig.build_batch`,
    in float32 or the factors' wider dtype); a layer whose batched result fails (or a batch that raises) is rebuilt
    alone with the fp64 retry and the keep-the-last-good-inverse rule."""
    results: list[KroneckerInverse | None] = [None] * len(requests)
    if len(requests) > 1:
        prepared = [
            InverseRequest(*_prepared(config, r.a_factor, r.g_factor), r.damping, r.previous, r.layer) for r in requests
        ]
        try:
            results = list(config.build_batch(prepared))
        except (torch.linalg.LinAlgError, RuntimeError):
            results = [None] * len(requests)
    out = []
    for request, result in zip(requests, results):
        if result is None or not result.is_finite():
            result = build_inverse(
                config,
                request.a_factor,
                request.g_factor,
                request.damping,
                previous=request.previous,
                layer=request.layer,
            )
        out.append(result)
    return out


def _prepared(config: InverseConfig, a_factor: Tensor, g_factor: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetrized factors (unless the backend reads one triangle) in float32 or their wider dtype (the first
    attempt of :func:`build_inverse`)."""
    if not config.reads_one_triangle:
        a_factor, g_factor = symmetrize(a_factor), symmetrize(g_factor)
    dtype = torch.promote_types(a_factor.dtype, torch.float32)
    return a_factor.to(dtype), g_factor.to(dtype)
