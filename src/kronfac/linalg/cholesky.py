"""Cholesky backend with factored Tikhonov damping and the π correction (Martens & Grosse 2015, eq. 13).

``(G ⊗ A + λ I)^{-1}`` is approximated by ``(G + (√λ/π) I)^{-1} ⊗ (A + π√λ I)^{-1}`` with
``π = sqrt((tr(A)/d_A) / (tr(G)/d_G))``. Cheaper than an eigendecomposition, but the damping is approximate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kronfac.linalg.base import InverseConfig, KroneckerInverse, register_inverse
from kronfac.validation import check_bool

__all__ = ["CholeskyConfig", "CholeskyInverse", "pi_correction"]


def pi_correction(a_factor: Tensor, g_factor: Tensor) -> float:
    """π = sqrt(mean eigenvalue of A / mean eigenvalue of G); 1 when either trace vanishes."""
    trace_a = float(a_factor.sum() if a_factor.ndim == 1 else a_factor.diagonal().sum())
    mean_a = trace_a / a_factor.shape[0]
    mean_g = float(g_factor.diagonal().sum()) / g_factor.shape[0]
    if mean_a <= 0 or mean_g <= 0 or not math.isfinite(mean_a / mean_g):
        return 1.0
    return math.sqrt(mean_a / mean_g)


def _spd_inverse(matrix: Tensor, shift: float) -> Tensor:
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    chol, info = torch.linalg.cholesky_ex(matrix + shift * eye)
    if int(info) != 0:
        raise torch.linalg.LinAlgError(f"Cholesky failed at minor {int(info)}")
    return torch.cholesky_inverse(chol)


@register_inverse
class CholeskyInverse(KroneckerInverse):
    """Explicit damped inverses; ``a_inv`` is a vector when A is diagonal."""

    kind = "cholesky"

    def __init__(self, a_inv: Tensor, g_inv: Tensor) -> None:
        self.a_inv, self.g_inv = a_inv, g_inv

    def precondition(self, grad: Tensor) -> Tensor:
        v = self.g_inv @ grad.to(self.g_inv.dtype)
        v = v * self.a_inv if self.a_inv.ndim == 1 else v @ self.a_inv
        return v.to(grad.dtype)

    def tensors(self) -> dict[str, Tensor]:
        return {"a_inv": self.a_inv, "g_inv": self.g_inv}


@dataclass(kw_only=True)
class CholeskyConfig(InverseConfig):
    """Invert each factor by Cholesky with factored damping.

    Args:
        pi_correction: balance the damping between the factors by π (True, the paper's choice) or split it
            evenly as √λ on each side (False).
    """

    pi_correction: bool = True

    def __post_init__(self) -> None:
        self.pi_correction = check_bool("pi_correction", self.pi_correction)

    def build(self, a_factor: Tensor, g_factor: Tensor, damping: float) -> CholeskyInverse:
        pi = pi_correction(a_factor, g_factor) if self.pi_correction else 1.0
        root = math.sqrt(damping)
        if a_factor.ndim == 1:
            a_shifted = a_factor + pi * root
            if not bool((a_shifted > 0).all()):
                raise torch.linalg.LinAlgError("diagonal factor is not positive after damping")
            a_inv = 1.0 / a_shifted
        else:
            a_inv = _spd_inverse(a_factor, pi * root)
        return CholeskyInverse(a_inv, _spd_inverse(g_factor, root / pi))
