"""The per-layer curvature interface every method implements, and the row reductions they share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = [
    "Approximation",
    "CurvatureBlock",
    "CurvatureStatistics",
    "PendingStatistics",
    "SummedStatistics",
    "reduce_input_rows",
    "reduce_output_grad_rows",
    "refresh_blocks",
]


class Approximation(str, Enum):
    """How weight-sharing positions enter the factors (Eschenhagen et al. 2023)."""

    EXPAND = "expand"
    REDUCE = "reduce"


def reduce_input_rows(rows: Tensor, approx: Approximation) -> Tensor:
    """``(N, R, d)`` -> sample rows: all ``N R`` positions (expand) or the mean over positions (reduce).

    Positions may span several dimensions, ``(N, R, P, d)`` (a KronA factor: sequence entries and the other
    factor's side); they are treated as ``R P`` positions."""
    if approx is Approximation.REDUCE:
        return rows.flatten(1, -2).mean(dim=1)
    return rows.reshape(-1, rows.shape[-1])


def reduce_output_grad_rows(rows: Tensor, approx: Approximation) -> Tensor:
    """``(N, R, d)`` (or ``(N, R, P, d)``) -> sample rows: all positions (expand) or their sum (reduce)."""
    if approx is Approximation.REDUCE:
        return rows.flatten(1, -2).sum(dim=1)
    return rows.reshape(-1, rows.shape[-1])


@dataclass
class PendingStatistics:
    """One layer's batch statistics as a communicator sees them (to reduce them over data-parallel ranks).

    Attributes:
        a_count: input rows the input-side statistics were summed over.
        g_count: samples the output-side statistics were summed over.
        sums: tensors that are sums over rows: the reduction adds them up (same shapes on every rank).
        rows: tensors of rows (dim 0): the reduction concatenates them in rank order (CG-FAC keeps rows).
        symmetric: names in ``sums`` that are symmetric matrices (a packer may send only upper triangles).
    """

    a_count: int
    g_count: int
    sums: dict[str, Tensor] = field(default_factory=dict)
    rows: dict[str, Tensor] = field(default_factory=dict)
    symmetric: frozenset[str] = frozenset()


class CurvatureStatistics(ABC):
    """Statistics of one layer fed by the capture hooks.

    The capture calls :meth:`add_inputs` in the forward pass and :meth:`add_output_grads` in the backward pass
    of a step on which a curvature update is due; the optimizer then calls :meth:`commit` with the group
    hyperparameters named in :attr:`commit_keys` to fold the batch statistics into the running state.
    """

    #: The group hyperparameters :meth:`commit` takes (as keyword arguments, nothing else).
    commit_keys: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def add_inputs(self, rows: Tensor) -> None:
        """Layer inputs as ``(N, R, d_i)`` (indices ``(N, R)`` for a diagonal A)."""

    @abstractmethod
    def add_output_grads(self, rows: Tensor, scale: float, count: int) -> None:
        """Output gradients ``(N, R, d_o)``; outer products are multiplied by ``scale``; ``count`` is how many
        samples this call starts (0 when it adds a further column of the same sample, as type2 does)."""

    def add_input_factor(self, factor: Tensor, count: int) -> None:
        """Add a batch estimate of the input-side factor ``A`` (a mean over ``count`` rows; a matrix, or a vector
        for a diagonal) as if ``count`` rows had produced it (a shared parameter's fitted factor)."""
        raise NotImplementedError(f"{type(self).__name__} cannot take a fitted factor (shared parameters)")

    def add_output_grad_factor(self, factor: Tensor, count: int) -> None:
        """Add a batch estimate of the output-side factor ``G`` (already scaled, a mean over ``count`` samples)."""
        raise NotImplementedError(f"{type(self).__name__} cannot take a fitted factor (shared parameters)")

    @abstractmethod
    def has_pending(self) -> bool:
        """Whether both sides received data since the last commit."""

    @abstractmethod
    def pending_nonfinite(self) -> str | None:
        """Name of the first pending statistic holding NaN/Inf (e.g. ``"A"``), or ``None``."""

    @abstractmethod
    def discard_pending(self) -> None: ...

    @abstractmethod
    def commit(self, *args: Any, **hyper: Any) -> str | None:
        """Fold pending statistics into the running state and clear them. Returns ``None``, or the name of what
        turned non-finite in the update (the running state is then left as it was)."""

    @abstractmethod
    def pending_counts(self) -> tuple[int, int]:
        """``(input rows, samples)`` of the pending statistics."""

    @abstractmethod
    def pending_statistics(self) -> PendingStatistics:
        """The pending statistics (zeros of the right shapes and zero counts when there are none)."""

    @abstractmethod
    def set_pending_statistics(self, statistics: PendingStatistics) -> None:
        """Replace the pending statistics, e.g. by their reduction over ranks (zero counts: drop them)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CurvatureBlock(CurvatureStatistics):
    """Statistics plus what a method derives from them: the preconditioner of one layer."""

    def refresh(self, damping: float) -> None:
        """Recompute derived state (inverses, the damped diagonal) from the running statistics."""

    @classmethod
    def refresh_many(cls, work: list[tuple[CurvatureBlock, float]]) -> None:
        """:meth:`refresh` for several blocks of this type, each with its damping; a type may batch them."""
        for block, damping in work:
            block.refresh(damping)

    @abstractmethod
    def precondition(self, grad: Tensor) -> Tensor:
        """Map the ``d_o x d_i`` gradient matrix to the update direction."""


def all_finite(tensor: Tensor) -> bool:
    """Whether every entry is finite: one reduction (a NaN or Inf makes the sum non-finite), with the elementwise
    test only when the sum is not finite (it may have overflowed on huge finite entries)."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def refresh_blocks(work: list[tuple[CurvatureBlock, float]]) -> None:
    """Refresh every ``(block, damping)``, blocks of one type together (:meth:`CurvatureBlock.refresh_many`)."""
    by_type: dict[type[CurvatureBlock], list[tuple[CurvatureBlock, float]]] = {}
    for block, damping in work:
        by_type.setdefault(type(block), []).append((block, damping))
    for cls, items in by_type.items():
        cls.refresh_many(items)


class SummedStatistics(CurvatureStatistics):
    """Pending statistics kept as sums with counts: ``Σ`` over input rows (``count`` rows) and ``Σ`` over scaled
    output-gradient rows (``count`` samples). Subclasses decide what is summed (outer products, squares)."""

    #: Names of the two statistics in error messages (e.g. ``("A", "G")``).
    statistic_names: ClassVar[tuple[str, str]] = ("A", "G")
    #: Whether matrix-shaped sums are symmetric (outer products), so they can travel as upper triangles.
    symmetric_sums: ClassVar[bool] = False
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
            if total is not None and not all_finite(total):
                return name
        return None

    def discard_pending(self) -> None:
        self._a_sum = self._g_sum = None
        self._a_count = self._g_count = 0

    @abstractmethod
    def _empty_sums(self) -> tuple[Tensor, Tensor]:
        """Zeros shaped like the two sums (for a rank whose layer saw no data)."""

    def pending_counts(self) -> tuple[int, int]:
        return self._a_count, self._g_count

    def pending_statistics(self) -> PendingStatistics:
        a_sum, g_sum = self._a_sum, self._g_sum
        if a_sum is None or g_sum is None:
            a_sum, g_sum = self._empty_sums()
        names = self.statistic_names
        symmetric = frozenset(n for n, t in zip(names, (a_sum, g_sum)) if t.ndim == 2 and self.symmetric_sums)
        counts = (self._a_count, self._g_count) if self.has_pending() else (0, 0)
        return PendingStatistics(*counts, sums={names[0]: a_sum, names[1]: g_sum}, symmetric=symmetric)

    def set_pending_statistics(self, statistics: PendingStatistics) -> None:
        if statistics.a_count <= 0 or statistics.g_count <= 0:
            self.discard_pending()
            return
        a_name, g_name = self.statistic_names
        self._a_sum, self._g_sum = statistics.sums[a_name], statistics.sums[g_name]
        self._a_count, self._g_count = statistics.a_count, statistics.g_count

    @staticmethod
    def _as_layout(factor: Tensor, like_vector: bool) -> Tensor:
        """A factor in a block's layout: a vector keeps the diagonal of a matrix, a matrix places a vector on it."""
        if like_vector:
            return factor.diagonal() if factor.ndim == 2 else factor
        return torch.diag(factor) if factor.ndim == 1 else factor

    def batch_means(self) -> tuple[Tensor, Tensor]:
        """The pending batch estimates ``(Σ_a / rows, Σ_g / samples)``."""
        if not self.has_pending():
            raise RuntimeError("no curvature statistics were captured for this layer")
        assert self._a_sum is not None and self._g_sum is not None
        return self._a_sum / self._a_count, self._g_sum / self._g_count
