"""Search spaces of the tuning protocol and the quasi-random trials drawn from them.

Every method gets the same number of trials: the first is its authors' recommended setting, the others are
points of one scrambled Sobol sequence (fixed seed) mapped onto the method's ranges, as in the quasi-random search
of Bousquet et al. 2017 that AlgoPerf's external-tuning track uses (Dahl et al. 2023).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["WARMUP", "Range", "trials"]


@dataclass(frozen=True)
class Range:
    """A hyperparameter's interval: ``[low, high]``, sampled on a log scale when ``log``."""

    low: float
    high: float
    log: bool = True

    def __post_init__(self) -> None:
        if not self.low <= self.high or (self.log and self.low <= 0):
            raise ValueError(f"Invalid range: [{self.low}, {self.high}] (need low <= high, and low > 0 for log)")

    def at(self, u: float) -> float:
        """The point at fraction ``u`` in [0, 1] of the range, rounded to 3 significant digits."""
        if self.log:
            value = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        else:
            value = self.low + u * (self.high - self.low)
        return float(f"{value:.3g}")


#: Linear warmup, as a fraction of the run's steps (then cosine decay to zero), for every method.
WARMUP = Range(0.0, 0.1, log=False)


def trials(space: Mapping[str, Range], recommended: Mapping[str, Any], n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` settings: ``recommended`` first, then ``n - 1`` scrambled-Sobol points of ``space``.

    Keys of ``recommended`` that ``space`` does not name are fixed (kept in every trial).
    """
    if n < 1:
        raise ValueError(f"Invalid number of trials: {n} (must be >= 1)")
    names = sorted(space)
    out = [dict(recommended)]
    if n > 1 and names:
        points = torch.quasirandom.SobolEngine(len(names), scramble=True, seed=seed).draw(n - 1, dtype=torch.float64)
        for row in points.tolist():
            out.append({**recommended, **{name: space[name].at(u) for name, u in zip(names, row)}})
    elif n > 1:
        out += [dict(recommended) for _ in range(n - 1)]
    return out
