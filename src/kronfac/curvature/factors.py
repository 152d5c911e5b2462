"""Dense Kronecker factors ``A = E[a a^T]`` and ``G = E[g g^T]`` of one layer, averaged by EMA.

``A`` is the mean over sample rows (expand: every weight-sharing position is a row; reduce: positions are
averaged first). ``G`` is scaled as if the loss were a sum over the rows chosen by ``loss_average``: with
output gradients of an averaged loss ``grad_out = g / M``, ``G = M Σ grad_out grad_out^T``. With these
normalisations ``F ≈ G ⊗ A`` (row-major vec) is exact for batch size 1 and, with K-FAC-expand, for deep linear
networks with square loss at any batch size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kronfac.curvature.block import (
    Approximation,
    CurvatureStatistics,
    reduce_input_rows,
    reduce_output_grad_rows,
)

__all__ = ["KroneckerFactors"]


class KroneckerFactors(CurvatureStatistics):
    """Running factors of one layer plus the batch statistics of the current curvature step.

    Args:
        d_in: input dimension ``d_i`` (with the bias column).
        d_out: output dimension ``d_o``.
        diagonal_a: keep A as a vector (inputs are one-hot indices, as for Embedding).
        approx: ``expand`` or ``reduce`` for weight-sharing positions.
        dtype: storage dtype of the factors (float32 unless asked otherwise).
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        diagonal_a: bool = False,
        approx: Approximation = Approximation.EXPAND,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
    ) -> None:
        self.d_in, self.d_out = d_in, d_out
        self.diagonal_a, self.approx, self.dtype, self.device = diagonal_a, approx, dtype, device
        self.a_factor: Tensor | None = None
        self.g_factor: Tensor | None = None
        self._a_sum: Tensor | None = None
        self._g_sum: Tensor | None = None
        self._a_count = 0
        self._g_count = 0

    # -- batch statistics -------------------------------------------------------------------------------
    def add_inputs(self, rows: Tensor) -> None:
        if self.diagonal_a:
            flat = rows.reshape(-1)
            counts = torch.bincount(flat, minlength=self.d_in).to(self.dtype)
            self._a_sum = counts if self._a_sum is None else self._a_sum + counts
            self._a_count += flat.numel()
            return
        samples = reduce_input_rows(rows.to(self.dtype), self.approx)
        if self._a_sum is None:
            self._a_sum = samples.T @ samples
        else:
            self._a_sum.addmm_(samples.T, samples)
        self._a_count += samples.shape[0]

    def add_output_grads(self, rows: Tensor, scale: float, count: int) -> None:
        samples = reduce_output_grad_rows(rows.to(self.dtype), self.approx)
        outer = (samples.T @ samples).mul_(scale)
        self._g_sum = outer if self._g_sum is None else self._g_sum.add_(outer)
        self._g_count += count

    def has_pending(self) -> bool:
        return self._a_sum is not None and self._g_sum is not None and self._g_count > 0

    def pending_nonfinite(self) -> str | None:
        if self._a_sum is not None and not bool(torch.isfinite(self._a_sum).all()):
            return "A"
        if self._g_sum is not None and not bool(torch.isfinite(self._g_sum).all()):
            return "G"
        return None

    def discard_pending(self) -> None:
        self._a_sum = self._g_sum = None
        self._a_count = self._g_count = 0

    def pending_sums(self) -> tuple[Tensor | None, int, Tensor | None, int]:
        """The unnormalised batch statistics ``(Σ a a^T, rows, Σ_scaled g g^T, samples)`` (for all-reduce)."""
        return self._a_sum, self._a_count, self._g_sum, self._g_count

    def set_pending_sums(self, a_sum: Tensor, a_count: int, g_sum: Tensor, g_count: int) -> None:
        """Replace the batch statistics, e.g. by their sums over data-parallel ranks."""
        self._a_sum, self._a_count, self._g_sum, self._g_count = a_sum, a_count, g_sum, g_count

    def batch_factors(self) -> tuple[Tensor, Tensor]:
        """The pending batch estimates ``(A_batch, G_batch)``."""
        if not self.has_pending():
            raise RuntimeError("no curvature statistics were captured for this layer")
        assert self._a_sum is not None and self._g_sum is not None
        return self._a_sum / self._a_count, self._g_sum / self._g_count

    def commit(self, *, factor_decay: float = 0.95, **_: Any) -> None:
        """EMA ``F <- ρ F + (1-ρ) F_batch``; the first update takes the batch estimate as it is."""
        a_batch, g_batch = self.batch_factors()
        if self.a_factor is None or self.g_factor is None:
            self.a_factor, self.g_factor = a_batch, g_batch
        else:
            self.a_factor.mul_(factor_decay).add_(a_batch, alpha=1.0 - factor_decay)
            self.g_factor.mul_(factor_decay).add_(g_batch, alpha=1.0 - factor_decay)
        self.discard_pending()

    def state_dict(self) -> dict[str, Any]:
        return {"a_factor": self.a_factor, "g_factor": self.g_factor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.a_factor = _clone(state["a_factor"])
        self.g_factor = _clone(state["g_factor"])
        self.discard_pending()


def _clone(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().clone()
