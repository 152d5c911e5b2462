"""Structure tests for UpperToeplitzMatrix: the generic suite of :mod:`structure_mixin` plus its own references."""

from __future__ import annotations

from structure_mixin import StructureTestMixin, diagonal_mean_projection
from torch import Tensor


class TestUpperToeplitzMatrix(StructureTestMixin):
    NAME = "upper_toeplitz"

    def reference_projection(self, mat: Tensor) -> Tensor:
        return diagonal_mean_projection(mat, range(mat.shape[0]))

    def expected_num_params(self, dim: int) -> int:
        return dim
