"""Structured matrices for SINGD's inverse-free Kronecker factors (one module per structure).

SINGD: Lin, Dangel, Eschenhagen et al., "Structured Inverse-Free Natural Gradient Descent", ICML 2024.
"""

from kronfac.curvature.structures.base import StructuredMatrix
from kronfac.curvature.structures.block_diagonal import BlockDiagonalMatrix
from kronfac.curvature.structures.dense import DenseMatrix
from kronfac.curvature.structures.diagonal import DiagonalMatrix
from kronfac.curvature.structures.hierarchical import HierarchicalMatrix
from kronfac.curvature.structures.lower_toeplitz import LowerToeplitzMatrix
from kronfac.curvature.structures.lower_triangular import LowerTriangularMatrix
from kronfac.curvature.structures.registry import (
    DEFAULT_STRUCTURE_PARAMS,
    STRUCTURES,
    StructureSpec,
    make_structure,
    parse_structure,
    structure_from_state,
)
from kronfac.curvature.structures.toeplitz import ToeplitzMatrix
from kronfac.curvature.structures.upper_toeplitz import UpperToeplitzMatrix
from kronfac.curvature.structures.upper_triangular import UpperTriangularMatrix

__all__ = [
    "DEFAULT_STRUCTURE_PARAMS",
    "STRUCTURES",
    "BlockDiagonalMatrix",
    "DenseMatrix",
    "DiagonalMatrix",
    "HierarchicalMatrix",
    "LowerToeplitzMatrix",
    "LowerTriangularMatrix",
    "StructureSpec",
    "StructuredMatrix",
    "ToeplitzMatrix",
    "UpperToeplitzMatrix",
    "UpperTriangularMatrix",
    "make_structure",
    "parse_structure",
    "structure_from_state",
]
