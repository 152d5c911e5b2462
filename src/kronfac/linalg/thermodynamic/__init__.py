"""Thermodynamic linear algebra for K-FAC (Donatella et al. 2025, "Scalable Thermodynamic Second-order
Optimization"): an exact Ornstein-Uhlenbeck solver simulator, a hardware model around it, the K-FAC inverse
backend ``ThermodynamicConfig`` and a wall-clock cost model."""

from kronfac.linalg.thermodynamic.config import (
    ThermodynamicConfig,
    ThermodynamicInverse,
    ThermodynamicSolveInverse,
)
from kronfac.linalg.thermodynamic.hardware import (
    DeviceReport,
    HardwareModel,
    SolverSchedule,
    block_slices,
    device_inverse,
    device_solve,
    program_matrix,
)
from kronfac.linalg.thermodynamic.ou import OUMode, OUResult, check_spd, ou_transition, simulate_ou
from kronfac.linalg.thermodynamic.quantize import quantization_error_bound, quantize

__all__ = [
    "DeviceReport",
    "HardwareModel",
    "OUMode",
    "OUResult",
    "SolverSchedule",
    "ThermodynamicConfig",
    "ThermodynamicInverse",
    "ThermodynamicSolveInverse",
    "block_slices",
    "check_spd",
    "device_inverse",
    "device_solve",
    "ou_transition",
    "program_matrix",
    "quantization_error_bound",
    "quantize",
    "simulate_ou",
]
