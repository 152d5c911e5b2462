"""Structure tests for ToeplitzMatrix: the generic suite of :mod:`structure_mixin` plus its own references."""

from __future__ import annotations

from structure_mixin import StructureTestMixin, diagonal_mean_projection
from torch import Tensor


class TestToeplitzMatrix(StructureTestMixin):
    NAME = "toeplitz"

    def reference_projection(self, mat: Tensor) -> Tensor:
        dim = mat.shape[0]
        return diagonal_mean_projection(mat, range(-(dim - 1), dim))

    def expected_num_params(self, dim: int) -> int:
        return 2 * dim - 1
