"""Upper-triangular Toeplitz SINGD factor (SINGD, Lin, Dangel, Eschenhagen et al., ICML 2024). Memory ``d``."""

from __future__ import annotations

from kronfac.curvature.structures._triangular_toeplitz import TriangularToeplitzMatrix

__all__ = ["UpperToeplitzMatrix"]


class UpperToeplitzMatrix(TriangularToeplitzMatrix):
    """``K[i, j] = t[j - i]`` for ``j >= i``, else 0."""

    name = "upper_toeplitz"
    lower = False
