"""Small types the step and its corrections share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["GroupStep"]


@dataclass
class GroupStep:
    """One param group's step: its index and hyperparameters at this step, the parameters and their directions
    (what the update kernel applies)."""

    index: int
    hyper: dict[str, Any]
    params: list[Tensor] = field(default_factory=list)
    directions: list[Tensor] = field(default_factory=list)
