"""Factor shapes for a target compression, and the nearest Kronecker product of a dense matrix.

A weight ``W`` of shape ``(m, n)`` is replaced by ``A ⊗ B`` with ``A`` ``(m1, n1)``, ``B`` ``(m2, n2)``,
``m = m1 m2``, ``n = n1 n2``: ``m1 n1 + m2 n2`` parameters instead of ``m n``. Near-square splits (``m1 ≈
√m``,
``n1 ≈ √n``) compress the most; unbalanced splits trade compression for capacity (Thakker et al. 2019).

The nearest Kronecker product in Frobenius norm (Van Loan & Pitsianis 1993) rearranges ``W`` so that every
``(m2, n2)`` block becomes one row: ``R[(i, j), :] = vec(W_ij)``. Then ``‖W - A ⊗ B‖_F = ‖R - vec(A)
vec(B)^T‖_F``
and the best rank-1 approximation of ``R`` (leading singular triple) gives ``A`` and ``B``. The relative
error is
``sqrt(Σ_{k>1} σ_k²) / sqrt(Σ_k σ_k²)``.

References:
    C. F. Van Loan, N. Pitsianis, "Approximation with Kronecker products", in Linear Algebra for Large
    Scale and
    Real-Time Applications (1993).
    U. Thakker et al., "Compressing RNNs for IoT devices by 15-38x using Kronecker products",
    arXiv:1906.02876.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "KronShape",
    "check_shape",
    "divisor_pairs",
    "kron_shape_options",
    "kron_shapes",
    "nearest_kronecker",
    "rearrange",
]

#: ``((m1, n1), (m2, n2))``: shapes of ``A`` and ``B``.
KronShape = tuple[tuple[int, int], tuple[int, int]]

#: Default tolerance of :func:`kron_shapes`: the achieved compression must lie within this factor
#: of the target.
DEFAULT_TOLERANCE = 2.0
#: Splits whose compression is within this factor of the closest achievable one count as equally close.
NEAR_FACTOR = 1.1


def divisor_pairs(n: int) -> list[tuple[int, int]]:
    """All ``(d, n // d)`` with ``d`` dividing ``n``, ``d`` ascending."""
    if n < 1:
        raise ValueError(f"Invalid size: {n}; must be >= 1")
    return [(d, n // d) for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True, kw_only=True)
class _Option:
    shape: KronShape
    params: int
    compression: float
    imbalance: float
    max_rank: int


def kron_shape_options(out_features: int, in_features: int) -> list[_Option]:
    """Every non-trivial Kronecker split of an ``(out_features, in_features)`` matrix.

    Trivial splits (one factor ``1 x 1``) are left out: they are the dense matrix times a scalar.
    """
    total = out_features * in_features
    options = []
    for m1, m2 in divisor_pairs(out_features):
        for n1, n2 in divisor_pairs(in_features):
            if (m1 * n1 == 1) or (m2 * n2 == 1):
                continue
            params = m1 * n1 + m2 * n2
            imbalance = abs(math.log(max(m1 * n1, 1) / max(m2 * n2, 1)))
            options.append(
                _Option(
                    shape=((m1, n1), (m2, n2)),
                    params=params,
                    compression=total / params,
                    imbalance=imbalance,
                    max_rank=min(m1, n1) * min(m2, n2),
                )
            )
    return options


def kron_shapes(
    out_features: int, in_features: int, compression: float, *, tolerance: float = DEFAULT_TOLERANCE
) -> KronShape:
    """Factor shapes whose compression ``m n / (m1 n1 + m2 n2)`` is (nearly) closest to ``compression``.

    Closeness is measured in log ratio. Among the splits within a factor ``NEAR_FACTOR`` (10%) of the
    closest one,
    the split of highest reachable rank ``min(m1, n1) min(m2, n2)`` wins (a ``1 x k`` factor caps the rank of
    ``A ⊗ B``), then the closer one, then the more balanced one.

    Args:
        out_features: ``m``.
        in_features: ``n``.
        compression: Target ratio of dense to Kronecker parameters, > 1.
        tolerance: The achieved compression must lie in ``[compression / tolerance, compression *
            tolerance]``.

    Returns:
        ``((m1, n1), (m2, n2))``.

    Raises:
        ValueError: If ``compression <= 1``, ``tolerance < 1``, or no split comes within tolerance (the
            message
            gives the achievable range and suggests explicit ``factors=``).
    """
    if not compression > 1.0:
        raise ValueError(f"Invalid compression: {compression}; must be > 1")
    if not tolerance >= 1.0:
        raise ValueError(f"Invalid tolerance: {tolerance}; must be >= 1")
    options = kron_shape_options(out_features, in_features)
    if not options:
        raise ValueError(
            f"A ({out_features} x {in_features}) matrix has no non-trivial Kronecker split "
            "(both sizes are 1 or prime in a way that leaves a 1 x 1 factor); keep it dense"
        )

    def distance(o: _Option) -> float:
        return abs(math.log(o.compression / compression))

    closest = min(distance(o) for o in options)
    near = [o for o in options if distance(o) <= closest + math.log(NEAR_FACTOR)]
    best = min(near, key=lambda o: (-o.max_rank, round(distance(o), 9), o.imbalance, -o.shape[0][0]))
    if not compression / tolerance <= best.compression <= compression * tolerance:
        lo = min(o.compression for o in options)
        hi = max(o.compression for o in options)
        raise ValueError(
            f"Cannot factor a ({out_features} x {in_features}) matrix at compression={compression}: "
            f"achievable compressions range from {lo:.2f}x to {hi:.2f}x and the closest is "
            f"{best.compression:.2f}x with A {best.shape[0]}, B {best.shape[1]} (tolerance {tolerance}x). "
            "Choose a compression in range, raise tolerance, or pass factors=((m1, n1), (m2, n2)) explicitly"
        )
    return best.shape


def check_shape(out_features: int, in_features: int, shape: KronShape) -> KronShape:
    """Validate explicit factor shapes against a matrix size and return them as plain int tuples."""
    try:
        (m1, n1), (m2, n2) = shape
        m1, n1, m2, n2 = int(m1), int(n1), int(m2), int(n2)
    except (TypeError, ValueError) as err:
        raise ValueError(f"Invalid factors: {shape!r}; expected ((m1, n1), (m2, n2))") from err
    if min(m1, n1, m2, n2) < 1 or m1 * m2 != out_features or n1 * n2 != in_features:
        raise ValueError(
            f"Invalid factors: A ({m1}, {n1}) ⊗ B ({m2}, {n2}) is ({m1 * m2}, {n1 * n2}) but the layer is "
            f"({out_features}, {in_features}); need m1*m2 = out_features and n1*n2 = in_features"
        )
    return (m1, n1), (m2, n2)


def rearrange(weight: Tensor, shape: KronShape) -> Tensor:
    """Van Loan-Pitsianis rearrangement: row ``i n1 + j`` holds the flattened block ``W[i m2:(i+1) m2, j
    ...]``.

    ``rearrange(torch.kron(A, B), shape) == outer(A.flatten(), B.flatten())``.
    """
    (m1, n1), (m2, n2) = shape
    return weight.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


def nearest_kronecker(weight: Tensor, shape: KronShape) -> tuple[Tensor, Tensor, float]:
    """Factors ``A``, ``B`` minimising ``‖W - A ⊗ B‖_F``, and the relative error ``‖W - A ⊗ B‖_F / ‖W‖_F``.

    The SVD runs in float64 for accuracy; factors come back in ``weight``'s dtype, with equal Frobenius norms
    (each ``sqrt(σ_1)``) and the sign chosen so that ``A``'s entries sum to a non-negative number.

    Args:
        weight: ``(m, n)`` matrix.
        shape: ``((m1, n1), (m2, n2))`` with ``m1 m2 = m``, ``n1 n2 = n``.

    Raises:
        ValueError: If the shapes do not match the matrix.
    """
    if weight.ndim != 2:
        raise ValueError(f"Invalid weight: expected a matrix, got shape {tuple(weight.shape)}")
    (m1, n1), (m2, n2) = check_shape(weight.shape[0], weight.shape[1], shape)
    r = rearrange(weight.detach().to(torch.float64), shape)
    u, s, vh = torch.linalg.svd(r, full_matrices=False)
    root = s[0].sqrt()
    a = (u[:, 0] * root).reshape(m1, n1)
    b = (vh[0] * root).reshape(m2, n2)
    if a.sum() < 0:
        a, b = -a, -b
    total = float((s**2).sum())
    rel_error = math.sqrt(float((s[1:] ** 2).sum()) / total) if total > 0 else 0.0
    return a.to(weight.dtype), b.to(weight.dtype), rel_error
