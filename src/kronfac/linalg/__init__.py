"""Linear algebra backends: how a layer's damped Kronecker factors are inverted or solved."""

from kronfac.linalg.base import InverseConfig, InverseRequest, KroneckerInverse, build_inverse, build_inverses
from kronfac.linalg.cholesky import CholeskyConfig, CholeskyInverse
from kronfac.linalg.eigh import EighConfig, EighInverse, EighRefresh

__all__ = [
    "CholeskyConfig",
    "CholeskyInverse",
    "EighConfig",
    "EighInverse",
    "EighRefresh",
    "InverseConfig",
    "InverseRequest",
    "KroneckerInverse",
    "build_inverse",
    "build_inverses",
]
