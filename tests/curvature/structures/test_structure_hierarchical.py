"""Structure tests for HierarchicalMatrix (k1=2, k2=3: dims 1-2 fill A only, 3-5 add E, 7-8 use all blocks)."""

from __future__ import annotations

from typing import ClassVar

import torch
from structure_mixin import StructureTestMixin, mask_projection
from torch import Tensor

K1, K2 = 2, 3


def hierarchical_mask(dim: int) -> Tensor:
    n1 = min(dim, K1)
    n2 = min(max(dim - K1, 0), K2)
    m = dim - n1 - n2
    mask = torch.zeros(dim, dim, dtype=torch.bool)
    mask[:n1, :] = True  # A and B
    mid = torch.arange(n1, n1 + m)
    mask[mid, mid] = True  # diagonal middle
    mask[n1 + m :, n1:] = True  # D and E
    return mask


class TestHierarchicalMatrix(StructureTestMixin):
    NAME = "hierarchical"
    PARAMS: ClassVar[dict[str, int]] = {"k1": K1, "k2": K2}
    DIMS = (1, 2, 3, 4, 5, 7, 8)

    def reference_projection(self, mat: Tensor) -> Tensor:
        return mask_projection(mat, hierarchical_mask(mat.shape[0]))

    def expected_num_params(self, dim: int) -> int:
        return int(hierarchical_mask(dim).sum())
