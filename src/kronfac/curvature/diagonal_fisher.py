"""Diagonal Kronecker factors and the diagonal Fisher blocks of AdaFisher (Gomes et al., ICLR 2025,
"AdaFisher: Adaptive Second Order Optimization via Fisher Information").

AdaFisher keeps only the diagonals of K-FAC's factors: ``H = diag(A)``, the per-batch mean of ``a ⊙ a`` over the
sample rows the adapters produce (conv: unfolded patches), and ``S = diag(G)``, the same mean of ``g ⊙ g`` with the
core's Fisher scaling (:mod:`kronfac.curvature.factors`). Each batch vector is min-max normalised to ``[0, 1]``
before it is averaged into the running value, so any positive constant factor of a statistic drops out.

The averaging is a proper EMA by default, ``H <- γ H + (1-γ) Ĥ`` (the first update takes ``Ĥ`` as it is). The
reference implementation (github.com/AtlasAnalyticsLab/AdaFisher) instead starts from ones and updates
``H <- 0.08 H + 0.008 Ĥ``: the coefficients do not sum to 1, so the factors shrink towards
``0.008 / 0.92 ≈ 0.0087`` times the normalised statistics and ``F_D`` ends up dominated by the damping λ.
``averaging="reference"`` reproduces it.

Blocks (``F`` has the shape of the layer's gradient matrix; the update divides by it elementwise):

* :class:`DiagonalKroneckerBlock` (Linear, Conv2d, Embedding): ``F = S H^T + λ`` (``d_o x d_i``, bias last column).
* :class:`ScaleShiftBlock` (LayerNorm, BatchNorm): per channel ``c``, ``y_c = γ_c x̂_c + β_c``, with ``H_c`` the mean
  of ``x̂_c²`` and ``S_c`` the mean of ``g_c²``; the scale gets ``F_γ = H ⊙ S + λ``, the shift ``F_β = S + λ``.
"""

from __future__ import annotations

from abc import abstractmethod
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from kronfac.curvature.block import (
    Approximation,
    CurvatureBlock,
    SummedStatistics,
    reduce_input_rows,
    reduce_output_grad_rows,
)

__all__ = [
    "MINMAX_EPS",
    "REFERENCE_NEW_WEIGHT",
    "REFERENCE_OLD_WEIGHT",
    "DiagonalFactors",
    "DiagonalKroneckerBlock",
    "FactorAveraging",
    "ScaleShiftBlock",
    "minmax_normalize",
]

#: Relative floor of the min-max range: differences below ``MINMAX_EPS · max|v|`` are not blown up to ``[0, 1]``.
#: The reference adds an absolute 1e-6 to the range; kronfac's statistics are of per-sample gradients (the
#: reference's of an averaged loss), so a floor relative to the largest entry keeps the result scale-free.
MINMAX_EPS = 1e-6
#: The reference code's averaging coefficients (``gamma = 0.8``: ``0.1 γ`` on the old value, ``0.01 γ`` on the new).
REFERENCE_OLD_WEIGHT = 0.08
REFERENCE_NEW_WEIGHT = 0.008


class FactorAveraging(str, Enum):
    """How normalised batch statistics enter the running factors."""

    EMA = "ema"
    REFERENCE = "reference"


def minmax_normalize(v: Tensor, eps: float = MINMAX_EPS) -> Tensor:
    """``1 - (max v - v) / max(max v - min v, eps · max|v|)``: entries in ``[0, 1]``.

    Whenever the range is above the floor this is min-max normalisation, ``(v - min v) / (max v - min v)``. A
    constant vector (e.g. the position frequencies of a fixed-length sequence) maps to ones, not zeros: every
    entry is at the maximum. The reference's ``(v - min) / (max - min + 1e-6)`` maps it to zeros, which makes
    ``F_D = λ`` and the step ``lr / λ`` times the momentum for the whole layer.
    """
    low, high = v.min(), v.max()
    span = torch.maximum(high - low, eps * v.abs().max())
    span = torch.where(span > 0, span, torch.ones_like(span))
    return 1.0 - (high - v) / span


class DiagonalFactors(SummedStatistics, CurvatureBlock):
    """Running diagonal factors ``H`` (``d_in``) and ``S`` (``d_out``) plus the current batch sums.

    Args:
        d_in: length of ``H`` (input features with the bias entry; vocabulary for Embedding; channels for norms).
        d_out: length of ``S``.
        diagonal_a: inputs are integer indices (one-hot, Embedding): ``a ⊙ a`` is the token frequency.
        approx: ``expand`` or ``reduce`` for weight-sharing positions.
        averaging: ``"ema"`` (default) or ``"reference"`` (see the module docstring).
        dtype: storage dtype of the factors.
        device: device of the factors.
    """

    statistic_names = ("H", "S")
    commit_keys = ("factor_decay",)

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        diagonal_a: bool = False,
        approx: Approximation = Approximation.EXPAND,
        averaging: FactorAveraging = FactorAveraging.EMA,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        self.d_in, self.d_out = d_in, d_out
        self.diagonal_a, self.approx, self.averaging = diagonal_a, approx, FactorAveraging(averaging)
        self.dtype, self.device = dtype, device
        self.a_diag: Tensor | None = None
        self.g_diag: Tensor | None = None
        self._cache: tuple[float, Tensor] | None = None
        self.damping: float | None = None
        SummedStatistics.__init__(self)

    # -- batch statistics -------------------------------------------------------------------------------
    def add_inputs(self, rows: Tensor) -> None:
        if self.diagonal_a:
            flat = rows.reshape(-1)
            self._add_input_sum(torch.bincount(flat, minlength=self.d_in).to(self.dtype), flat.numel())
            return
        samples = reduce_input_rows(rows.to(self.dtype), self.approx)
        self._add_input_sum(samples.square().sum(dim=0), samples.shape[0])

    def add_output_grads(self, rows: Tensor, scale: float, count: int) -> None:
        samples = reduce_output_grad_rows(rows.to(self.dtype), self.approx)
        self._add_output_grad_sum(samples.square().sum(dim=0).mul_(scale), count)

    def add_input_factor(self, factor: Tensor, count: int) -> None:
        self._add_input_sum(self._as_layout(factor.to(self.dtype), True) * count, count)

    def add_output_grad_factor(self, factor: Tensor, count: int) -> None:
        self._add_output_grad_sum(self._as_layout(factor.to(self.dtype), True) * count, count)

    def _empty_sums(self) -> tuple[Tensor, Tensor]:
        kw: dict[str, Any] = {"dtype": self.dtype, "device": self.device}
        return torch.zeros(self.d_in, **kw), torch.zeros(self.d_out, **kw)

    def batch_diagonals(self) -> tuple[Tensor, Tensor]:
        """The pending per-batch means ``(Ĥ, Ŝ)`` before normalisation."""
        return self.batch_means()

    def commit(self, *, factor_decay: float) -> None:
        """Min-max normalise the batch diagonals and average them into ``H`` and ``S``."""
        a_batch, g_batch = (minmax_normalize(v) for v in self.batch_diagonals())
        if self.averaging is FactorAveraging.REFERENCE:
            if self.a_diag is None or self.g_diag is None:
                self.a_diag, self.g_diag = torch.ones_like(a_batch), torch.ones_like(g_batch)
            self.a_diag.mul_(REFERENCE_OLD_WEIGHT).add_(a_batch, alpha=REFERENCE_NEW_WEIGHT)
            self.g_diag.mul_(REFERENCE_OLD_WEIGHT).add_(g_batch, alpha=REFERENCE_NEW_WEIGHT)
        elif self.a_diag is None or self.g_diag is None:
            self.a_diag, self.g_diag = a_batch, g_batch
        else:
            self.a_diag.mul_(factor_decay).add_(a_batch, alpha=1.0 - factor_decay)
            self.g_diag.mul_(factor_decay).add_(g_batch, alpha=1.0 - factor_decay)
        self._cache = None
        self.discard_pending()

    # -- the diagonal Fisher ----------------------------------------------------------------------------
    @abstractmethod
    def _fisher(self, damping: float) -> Tensor:
        """``F`` from the running diagonals (both exist)."""

    def fisher(self, damping: float) -> Tensor | None:
        """``F`` with damping ``λ``, shaped like the gradient matrix; ``None`` before the first statistics."""
        if self.a_diag is None or self.g_diag is None:
            return None
        if self._cache is None or self._cache[0] != damping:
            self._cache = (damping, self._fisher(damping))
        return self._cache[1]

    def refresh(self, damping: float) -> None:
        """Set the damping λ that :meth:`precondition` uses."""
        self.damping = float(damping)

    def precondition(self, grad: Tensor) -> Tensor:
        """``grad / F`` with the damping of the last :meth:`refresh` (``grad`` unchanged before any statistics)."""
        if self.damping is None:
            raise RuntimeError("call refresh(damping=...) before precondition()")
        fisher = self.fisher(self.damping)
        return grad if fisher is None else grad / fisher.to(grad.dtype)

    # -- checkpointing ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"a_diag": self.a_diag, "g_diag": self.g_diag}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.a_diag = None if state["a_diag"] is None else state["a_diag"].detach().clone()
        self.g_diag = None if state["g_diag"] is None else state["g_diag"].detach().clone()
        self._cache = None
        self.discard_pending()


class DiagonalKroneckerBlock(DiagonalFactors):
    """``F_D = diag(S) diag(H)^T + λ``, the ``d_o x d_i`` diagonal of ``S ⊗ H`` shaped like ``W``."""

    def _fisher(self, damping: float) -> Tensor:
        assert self.a_diag is not None and self.g_diag is not None
        return torch.outer(self.g_diag, self.a_diag).add_(damping)


class ScaleShiftBlock(DiagonalFactors):
    """Normalisation layers: ``H``, ``S`` over the ``C`` channels; ``F = [H ⊙ S + λ, S + λ]`` as ``C x 2``
    (``C x 1`` without a shift), matching the norm adapters' gradient matrix ``[∇γ, ∇β]``.

    Args:
        channels: number of normalised features ``C``.
        shift: whether the layer has a shift (bias) parameter.
        **kwargs: as for :class:`DiagonalFactors`.
    """

    def __init__(self, channels: int, *, shift: bool, **kwargs: Any) -> None:
        super().__init__(channels, channels, **kwargs)
        self.shift = shift

    def _fisher(self, damping: float) -> Tensor:
        assert self.a_diag is not None and self.g_diag is not None
        columns = [self.a_diag * self.g_diag]
        if self.shift:
            columns.append(self.g_diag)
        return torch.stack(columns, dim=1).add_(damping)
