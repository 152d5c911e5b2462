"""kronfac: Kronecker-factored deep learning for PyTorch."""

from kronfac import nn
from kronfac.distributed import DistributedConfig
from kronfac.linalg import CholeskyConfig, EighConfig, InverseConfig
from kronfac.linalg.cg import CGConfig
from kronfac.linalg.thermodynamic import HardwareModel, SolverSchedule, ThermodynamicConfig
from kronfac.optim import KFAC, SINGD, AdaFisher, AdaFisherW, KFACPreconditioner, KronOptimizer
from kronfac.optim.cgfac import CGFAC
from kronfac.optim.kldwrm import KLDWRM

__version__ = "0.1.0"

__all__ = [
    "CGFAC",
    "KFAC",
    "KLDWRM",
    "SINGD",
    "AdaFisher",
    "AdaFisherW",
    "CGConfig",
    "CholeskyConfig",
    "DistributedConfig",
    "EighConfig",
    "HardwareModel",
    "InverseConfig",
    "KFACPreconditioner",
    "KronOptimizer",
    "SolverSchedule",
    "ThermodynamicConfig",
    "__version__",
    "nn",
]
