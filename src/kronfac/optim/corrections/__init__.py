"""Corrections: gradient transforms composed into a kronfac step (KLD-WRM and its QE refinement)."""

from kronfac.optim.corrections.base import Correction, CorrectionContext
from kronfac.optim.corrections.kldwrm import KLDWRM, KLDWRMVariant
from kronfac.optim.corrections.wake import WakeRefinement

__all__ = ["KLDWRM", "Correction", "CorrectionContext", "KLDWRMVariant", "WakeRefinement"]
