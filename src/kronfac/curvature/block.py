"""The per-layer curvature interface every method implements, and the row reductions they share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = [
    "Approximation",
    "CurvatureBlock",
    "CurvatureStatistics",
    "SummedStatistics",
    "reduce_input_rows",
    "reduce_output_grad_rows",
]


class Approximation(str, Enum):
    """How weight-sharing positions enter the factors (Eschenhagen et al. 2023)."""

    EXPAND = "expand"
    REDUCE = "reduce"


def reduce_input_rows(rows: Tensor, approx: Approximation) -> Tensor:
    """``(N, R, d)`` -> sample rows: all ``N R`` positions (expand) or the mean over positions (reduce)."""
    if approx is Approximation.REDUCE:
        return rows.mean(dim=1)
    return rows.reshape(-1, rows.shape[-1])


def reduce_output_grad_rows(rows: Tensor, approx: Approximation) -> Tensor:
    """``(N, R, d)`` -> sample rows: all positions (expand) or the sum over positions (reduce)."""
    if approx is Approximation.REDUCE:
        return rows.sum(dim=1)
    return rows.reshape(-1, rows.shape[-1])


class CurvatureStatistics(ABC):
    """Statistics of one layer fed by the capture hooks.

    The capture calls :meth:`add_inputs` in the forward pass and :meth:`add_output_grads` in the backward pass
    of a step on which a curvature update is due; the optimizer then calls :meth:`commit` to fold the batch
    statistics into the running state.
    """

    @abstractmethod
    def add_inputs(self, rows: Tensor) -> None:
        """Layer inputs as ``(N, R, d_i)`` (indices ``(N, R)`` for a diagonal A)."""

    @abstractmethod
    def add_output_grads(self, rows: Tensor, scale: float, count: int) -> None:
        """Output gradients ``(N, R, d_o)``; outer products are multiplied by ``scale``; ``count`` is how many
        samples this call starts (0 when it adds a further column of the same sample, as type2 does)."""

    @abstractmethod
    def has_pending(self) -> bool:
        """Whether both sides received data since the last commit."""

    @abstractmethod
    def pending_nonfinite(self) -> str | None:
        """Name of the first pending statistic holding NaN/Inf (e.g. ``"A"``), or ``None``."""

    @abstractmethod
    def discard_pending(self) -> None: ...

    @abstractmethod
    def commit(self, **hyper: Any) -> None:
        """Fold pending statistics into the running state and clear them."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CurvatureBlock(CurvatureStatistics):
    """Statistics plus what a method derives from them: the preconditioner of one layer."""

    def refresh(self, **hyper: Any) -> None:
        """Recompute derived state (e.g. inverses) from the running statistics."""

    @abstractmethod
    def precondition(self, grad: Tensor) -> Tensor:
        """Map the ``d_o x d_i`` gradient matrix to the update direction."""


class SummedStatistics(CurvatureStatistics):
    """Pending statistics kept as sums with counts: ``Σ`` over input rows (``count`` rows) and ``Σ`` over scaled
    output-gradient rows (``count`` samples). Subclasses decide what is summed (outer products, squares)."""

    #: Names of the two statistics in error messages (e.g. ``("A", "G")``).
    statistic_names: ClassVar[tuple[str, str]] = ("A", "G")
    _a_sum: Tensor | None
    _g_sum: Tensor | None
    _a_count: int
    _g_count: int

    def __init__(self) -> None:
        self.discard_pending()

    def _add_input_sum(self, total: Tensor, count: int) -> None:
        self._a_sum = total if self._a_sum is None else self._a_sum.add_(total)
        self._a_count += count

    def _add_output_grad_sum(self, total: Tensor, count: int) -> None:
        self._g_sum = total if self._g_sum is None else self._g_sum.add_(total)
        self._g_count += count

    def has_pending(self) -> bool:
        return self._a_sum is not None and self._g_sum is not None and self._g_count > 0

    def pending_nonfinite(self) -> str | None:
        for name, total in zip(self.statistic_names, (self._a_sum, self._g_sum)):
            if total is not None and not bool(torch.isfinite(total).all()):
                return name
        return None

    def discard_pending(self) -> None:
        self._a_sum = self._g_sum = None
        self._a_count = self._g_count = 0

    def pending_sums(self) -> tuple[Tensor | None, int, Tensor | None, int]:
        """The unnormalised batch statistics ``(Σ_a, rows, Σ_g, samples)`` (for all-reduce)."""
        return self._a_sum, self._a_count, self._g_sum, self._g_count

    def set_pending_sums(self, a_sum: Tensor, a_count: int, g_sum: Tensor, g_count: int) -> None:
        """Replace the batch statistics, e.g. by their sums over data-parallel ranks."""
        self._a_sum, self._a_count, self._g_sum, self._g_count = a_sum, a_count, g_sum, g_count

    def batch_means(self) -> tuple[Tensor, Tensor]:
        """The pending batch estimates ``(Σ_a / rows, Σ_g / samples)``."""
        if not self.has_pending():
            raise RuntimeError("no curvature statistics were captured for this layer")
        assert self._a_sum is not None and self._g_sum is not None
        return self._a_sum / self._a_count, self._g_sum / self._g_count
