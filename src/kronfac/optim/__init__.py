"""Optimizers: torch.optim subclasses built on the shared curvature core."""

from kronfac.optim.adafisher import AdaFisher, AdaFisherW
from kronfac.optim.base import KronOptimizer
from kronfac.optim.kfac import KFAC
from kronfac.optim.preconditioner import KFACPreconditioner
from kronfac.optim.registry import OPTIMIZERS, register_optimizer

__all__ = [
    "KFAC",
    "OPTIMIZERS",
    "AdaFisher",
    "AdaFisherW",
    "KFACPreconditioner",
    "KronOptimizer",
    "register_optimizer",
]
