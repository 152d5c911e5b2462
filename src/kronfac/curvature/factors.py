"""Dense Kronecker factors ``A = E[a a^T]`` and ``G = E[g g^T]`` of one layer, averaged by EMA.

``A`` is the mean over sample rows (expand: every weight-sharing position is a row; reduce: positions are
averaged first). ``G`` is scaled as if the loss were a sum over the rows chosen by ``loss_average``: with
output gradients of an averaged loss ``grad_out = g / M``, ``G = M Σ grad_out grad_out^T``. With these
normalisations ``F ≈ G ⊗ A`` (row-major vec) is exact for batch size 1 and, with K-FAC-expand, for deep linear
networks with square loss at any batch size.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from kronfac.curvature.block import (
    Approximation,
    SummedStatistics,
    reduce_input_rows,
    reduce_output_grad_rows,
)

__all__ = ["KroneckerFactors"]


class KroneckerFactors(SummedStatistics):
    """Running factors of one layer plus the batch statistics of the current curvature step.

    Args:
        d_in: input dimension ``d_i`` (with the bias column).
        d_out: output dimension ``d_o``.
        diagonal_a: keep A as a vector (inputs are one-hot indices, as for Embedding).
        approx: ``expand`` or ``reduce`` for weight-sharing positions.
        dtype: storage dtype of the factors (float32 unless asked otherwise).
        device: device of the factors.
    """

    commit_keys: ClassVar[tuple[str, ...]] = ("factor_decay",)
    symmetric_sums = True

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
        super().__init__()

    # -- batch statistics -------------------------------------------------------------------------------
    def add_inputs(self, rows: Tensor) -> None:
        if self.diagonal_a:
            flat = rows.reshape(-1)
            self._add_input_sum(torch.bincount(flat, minlength=self.d_in).to(self.dtype), flat.numel())
            return
        samples = reduce_input_rows(rows.to(self.dtype), self.approx)
        self._add_input_sum(samples.T @ samples, samples.shape[0])

    def add_output_grads(self, rows: Tensor, scale: float, count: int) -> None:
        samples = reduce_output_grad_rows(rows.to(self.dtype), self.approx)
        self._add_output_grad_sum((samples.T @ samples).mul_(scale), count)

    def add_input_factor(self, factor: Tensor, count: int) -> None:
        self._add_input_sum(self._as_layout(factor.to(self.dtype), self.diagonal_a) * count, count)

    def add_output_grad_factor(self, factor: Tensor, count: int) -> None:
        self._add_output_grad_sum(self._as_layout(factor.to(self.dtype), False) * count, count)

    def _empty_sums(self) -> tuple[Tensor, Tensor]:
        a_shape = (self.d_in,) if self.diagonal_a else (self.d_in, self.d_in)
        kw: dict[str, Any] = {"dtype": self.dtype, "device": self.device}
        return torch.zeros(a_shape, **kw), torch.zeros(self.d_out, self.d_out, **kw)

    def batch_factors(self) -> tuple[Tensor, Tensor]:
        """The pending batch estimates ``(A_batch, G_batch)``."""
        return self.batch_means()

    def commit(self, *, factor_decay: float) -> None:
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
