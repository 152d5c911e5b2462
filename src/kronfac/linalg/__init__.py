"""Linear algebra backends: how a layer's damped Kronecker factors are inverted or solved."""

from kronfac.linalg.base import InverseConfig, KroneckerInverse, build_inverse
from kronfac.linalg.cholesky import CholeskyConfig, CholeskyInverse
from kronfac.linalg.eigh import EighConfig, EighInverse

__all__ = [
    "CholeskyConfig",
    "CholeskyInverse",
    "EighConfig",
    "EighInverse",
    "InverseConfig",
    "KroneckerInverse",
    "build_inverse",
]
