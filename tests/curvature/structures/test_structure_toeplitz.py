"""Structure tests for ToeplitzMatrix: the generic suite of :mod:`structure_mixin` plus its own references."""

from __future__ import annotations

import pytest
import torch
from structure_mixin import StructureTestMixin, diagonal_mean_projection
from torch import Tensor

from kronfac.curvature.structures import STRUCTURES, _toeplitz_ops


class TestToeplitzMatrix(StructureTestMixin):
    NAME = "toeplitz"

    def reference_projection(self, mat: Tensor) -> Tensor:
        dim = mat.shape[0]
        return diagonal_mean_projection(mat, range(-(dim - 1), dim))

    def expected_num_params(self, dim: int) -> int:
        return 2 * dim - 1


@pytest.mark.parametrize("name", ["toeplitz", "lower_toeplitz", "upper_toeplitz"])
def test_large_dimension_kernels_match_the_dense_ones(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the dense thresholds the O(d)-memory convolution kernels give the same results."""
    cls = STRUCTURES[name]
    K, M = (cls.from_dense(torch.randn(7, 7, dtype=torch.float64)) for _ in range(2))
    X = torch.randn(7, 3, dtype=torch.float64)

    def results() -> list[Tensor]:
        return [
            K.matmul(X),
            K.matmul_t(X),
            K.from_inner(X).to_dense(),
            K.from_inner().to_dense(),
            K.mm(M).to_dense(),
        ]

    dense = results()
    monkeypatch.setattr(_toeplitz_ops, "DENSE_MAX_DIM", 0)
    monkeypatch.setattr(_toeplitz_ops, "PRODUCT_DENSE_MAX_DIM", 0)
    for got, expected in zip(results(), dense):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
