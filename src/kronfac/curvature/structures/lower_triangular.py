"""Lower-triangular SINGD factor (SINGD, Lin, Dangel, Eschenhagen et al., ICML 2024). Memory ``d (d + 1) / 2``.

``K`` lower-triangular: at the IKFAC fixed point ``K^T (A + λI) K = I``, i.e. ``K K^T = (A + λI)^{-1}`` exactly.
"""

from __future__ import annotations

from kronfac.curvature.structures._triangular import TriangularMatrix

__all__ = ["LowerTriangularMatrix"]


class LowerTriangularMatrix(TriangularMatrix):
    """Lower-triangular matrix, entries packed row by row (``torch.tril_indices`` order)."""

    name = "lower_triangular"
    lower = True
