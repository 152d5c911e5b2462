from __future__ import annotations

import pytest
import torch
from torch import nn

from kronfac.nn import KronLinear


def test_forward_equals_dense_weight() -> None:
    layer = KronLinear(12, 20, factors=((4, 3), (5, 4)), dtype=torch.float64)
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    ref = x @ layer.dense_weight().T + layer.bias
    torch.testing.assert_close(layer(x), ref)


@pytest.mark.parametrize("bias", [True, False])
def test_parameter_count_matches_formula(bias: bool) -> None:
    layer = KronLinear(64, 128, factors=((16, 8), (8, 8)), bias=bias)
    assert sum(p.numel() for p in layer.parameters()) == 16 * 8 + 8 * 8 + (128 if bias else 0)
    assert layer.dense_params == 64 * 128 + (128 if bias else 0)


def test_compression_argument_picks_shapes() -> None:
    layer = KronLinear(64, 256, compression=16)
    (m1, n1), (m2, n2) = layer.factor_shapes
    assert m1 * m2 == 256 and n1 * n2 == 64
    assert 8 <= 256 * 64 / (m1 * n1 + m2 * n2) <= 32


def test_init_matches_linear_variance() -> None:
    torch.manual_seed(0)
    layer = KronLinear(256, 256, factors=((16, 16), (16, 16)), bias=False)
    ref = nn.Linear(256, 256, bias=False)
    var, var_ref = layer.dense_weight().var().item(), ref.weight.var().item()
    assert 0.5 < var / var_ref < 2.0


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        KronLinear(8, 8)
    with pytest.raises(ValueError, match="exactly one"):
        KronLinear(8, 8, factors=((2, 2), (4, 4)), compression=2)
    with pytest.raises(ValueError, match="n1\\*n2 = in_features"):
        KronLinear(8, 8, factors=((2, 2), (4, 3)))


def test_from_linear_exact_product_and_bias() -> None:
    dense = nn.Linear(6, 8).double()
    a, b = torch.randn(2, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(torch.kron(a, b))
    layer, err = KronLinear.from_linear(dense, factors=((2, 3), (4, 2)))
    assert err < 1e-6
    x = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense(x))
    assert layer.kron_a.dtype == torch.float64
