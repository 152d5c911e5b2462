"""Eigendecomposition backend with exact (eigen-basis) damping (Martens & Grosse 2015, section 6.3).

With ``A = Q_A diag(s_A) Q_A^T`` and ``G = Q_G diag(s_G) Q_G^T`` the damped Kronecker system
``(G ⊗ A + λ I) vec(U) = vec(V)`` (row-major vec) is solved exactly:
``U = Q_G [(Q_G^T V Q_A) / (s_G s_A^T + λ)] Q_A^T``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kronfac.linalg.base import InverseConfig, KroneckerInverse, register_inverse
from kronfac.validation import check_range

__all__ = ["EighConfig", "EighInverse"]


@register_inverse
class EighInverse(KroneckerInverse):
    """Eigenbases and eigenvalues of both factors plus the damping; ``q_a`` is empty for a diagonal A."""

    kind = "eigh"

    def __init__(self, q_a: Tensor, s_a: Tensor, q_g: Tensor, s_g: Tensor, damping: Tensor) -> None:
        self.q_a, self.s_a, self.q_g, self.s_g = q_a, s_a, q_g, s_g
        self.damping = damping
        self._scale = 1.0 / (torch.outer(s_g, s_a) + damping)

    def precondition(self, grad: Tensor) -> Tensor:
        v = grad if grad.dtype == self.q_g.dtype else grad.to(self.q_g.dtype)
        v = self.q_g.T @ v
        if self.q_a.numel():
            v = v @ self.q_a
        v.mul_(self._scale)
        v = self.q_g @ v
        if self.q_a.numel():
            v = v @ self.q_a.T
        return v if v.dtype == grad.dtype else v.to(grad.dtype)

    def tensors(self) -> dict[str, Tensor]:
        return {"q_a": self.q_a, "s_a": self.s_a, "q_g": self.q_g, "s_g": self.s_g, "damping": self.damping}


def _eigh(matrix: Tensor, min_eigenvalue: float) -> tuple[Tensor, Tensor]:
    s, q = torch.linalg.eigh(matrix)
    return q, s.clamp_min(min_eigenvalue)


@dataclass(kw_only=True)
class EighConfig(InverseConfig):
    """Invert by symmetric eigendecomposition with exact damping.

    Args:
        min_eigenvalue: eigenvalues below this are clamped (round-off can make a PSD factor slightly
            indefinite); the damping keeps the system well-posed.
    """

    min_eigenvalue: float = 0.0

    def __post_init__(self) -> None:
        self.min_eigenvalue = check_range("min_eigenvalue", self.min_eigenvalue, 0.0)

    def build(self, a_factor: Tensor, g_factor: Tensor, damping: float) -> EighInverse:
        if a_factor.ndim == 1:
            q_a, s_a = a_factor.new_empty(0), a_factor.clamp_min(self.min_eigenvalue)
        else:
            q_a, s_a = _eigh(a_factor, self.min_eigenvalue)
        q_g, s_g = _eigh(g_factor, self.min_eigenvalue)
        return EighInverse(q_a, s_a, q_g, s_g, torch.tensor(float(damping), dtype=s_g.dtype))
