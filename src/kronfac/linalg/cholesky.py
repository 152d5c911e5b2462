"""Cholesky backend with factored Tikhonov damping and the π correction (Martens & Grosse 2015, eq. 13).

``(G ⊗ A + λ I)^{-1}`` is approximated by ``(G + (√λ/π) I)^{-1} ⊗ (A + π√λ I)^{-1}`` with
``π = sqrt((tr(A)/d_A) / (tr(G)/d_G))``. Cheaper than an eigendecomposition, but the damping is approximate.

A refresh of many layers factorizes all their factors of one shape together (one batched ``cholesky_ex`` and
``cholesky_inverse`` per shape: the two hidden layers of an MLP share their ``A`` and their ``G`` shapes, every
block of a transformer shares all of them); a factor whose Cholesky fails leaves its layer to the one-layer path
of :func:`~kronfac.linalg.base.build_inverse` (the float64 retry). ``cholesky_ex`` reads one triangle, so the
factors are not symmetrized first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kronfac.linalg.base import InverseConfig, InverseRequest, KroneckerInverse, register_inverse
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


def _pi_tensor(a_factor: Tensor, g_factor: Tensor) -> Tensor:
    """:func:`pi_correction` as a 0-d tensor on the factors' device (no host round trip per layer)."""
    trace_a = a_factor.sum() if a_factor.ndim == 1 else a_factor.diagonal().sum()
    ratio = (trace_a / a_factor.shape[0]) / (g_factor.diagonal().sum() / g_factor.shape[0])
    valid = (trace_a > 0) & (ratio > 0) & torch.isfinite(ratio)
    return torch.where(valid, ratio, torch.ones_like(ratio)).sqrt()


def _spd_inverses(matrices: list[Tensor], shifts: list[Tensor]) -> list[Tensor | None]:
    """``(M + shift I)^{-1}`` of each SPD matrix by Cholesky, matrices of one shape, dtype and device stacked in one
    batched call; ``None`` where the factorization fails."""
    out: list[Tensor | None] = [None] * len(matrices)
    groups: dict[tuple[object, ...], list[int]] = {}
    for i, matrix in enumerate(matrices):
        groups.setdefault((matrix.shape, matrix.dtype, matrix.device), []).append(i)
    for members in groups.values():
        stacked = torch.stack([matrices[i] for i in members])  # a fresh copy: the shift goes in place
        stacked.diagonal(dim1=-2, dim2=-1).add_(torch.stack([shifts[i] for i in members]).to(stacked.dtype)[:, None])
        chol, info = torch.linalg.cholesky_ex(stacked)
        inverses = torch.cholesky_inverse(chol)
        for k, (i, ok) in enumerate(zip(members, (info == 0).tolist())):
            if ok:
                out[i] = inverses[k]
    return out


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

    reads_one_triangle: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.pi_correction = check_bool("pi_correction", self.pi_correction)

    def build(self, a_factor: Tensor, g_factor: Tensor, damping: float) -> CholeskyInverse:
        (inverse,) = self.build_batch([InverseRequest(a_factor, g_factor, damping)])
        if inverse is None:
            raise torch.linalg.LinAlgError("Cholesky failed: a damped factor is not positive definite")
        return inverse

    def build_batch(self, requests: Sequence[InverseRequest]) -> list[CholeskyInverse | None]:  # type: ignore[override]
        matrices: list[Tensor] = []
        shifts: list[Tensor] = []
        a_shifts: list[Tensor] = []
        for r in requests:
            pi = _pi_tensor(r.a_factor, r.g_factor) if self.pi_correction else r.g_factor.new_ones(())
            root = math.sqrt(r.damping)
            a_shifts.append(pi * root)
            if r.a_factor.ndim == 2:
                matrices.append(r.a_factor)
                shifts.append(a_shifts[-1])
            matrices.append(r.g_factor)
            shifts.append(root / pi)
        inverses = iter(_spd_inverses(matrices, shifts))
        out: list[CholeskyInverse | None] = []
        for r, a_shift in zip(requests, a_shifts):
            if r.a_factor.ndim == 2:
                a_inv = next(inverses)
            else:  # a diagonal factor: its inverse is elementwise
                a_shifted = r.a_factor + a_shift
                a_inv = 1.0 / a_shifted if bool((a_shifted > 0).all()) else None
            g_inv = next(inverses)
            out.append(None if a_inv is None or g_inv is None else CholeskyInverse(a_inv, g_inv))
        return out
