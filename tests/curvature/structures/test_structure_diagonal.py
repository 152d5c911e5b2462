"""Structure tests for DiagonalMatrix: the generic suite of :mod:`structure_mixin` plus its own references."""

from __future__ import annotations

import torch
from structure_mixin import StructureTestMixin
from torch import Tensor


class TestDiagonalMatrix(StructureTestMixin):
    NAME = "diagonal"

    def reference_projection(self, mat: Tensor) -> Tensor:
        return torch.diag(torch.diagonal(mat))

    def expected_num_params(self, dim: int) -> int:
        return dim
