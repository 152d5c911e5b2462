"""kronfac: Kronecker-factored deep learning for PyTorch."""

from kronfac.linalg import CholeskyConfig, EighConfig, InverseConfig

__version__ = "0.1.0"

__all__ = [
    "CholeskyConfig",
    "EighConfig",
    "InverseConfig",
    "__version__",
]
