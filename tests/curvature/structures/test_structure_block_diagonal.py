"""Structure tests for BlockDiagonalMatrix (block size 3: the last block is smaller for dims 4, 5, 7, 8)."""

from __future__ import annotations

from typing import ClassVar

import torch
from structure_mixin import StructureTestMixin, mask_projection
from torch import Tensor

BLOCK = 3


class TestBlockDiagonalMatrix(StructureTestMixin):
    NAME = "block_diagonal"
    PARAMS: ClassVar[dict[str, int]] = {"block_size": BLOCK}
    DIMS = (1, 2, 3, 4, 5, 7, 8)

    def reference_projection(self, mat: Tensor) -> Tensor:
        block_of = torch.arange(mat.shape[0]) // BLOCK
        return mask_projection(mat, block_of[:, None] == block_of[None, :])

    def expected_num_params(self, dim: int) -> int:
        full, last = divmod(dim, BLOCK)
        return full * BLOCK**2 + last**2
