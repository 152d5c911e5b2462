"""kronfac: Kronecker-factored deep learning for PyTorch."""

from kronfac.linalg import CholeskyConfig, EighConfig, InverseConfig
from kronfac.optim import KFAC, AdaFisher, AdaFisherW, KFACPreconditioner, KronOptimizer

__version__ = "0.1.0"

__all__ = [
    "KFAC",
    "AdaFisher",
    "AdaFisherW",
    "CholeskyConfig",
    "EighConfig",
    "InverseConfig",
    "KFACPreconditioner",
    "KronOptimizer",
    "__version__",
]
