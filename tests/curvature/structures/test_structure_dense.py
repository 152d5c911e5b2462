"""Structure tests for DenseMatrix: the generic suite of :mod:`structure_mixin` plus its own references."""

from __future__ import annotations

from structure_mixin import StructureTestMixin
from torch import Tensor


class TestDenseMatrix(StructureTestMixin):
    NAME = "dense"

    def reference_projection(self, mat: Tensor) -> Tensor:
        return mat.clone()

    def expected_num_params(self, dim: int) -> int:
        return dim * dim
