"""Which rank inverts which Kronecker factor (SPD-KFAC's load-balanced placement, Shi et al. 2021).

Decomposing a ``d x d`` factor costs ``~d^3``. Factors are sorted by that cost and, largest first, each goes to
the rank with the least work so far (greedy longest-processing-time scheduling, within 4/3 of the optimal
makespan). Factors with ``d <= small_factor_threshold`` are inverted by every rank: their broadcast would cost
more than recomputing them. Every rank builds the same assignment from the same layer list, so no
communication is needed to agree on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["FactorSpec", "WorkAssignment"]


@dataclass(frozen=True)
class FactorSpec:
    """One factor to invert: ``factor`` is ``"A"`` or ``"G"``; a diagonal factor (Embedding's A) is a vector."""

    layer: str
    factor: str
    dim: int
    diagonal: bool = False

    @property
    def cost(self) -> float:
        """Modelled inversion cost: ``d^3`` flops up to a constant (``d`` for a diagonal factor)."""
        return float(self.dim) if self.diagonal else float(self.dim) ** 3


class WorkAssignment:
    """Answers one question: which rank inverts layer ``L``'s factor ``F`` (``None``: every rank does).

    Args:
        factors: every factor of the model (names must be unique per ``(layer, factor)``).
        world_size: number of ranks.
        small_factor_threshold: dense factors with ``dim <= small_factor_threshold`` and all diagonal factors
            are inverted on every rank.

    Example:
        >>> specs = [FactorSpec("fc", "A", 1000), FactorSpec("fc", "G", 10), FactorSpec("conv", "A", 900)]
        >>> work = WorkAssignment(specs, world_size=2, small_factor_threshold=64)
        >>> work.inv_worker("fc", "A"), work.inv_worker("conv", "A"), work.inv_worker("fc", "G")
        (0, 1, None)
    """

    def __init__(self, factors: Sequence[FactorSpec], world_size: int, *, small_factor_threshold: int) -> None:
        if world_size < 1:
            raise ValueError(f"Invalid world_size: {world_size} (must be >= 1)")
        if small_factor_threshold < 0:
            raise ValueError(f"Invalid small_factor_threshold: {small_factor_threshold} (must be >= 0)")
        self.world_size = world_size
        self.factors = list(factors)
        self._worker: dict[tuple[str, str], int | None] = {}
        self.replicated_cost = 0.0
        self.loads = [0.0] * world_size
        large: list[FactorSpec] = []
        seen: set[tuple[str, str]] = set()
        for spec in self.factors:
            key = (spec.layer, spec.factor)
            if key in seen:
                raise ValueError(f"Invalid factors: {key} appears twice")
            seen.add(key)
            if spec.diagonal or spec.dim <= small_factor_threshold:
                self._worker[key] = None
                self.replicated_cost += spec.cost
            else:
                large.append(spec)
        for spec in sorted(large, key=lambda s: (-s.cost, s.layer, s.factor)):
            rank = min(range(world_size), key=lambda r: (self.loads[r], r))
            self._worker[(spec.layer, spec.factor)] = rank
            self.loads[rank] += spec.cost

    def inv_worker(self, layer: str, factor: str) -> int | None:
        """The rank that inverts ``factor`` (``"A"``/``"G"``) of ``layer``, or ``None`` if every rank does."""
        try:
            return self._worker[(layer, factor)]
        except KeyError:
            raise KeyError(f"no factor {factor!r} of layer {layer!r} in this assignment") from None

    def owned(self, rank: int) -> list[FactorSpec]:
        """Factors ``rank`` inverts for everyone, in the input order (the order of its broadcast message)."""
        return [s for s in self.factors if self._worker[(s.layer, s.factor)] == rank]

    def replicated(self) -> list[FactorSpec]:
        """Factors every rank inverts itself."""
        return [s for s in self.factors if self._worker[(s.layer, s.factor)] is None]

    def rank_costs(self) -> list[float]:
        """Modelled inversion cost per rank: its own factors plus the replicated ones."""
        return [load + self.replicated_cost for load in self.loads]

    def imbalance(self) -> float:
        """``max / mean`` of :meth:`rank_costs` (1.0 is perfect balance)."""
        costs = self.rank_costs()
        mean = sum(costs) / len(costs)
        return max(costs) / mean if mean > 0 else 1.0

    def lower_bound(self) -> float:
        """No placement of indivisible factors can make the largest rank cost less than this."""
        largest = max((s.cost for s in self.factors if self._worker[(s.layer, s.factor)] is not None), default=0.0)
        return max(sum(self.loads) / self.world_size, largest) + self.replicated_cost
