"""kronfac: Kronecker-factored deep learning for PyTorch."""

from kronfac import nn
from kronfac.distributed import DistributedConfig
from kronfac.errors import KronfacRuntimeWarning, KronfacWarning
from kronfac.linalg import CholeskyConfig, EighConfig, InverseConfig
from kronfac.linalg.thermodynamic import HardwareModel, SolverSchedule, ThermodynamicConfig
from kronfac.optim import CGFAC, KFAC, KLDWRM, SINGD, AdaFisher, AdaFisherW, KFACPreconditioner, KronOptimizer

__version__ = "0.1.0"

__all__ = [
    "CGFAC",
    "KFAC",
    "KLDWRM",
    "SINGD",
    "AdaFisher",
    "AdaFisherW",
    "CholeskyConfig",
    "DistributedConfig",
    "EighConfig",
    "HardwareModel",
    "InverseConfig",
    "KFACPreconditioner",
    "KronOptimizer",
    "KronfacRuntimeWarning",
    "KronfacWarning",
    "SolverSchedule",
    "ThermodynamicConfig",
    "__version__",
    "nn",
]
