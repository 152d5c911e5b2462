"""Upper-triangular SINGD factor (SINGD, Lin, Dangel, Eschenhagen et al., ICML 2024). Memory ``d (d + 1) / 2``.

``K`` upper-triangular: at the IKFAC fixed point ``K^T (A + λI) K = I``, i.e. ``K K^T = (A + λI)^{-1}`` exactly.
"""

from __future__ import annotations

from kronfac.curvature.structures._triangular import TriangularMatrix

__all__ = ["UpperTriangularMatrix"]


class UpperTriangularMatrix(TriangularMatrix):
    """Upper-triangular matrix, entries packed row by row (``torch.triu_indices`` order)."""

    name = "upper_triangular"
    lower = False
