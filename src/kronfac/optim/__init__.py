"""Optimizers: torch.optim subclasses built on the shared curvature core."""

from kronfac.optim.adafisher import AdaFisher, AdaFisherW
from kronfac.optim.base import KronOptimizer
from kronfac.optim.kfac import KFAC
from kronfac.optim.preconditioner import KFACPreconditioner
from kronfac.optim.registry import OPTIMIZERS, register_optimizer
from kronfac.optim.singd import SINGD

__all__ = [
    "KFAC",
    "OPTIMIZERS",
    "SINGD",
    "AdaFisher",
    "AdaFisherW",
    "KFACPreconditioner",
    "KronOptimizer",
    "register_optimizer",
]
