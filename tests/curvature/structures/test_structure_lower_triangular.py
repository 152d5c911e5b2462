"""Structure tests for LowerTriangularMatrix: the generic suite of :mod:`structure_mixin` plus its own references."""

from __future__ import annotations

import torch
from structure_mixin import StructureTestMixin
from torch import Tensor


class TestLowerTriangularMatrix(StructureTestMixin):
    NAME = "lower_triangular"

    def reference_projection(self, mat: Tensor) -> Tensor:
        return torch.tril(mat)

    def expected_num_params(self, dim: int) -> int:
        return dim * (dim + 1) // 2
