"""Per-layer curvature: capture hooks, Kronecker factors and their averaging, Fisher types."""

from kronfac.curvature.block import Approximation, CurvatureBlock, CurvatureStatistics
from kronfac.curvature.capture import Capture, TrackedLayer
from kronfac.curvature.factors import KroneckerFactors
from kronfac.curvature.fisher import FisherType, LossAverage, LossType
from kronfac.curvature.kfac_block import KFACBlock

__all__ = [
    "Approximation",
    "Capture",
    "CurvatureBlock",
    "CurvatureStatistics",
    "FisherType",
    "KFACBlock",
    "KroneckerFactors",
    "LossAverage",
    "LossType",
    "TrackedLayer",
]
