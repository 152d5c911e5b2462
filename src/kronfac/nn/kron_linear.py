"""``KronLinear``: a linear layer whose weight is a Kronecker product ``W = A ⊗ B``.

``y = (A ⊗ B) x + b`` with ``A`` ``(m1, n1)``, ``B`` ``(m2, n2)``, computed by :func:`kron_matvec` in
``O(m1 n2 (n1 + m2))`` (or the other order) instead of ``O(m n)``; parameters ``m1 n1 + m2 n2 (+ m)``.

Reference:
    U. Thakker et al., "Compressing RNNs for IoT devices by 15-38x using Kronecker products",
    arXiv:1906.02876.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kronfac.nn.factorize import KronShape, check_shape, kron_shapes, nearest_kronecker
from kronfac.nn.kron import kron_matvec

__all__ = ["KronLinear", "init_kron_factors", "resolve_factors"]


def resolve_factors(
    out_features: int,
    in_features: int,
    factors: KronShape | None,
    compression: float | None,
) -> KronShape:
    """Exactly one of ``factors`` (explicit shapes) and ``compression`` (target ratio) picks the factor
    shapes.

    Raises:
        ValueError: If both or neither are given, or the shapes do not fit.
    """
    if (factors is None) == (compression is None):
        raise ValueError("Pass exactly one of factors=((m1, n1), (m2, n2)) and compression=<ratio > 1>")
    if factors is not None:
        return check_shape(out_features, in_features, factors)
    assert compression is not None
    return kron_shapes(out_features, in_features, compression)


def init_kron_factors(a: Tensor, b: Tensor, fan_in: int) -> None:
    """Uniform init so that each entry of ``A ⊗ B`` has the variance of ``nn.Linear``'s, ``1 / (3 fan_in)``.

    Entries of ``A ⊗ B`` are products of independent zero-mean factors, so the variances multiply: each factor
    gets variance ``sqrt(1 / (3 fan_in))``, i.e. ``U(-c, c)`` with ``c = sqrt(3) (3 fan_in)^(-1/4)``.
    """
    bound = math.sqrt(3.0) * (3.0 * fan_in) ** -0.25
    with torch.no_grad():
        a.uniform_(-bound, bound)
        b.uniform_(-bound, bound)


class KronLinear(nn.Module):
    """Linear layer with a Kronecker-product weight ``W = A ⊗ B`` (never materialised in ``forward``).

    Args:
        in_features: ``n``, size of each input sample.
        out_features: ``m``, size of each output sample.
        factors: Explicit shapes ``((m1, n1), (m2, n2))`` of ``A`` and ``B``, with ``m1 m2 = m``, ``n1 n2 =
            n``.
        compression: Target ratio ``m n / (m1 n1 + m2 n2)``; the closest split is chosen
            (:func:`~kronfac.nn.factorize.kron_shapes`). Give exactly one of ``factors`` and ``compression``.
        bias: Whether to add a dense bias of size ``m``.
        device: Device of the parameters.
        dtype: Dtype of the parameters.

    Attributes:
        kron_a: ``A``, shape ``(m1, n1)``.
        kron_b: ``B``, shape ``(m2, n2)``.
        bias: ``(m,)`` or ``None``.

    Raises:
        ValueError: If the shapes cannot be chosen or do not fit.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        factors: KronShape | None = None,
        compression: float | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.factor_shapes = resolve_factors(out_features, in_features, factors, compression)
        (m1, n1), (m2, n2) = self.factor_shapes
        kw: dict = {"device": device, "dtype": dtype}
        self.kron_a = nn.Parameter(torch.empty(m1, n1, **kw))
        self.kron_b = nn.Parameter(torch.empty(m2, n2, **kw))
        self.bias: nn.Parameter | None = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_kron_factors(self.kron_a, self.kron_b, self.in_features)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        y = kron_matvec(self.kron_a, self.kron_b, x)
        return y if self.bias is None else y + self.bias

    def dense_weight(self) -> Tensor:
        """The dense ``(m, n)`` weight ``A ⊗ B`` (materialised; for inspection and tests)."""
        return torch.kron(self.kron_a, self.kron_b)

    @property
    def dense_params(self) -> int:
        """Parameters of the equivalent ``nn.Linear`` (weight and bias)."""
        return self.out_features * self.in_features + (self.out_features if self.bias is not None else 0)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        factors: KronShape | None = None,
        compression: float | None = None,
    ) -> tuple[KronLinear, float]:
        """Nearest-Kronecker conversion of a trained ``nn.Linear``.

        Returns:
            The new layer (same device and dtype, bias copied) and the relative reconstruction error
            ``‖W - A ⊗ B‖_F / ‖W‖_F``.
        """
        w = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            factors=factors,
            compression=compression,
            bias=linear.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        a, b, err = nearest_kronecker(w, layer.factor_shapes)
        with torch.no_grad():
            layer.kron_a.copy_(a)
            layer.kron_b.copy_(b)
            if linear.bias is not None and layer.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer, err

    def extra_repr(self) -> str:
        (m1, n1), (m2, n2) = self.factor_shapes
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"A=({m1}, {n1}), B=({m2}, {n2}), bias={self.bias is not None}"
        )
