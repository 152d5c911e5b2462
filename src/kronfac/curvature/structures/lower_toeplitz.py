"""Lower-triangular Toeplitz SINGD factor (SINGD, Lin, Dangel, Eschenhagen et al., ICML 2024). Memory ``d``."""

from __future__ import annotations

from kronfac.curvature.structures._triangular_toeplitz import TriangularToeplitzMatrix

__all__ = ["LowerToeplitzMatrix"]


class LowerToeplitzMatrix(TriangularToeplitzMatrix):
    """``K[i, j] = t[i - j]`` for ``i >= j``, else 0."""

    name = "lower_toeplitz"
    lower = True
