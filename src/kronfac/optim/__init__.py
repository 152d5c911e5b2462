"""Optimizers: torch.optim subclasses built on the shared curvature core and its one step."""

from kronfac.optim.adafisher import AdaFisher, AdaFisherW
from kronfac.optim.base import KronOptimizer, WeightDecay
from kronfac.optim.cgfac import CGFAC
from kronfac.optim.corrections import KLDWRM, Correction
from kronfac.optim.kfac import KFAC
from kronfac.optim.options import CaptureOptions
from kronfac.optim.preconditioner import KFACPreconditioner
from kronfac.optim.singd import SINGD

__all__ = [
    "CGFAC",
    "KFAC",
    "KLDWRM",
    "SINGD",
    "AdaFisher",
    "AdaFisherW",
    "CaptureOptions",
    "Correction",
    "KFACPreconditioner",
    "KronOptimizer",
    "WeightDecay",
]
