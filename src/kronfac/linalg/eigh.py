"""Eigendecomposition backend with exact (eigen-basis) damping (Martens & Grosse 2015, section 6.3).

With ``A = Q_A diag(s_A) Q_A^T`` and ``G = Q_G diag(s_G) Q_G^T`` the damped Kronecker system
``(G ⊗ A + λ I) vec(U) = vec(V)`` (row-major vec) is solved exactly:
``U = Q_G [(Q_G^T V Q_A) / (s_G s_A^T + λ)] Q_A^T``.

Refreshes. ``refresh="exact"`` recomputes both eigendecompositions with ``torch.linalg.eigh``. ``refresh="warm"``
starts from the previous eigenbasis, as SOAP (Vyas et al. 2024) and Distributed Shampoo (Shi et al. 2023) do:
``warm_iters`` steps of orthogonal (subspace) iteration ``Q <- qr(M Q)`` (columns kept in descending order of
their Rayleigh quotients), then the eigenvalues are re-estimated in the new basis as the Rayleigh quotients
``s_j = q_j^T M q_j``. The factors change little between refreshes (an EMA), so the previous basis is close and a
few iterations keep it close; the residual ``||M Q - Q diag(s)||_F / ||M||_F`` (the off-diagonal part of
``Q^T M Q``) is checked on every warm refresh and a factor whose residual exceeds ``residual_tol`` gets a full
``eigh``, as does every factor on every ``full_every``-th refresh (and the first). Factors of equal shape are
refined together (one batched product and QR instead of one per layer).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from kronfac.linalg.base import InverseConfig, InverseRequest, KroneckerInverse, register_inverse
from kronfac.validation import check_choice, check_int, check_positive_int, check_range

__all__ = ["EighConfig", "EighInverse", "EighRefresh", "refine_eigenbasis"]


class EighRefresh(str, Enum):
    """How :class:`EighConfig` refreshes an eigenbasis: a fresh ``eigh`` or a warm start from the last one."""

    EXACT = "exact"
    WARM = "warm"


@register_inverse
class EighInverse(KroneckerInverse):
    """Eigenbases and eigenvalues of both factors plus the damping; ``q_a`` is empty for a diagonal A.

    ``age`` counts the warm refreshes since the last scheduled full eigendecomposition (0 for ``eigh``), so that
    a resumed run schedules its next full refresh where the uninterrupted run would.
    """

    kind = "eigh"

    def __init__(
        self, q_a: Tensor, s_a: Tensor, q_g: Tensor, s_g: Tensor, damping: Tensor, age: Tensor | None = None
    ) -> None:
        self.s_a, self.s_g = s_a, s_g
        self.damping = damping
        self.age = torch.zeros((), dtype=torch.int64) if age is None else age
        self._dims = (s_g.shape[0], s_a.shape[0])
        # The products run on bases padded to a multiple of PAD_MULTIPLE (identity in the padding), the scale
        # is zero there: the result is the same, and the products are faster (see PAD_MULTIPLE).
        self._q_g, self._q_a = _padded_basis(q_g), _padded_basis(q_a) if q_a.numel() else q_a
        rows, cols = self._q_g.shape[0], self._q_a.shape[0] if q_a.numel() else s_a.shape[0]
        scale = 1.0 / (torch.outer(s_g, s_a) + damping)
        self._scale = scale if (rows, cols) == scale.shape else scale.new_zeros(rows, cols)
        if self._scale is not scale:
            self._scale[: scale.shape[0], : scale.shape[1]] = scale

    @property
    def q_g(self) -> Tensor:
        return self._q_g[: self._dims[0], : self._dims[0]]

    @property
    def q_a(self) -> Tensor:
        return self._q_a[: self._dims[1], : self._dims[1]] if self._q_a.numel() else self._q_a

    def precondition(self, grad: Tensor) -> Tensor:
        v = grad if grad.dtype == self._q_g.dtype else grad.to(self._q_g.dtype)
        d_o, d_i = self._dims
        padded = self._scale.shape != (d_o, d_i)
        if padded:
            v = torch.nn.functional.pad(v, (0, self._scale.shape[1] - d_i, 0, self._scale.shape[0] - d_o))
        v = self._q_g.T @ v
        if self._q_a.numel():
            v = v @ self._q_a
        v.mul_(self._scale)
        v = self._q_g @ v
        if self._q_a.numel():
            v = v @ self._q_a.T
        if padded:
            v = v[:d_o, :d_i]
        return v if v.dtype == grad.dtype else v.to(grad.dtype)

    def tensors(self) -> dict[str, Tensor]:
        return {
            "q_a": self.q_a,
            "s_a": self.s_a,
            "q_g": self.q_g,
            "s_g": self.s_g,
            "damping": self.damping,
            "age": self.age,
        }

    def is_finite(self) -> bool:
        # A NaN or Inf anywhere makes the sum non-finite; one reduction instead of a d x d boolean mask.
        return all(bool(torch.isfinite(t.sum())) for t in (self._q_a, self.s_a, self._q_g, self.s_g))


#: Bases of at least PAD_MIN rows whose size is not a multiple of PAD_MULTIPLE are padded to one (identity in the
#: padding) for the products of a step: the bias column makes a layer's input factor d + 1 wide, and MKL's products
#: on d + 1 are ~25-35% slower than on d + 8 (measured on this box, 1 thread, the four products of a step:
#: 10.2 -> 6.3 ms at width 256, 348 -> 258 ms at 1024, 2670 -> 2062 ms at 2048).
PAD_MULTIPLE = 8
PAD_MIN = 128


def _padded_basis(q: Tensor) -> Tensor:
    d = q.shape[0]
    if d < PAD_MIN or d % PAD_MULTIPLE == 0:
        return q
    size = -(-d // PAD_MULTIPLE) * PAD_MULTIPLE
    out = torch.eye(size, dtype=q.dtype, device=q.device)
    out[:d, :d] = q
    return out


def _eigh(matrix: Tensor, min_eigenvalue: float) -> tuple[Tensor, Tensor]:
    s, q = torch.linalg.eigh(matrix)
    return q, s.clamp_min(min_eigenvalue)


def refine_eigenbasis(matrix: Tensor, basis: Tensor, iters: int) -> tuple[Tensor, Tensor, Tensor]:
    """Warm-started orthogonal iteration on symmetric ``matrix`` (batched over leading dimensions).

    Args:
        matrix: ``(..., d, d)`` symmetric matrices.
        basis: ``(..., d, d)`` orthonormal starting bases (the previous eigenvectors, as columns).
        iters: QR steps ``Q <- qr(M Q)``; 0 keeps the basis and only re-estimates the eigenvalues.

    Returns:
        ``(Q, s, residual)``: the basis (columns in descending order of ``s`` after at least one step), the
        Rayleigh quotients ``s_j = q_j^T M q_j`` and the relative residual ``||M Q - Q diag(s)||_F / ||M||_F``
        (``(...)``-shaped; 0 for a zero matrix).
    """
    q = basis
    product = matrix @ q
    for _ in range(iters):
        order = (q * product).sum(-2).argsort(dim=-1, descending=True)
        q = torch.linalg.qr(product.gather(-1, order.unsqueeze(-2).expand_as(product))).Q
        product = matrix @ q
    s = (q * product).sum(-2)
    off = torch.linalg.matrix_norm(product - q * s.unsqueeze(-2))
    residual = off / torch.linalg.matrix_norm(matrix).clamp_min(torch.finfo(matrix.dtype).tiny)
    return q, s, residual


@dataclass(kw_only=True)
class EighConfig(InverseConfig):
    """Invert by symmetric eigendecomposition with exact damping.

    Args:
        min_eigenvalue: eigenvalues below this are clamped (round-off can make a PSD factor slightly
            indefinite); the damping keeps the system well-posed.
        refresh: ``"exact"`` (a fresh ``torch.linalg.eigh`` every refresh) or ``"warm"`` (start from the previous
            basis; see the module docstring).
        warm_iters: QR steps of a warm refresh (0: keep the basis, re-estimate the eigenvalues only).
        full_every: with ``refresh="warm"``, every this many refreshes is a full ``eigh`` (1: always).
        residual_tol: with ``refresh="warm"``, a factor whose relative residual
            ``||M Q - Q diag(s)||_F / ||M||_F`` after the warm steps exceeds this gets a full ``eigh``
            (``math.inf``: never).
    """

    min_eigenvalue: float = 0.0
    refresh: EighRefresh | str = EighRefresh.EXACT
    warm_iters: int = 1
    full_every: int = 10
    residual_tol: float = 0.1

    def __post_init__(self) -> None:
        self.min_eigenvalue = check_range("min_eigenvalue", self.min_eigenvalue, 0.0)
        self.refresh = check_choice(EighRefresh, "refresh", self.refresh)
        self.warm_iters = check_int("warm_iters", self.warm_iters, 0)
        self.full_every = check_positive_int("full_every", self.full_every)
        if self.residual_tol != math.inf:  # inf: never fall back
            self.residual_tol = check_range("residual_tol", self.residual_tol, 0.0)

    def build(self, a_factor: Tensor, g_factor: Tensor, damping: float) -> EighInverse:
        if a_factor.ndim == 1:
            q_a, s_a = a_factor.new_empty(0), a_factor.clamp_min(self.min_eigenvalue)
        else:
            q_a, s_a = _eigh(a_factor, self.min_eigenvalue)
        q_g, s_g = _eigh(g_factor, self.min_eigenvalue)
        return EighInverse(q_a, s_a, q_g, s_g, torch.tensor(float(damping), dtype=s_g.dtype))

    # -- warm refreshes ---------------------------------------------------------------------------------
    def warm_due(self, previous: KroneckerInverse | None) -> bool:
        """Whether the refresh after ``previous`` starts from its bases (else: a scheduled full ``eigh``)."""
        if self.refresh is not EighRefresh.WARM or not isinstance(previous, EighInverse):
            return False
        return int(previous.age) + 1 < self.full_every

    def next_age(self, previous: KroneckerInverse | None) -> Tensor:
        """The ``age`` of the inverse that replaces ``previous``."""
        age = int(previous.age) + 1 if self.warm_due(previous) else 0  # type: ignore[union-attr]
        return torch.tensor(age, dtype=torch.int64)

    def warm_start(self, previous: KroneckerInverse | None, factor: str, matrix: Tensor) -> Tensor | None:
        """The basis a warm refresh of ``factor`` (``"A"`` or ``"G"``) starts from, or ``None`` (full ``eigh``)."""
        if matrix.ndim != 2 or not self.warm_due(previous):
            return None
        assert isinstance(previous, EighInverse)
        basis = previous.q_a if factor == "A" else previous.q_g
        return basis.to(matrix.dtype) if basis.shape == matrix.shape else None

    def eigenpairs(self, matrices: Sequence[Tensor], bases: Sequence[Tensor | None]) -> list[tuple[Tensor, Tensor]]:
        """``(Q, s)`` of each dense symmetric matrix: refined from its basis where one is given (matrices of one
        shape, dtype and device in one batched call) and accepted if the residual test passes, else ``eigh``."""
        out: list[tuple[Tensor, Tensor] | None] = [None] * len(matrices)
        groups: dict[tuple[object, ...], list[int]] = {}
        for i, (matrix, basis) in enumerate(zip(matrices, bases)):
            if basis is not None:
                groups.setdefault((matrix.shape, matrix.dtype, matrix.device), []).append(i)
        for members in groups.values():
            stacked = torch.stack([matrices[i] for i in members])
            start = torch.stack([bases[i] for i in members])  # type: ignore[misc]
            q, s, residual = refine_eigenbasis(stacked, start, self.warm_iters)
            accepted = (residual <= self.residual_tol).tolist()
            for k, i in enumerate(members):
                if accepted[k]:
                    out[i] = (q[k], s[k].clamp_min(self.min_eigenvalue))
        return [pair if pair is not None else _eigh(m, self.min_eigenvalue) for pair, m in zip(out, matrices)]

    def build_from(
        self, a_factor: Tensor, g_factor: Tensor, damping: float, previous: KroneckerInverse | None
    ) -> EighInverse:
        return self.build_batch([InverseRequest(a_factor, g_factor, damping, previous)])[0]

    def build_batch(self, requests: Sequence[InverseRequest]) -> list[EighInverse]:  # type: ignore[override]
        if self.refresh is EighRefresh.EXACT:
            return [self.build(r.a_factor, r.g_factor, r.damping) for r in requests]
        dense = [(i, "A", r.a_factor) for i, r in enumerate(requests) if r.a_factor.ndim == 2]
        dense += [(i, "G", r.g_factor) for i, r in enumerate(requests)]
        pairs = self.eigenpairs(
            [m for _, _, m in dense], [self.warm_start(requests[i].previous, f, m) for i, f, m in dense]
        )
        found = {(i, f): pair for (i, f, _), pair in zip(dense, pairs)}
        out = []
        for i, r in enumerate(requests):
            if r.a_factor.ndim == 1:
                q_a, s_a = r.a_factor.new_empty(0), r.a_factor.clamp_min(self.min_eigenvalue)
            else:
                q_a, s_a = found[(i, "A")]
            q_g, s_g = found[(i, "G")]
            damping = torch.tensor(float(r.damping), dtype=s_g.dtype)
            out.append(EighInverse(q_a, s_a, q_g, s_g, damping, self.next_age(r.previous)))
        return out
