"""Per-factor pieces of a Kronecker inverse, so that different ranks can invert ``A`` and ``G`` of one layer.

For the eigendecomposition backend the pieces are ``(Q, s)`` of each factor and the damping enters only when
they are combined; for the Cholesky backend they are the two damped inverses, with the π correction computed
from both factors' traces (cheap, every rank has the factors). Each piece is computed exactly as
:func:`kronfac.linalg.base.build_inverse` would (symmetrize, upcast to at least float32, float64 retry), so a
distributed run reproduces the single-process inverse. A piece that fails in both precisions comes back as
NaN, and the layer keeps its previous inverse on every rank.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kronfac.curvature.factors import KroneckerFactors
from kronfac.errors import KronfacRuntimeWarning, warn
from kronfac.linalg.base import InverseConfig, KroneckerInverse, symmetrize
from kronfac.linalg.cholesky import CholeskyConfig, CholeskyInverse, pi_correction
from kronfac.linalg.eigh import EighConfig, EighInverse

__all__ = ["FactorwiseInverse"]


def _upcast(factor: Tensor) -> torch.dtype:
    return torch.promote_types(factor.dtype, torch.float32)


def _attempts(dtype: torch.dtype) -> list[torch.dtype]:
    return [dtype] if dtype == torch.float64 else [dtype, torch.float64]


class FactorwiseInverse:
    """Computes, ships and assembles per-factor inverse pieces for :class:`EighConfig` / :class:`CholeskyConfig`.

    Args:
        config: the optimizer's inverse backend config.
    """

    def __init__(self, config: InverseConfig) -> None:
        if not self.supports(config):
            raise TypeError(f"no per-factor split for {type(config).__name__}")
        self.config = config

    @staticmethod
    def supports(config: InverseConfig) -> bool:
        return type(config) in (EighConfig, CholeskyConfig)

    def numel(self, dim: int) -> int:
        """Elements of the flat piece of a dense ``dim x dim`` factor."""
        return dim * dim + (dim if isinstance(self.config, EighConfig) else 0)

    def _factors(self, block: KroneckerFactors) -> tuple[Tensor, Tensor]:
        assert block.a_factor is not None and block.g_factor is not None
        return symmetrize(block.a_factor), symmetrize(block.g_factor)

    def _shifts(self, block: KroneckerFactors, damping: float) -> dict[str, float]:
        a_factor, g_factor = self._factors(block)
        dtype = _upcast(a_factor)
        assert isinstance(self.config, CholeskyConfig)
        pi = pi_correction(a_factor.to(dtype), g_factor.to(dtype)) if self.config.pi_correction else 1.0
        root = math.sqrt(damping)
        return {"A": pi * root, "G": root / pi}

    def compute(self, block: KroneckerFactors, factor: str, damping: float) -> Tensor:
        """The flat piece of ``factor`` (``"A"`` or ``"G"``) of ``block``; NaN if it cannot be computed."""
        a_factor, g_factor = self._factors(block)
        matrix = a_factor if factor == "A" else g_factor
        dtype = _upcast(matrix)
        shift = self._shifts(block, damping)[factor] if isinstance(self.config, CholeskyConfig) else 0.0
        if matrix.ndim == 1:
            return self._diagonal(matrix.to(dtype), shift)
        for attempt in _attempts(dtype):
            try:
                piece = self._dense(matrix.to(attempt), shift, self._warm_start(block, factor, matrix.to(attempt)))
            except (torch.linalg.LinAlgError, RuntimeError):
                continue
            if bool(torch.isfinite(piece).all()):
                return piece.to(dtype)
        return torch.full((self.numel(matrix.shape[0]),), math.nan, dtype=dtype, device=matrix.device)

    def _warm_start(self, block: KroneckerFactors, factor: str, matrix: Tensor) -> Tensor | None:
        """The previous basis of ``factor`` when the Eigh config warm-starts this refresh (every rank holds the
        same previous inverse, so every rank decides alike)."""
        if not isinstance(self.config, EighConfig):
            return None
        return self.config.warm_start(getattr(block, "inverse", None), factor, matrix)

    def _dense(self, matrix: Tensor, shift: float, basis: Tensor | None = None) -> Tensor:
        if isinstance(self.config, EighConfig):
            ((q, s),) = self.config.eigenpairs([matrix], [basis])
            return torch.cat([q.reshape(-1), s])
        eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
        chol, info = torch.linalg.cholesky_ex(matrix + shift * eye)
        if int(info) != 0:
            raise torch.linalg.LinAlgError(f"Cholesky failed at minor {int(info)}")
        return torch.cholesky_inverse(chol).reshape(-1)

    def _diagonal(self, vector: Tensor, shift: float) -> Tensor:
        if isinstance(self.config, EighConfig):
            return vector.clamp_min(self.config.min_eigenvalue)
        shifted = vector + shift
        return torch.where(shifted > 0, 1.0 / shifted, torch.full_like(shifted, math.nan))

    def assemble(
        self, block: KroneckerFactors, pieces: dict[str, Tensor], damping: float, layer: str
    ) -> KroneckerInverse | None:
        """Combine the two pieces; returns ``None`` (with a warning) when either is non-finite."""
        if not all(bool(torch.isfinite(p).all()) for p in pieces.values()):
            warn(
                f"kronfac: inverting the factors of layer {layer!r} failed; keeping the last good inverse",
                KronfacRuntimeWarning,
            )
            return None
        a_piece, g_piece = pieces["A"], pieces["G"]
        d_a, d_g = block.d_in, block.d_out
        if isinstance(self.config, EighConfig):
            q_g, s_g = g_piece[: d_g * d_g].reshape(d_g, d_g), g_piece[d_g * d_g :]
            if block.diagonal_a:
                q_a, s_a = a_piece.new_empty(0), a_piece
            else:
                q_a, s_a = a_piece[: d_a * d_a].reshape(d_a, d_a), a_piece[d_a * d_a :]
            age = self.config.next_age(getattr(block, "inverse", None))
            return EighInverse(q_a, s_a, q_g, s_g, torch.tensor(float(damping), dtype=s_g.dtype), age)
        a_inv = a_piece if block.diagonal_a else a_piece.reshape(d_a, d_a)
        return CholeskyInverse(a_inv, g_piece.reshape(d_g, d_g))
