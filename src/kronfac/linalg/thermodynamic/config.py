"""``ThermodynamicConfig``: K-FAC whose damped factors are inverted or solved on a simulated analog solver.

Donatella et al. 2025 ("Scalable Thermodynamic Second-order Optimization") offload the expensive linear algebra
of K-FAC to a thermodynamic computer, with factored damping ``U = (G + √λ I)^{-1} V (A + √λ I)^{-1}``:

* **method 1**: when the inverses are refreshed, the device estimates ``(A + √λ I)^{-1}`` and
  ``(G + √λ I)^{-1}`` (inverse mode: stationary covariance); each step applies them digitally (two matmuls);
* **method 2**: when the inverses are refreshed, the damped factors are programmed into the device; each step
  solves ``(G + √λ I) X = V`` and then ``(A + √λ I) U^T = X^T`` on it (solve mode: time averages), one
  right-hand side per column; no inverse is ever formed.

Both run through the hardware model (:mod:`kronfac.linalg.thermodynamic.hardware`): quantization, analog noise,
blocking, stabilization. A diagonal ``A`` (Embedding layers) is inverted digitally: an O(d) division has nothing
to gain from the device. The noise is seeded from ``seed`` and the factors (method 1) or the gradient
(method 2), so a run is reproducible and a resumed run continues identically.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from kronfac.linalg.base import InverseConfig, KroneckerInverse, register_inverse
from kronfac.linalg.cholesky import CholeskyInverse
from kronfac.linalg.thermodynamic.hardware import (
    HardwareModel,
    SolverSchedule,
    _normalised,
    block_slices,
    device_inverse,
    device_solve,
    program_matrix,
)
from kronfac.linalg.thermodynamic.ou import check_spd
from kronfac.validation import check_int

__all__ = ["ThermodynamicConfig", "ThermodynamicInverse", "ThermodynamicSolveInverse"]


def _generator(seed: int, *tensors: Tensor) -> torch.Generator:
    """A generator on the tensors' device seeded by ``seed`` and a digest of ``tensors`` (hashes of floats are
    stable across processes)."""
    digest = tuple((float(t.double().sum()), float(t.double().abs().sum()), tuple(t.shape)) for t in tensors)
    generator = torch.Generator(device=tensors[0].device)
    return generator.manual_seed(hash((seed, digest)) & 0x7FFF_FFFF_FFFF_FFFF)


def _eye_like(matrix: Tensor) -> Tensor:
    return torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)


@register_inverse
class ThermodynamicInverse(CholeskyInverse):
    """Method 1: explicit damped inverses estimated on the device, applied digitally like Cholesky's.

    ``device_seconds`` and ``io_seconds`` (0-d tensors) record the modelled hardware time of the refresh.
    """

    kind = "thermodynamic"

    def __init__(self, a_inv: Tensor, g_inv: Tensor, device_seconds: Tensor, io_seconds: Tensor) -> None:
        super().__init__(a_inv, g_inv)
        self.device_seconds, self.io_seconds = device_seconds, io_seconds

    def tensors(self) -> dict[str, Tensor]:
        return {**super().tensors(), "device_seconds": self.device_seconds, "io_seconds": self.io_seconds}


@register_inverse
class ThermodynamicSolveInverse(KroneckerInverse):
    """Method 2: the programmed damped factors; every :meth:`precondition` runs two solves on the device.

    ``device_seconds`` and ``io_seconds`` accumulate the modelled hardware time of all solves so far.
    """

    kind = "thermodynamic_solve"

    def __init__(
        self,
        a_programmed: Tensor,
        g_programmed: Tensor,
        settings: Tensor,
        device_seconds: Tensor | None = None,
        io_seconds: Tensor | None = None,
    ) -> None:
        self.a_programmed, self.g_programmed, self.settings = a_programmed, g_programmed, settings
        parsed = json.loads(bytes(settings.tolist()).decode())
        self.hardware = HardwareModel(**parsed["hardware"])
        self.schedule = SolverSchedule(**parsed["schedule"])
        self.seed = int(parsed["seed"])
        zero = torch.zeros((), dtype=torch.float64)
        self.device_seconds = zero.clone() if device_seconds is None else device_seconds.clone()
        self.io_seconds = zero.clone() if io_seconds is None else io_seconds.clone()

    def precondition(self, grad: Tensor) -> Tensor:
        v = grad.to(self.g_programmed.dtype)
        generator = _generator(self.seed, v)
        x, report = device_solve(self.g_programmed, v, self.hardware, self.schedule, generator)
        self.device_seconds += report.device_seconds
        self.io_seconds += report.io_seconds
        if self.a_programmed.ndim == 1:
            u = x / self.a_programmed
        else:
            u_t, report = device_solve(self.a_programmed, x.T, self.hardware, self.schedule, generator)
            self.device_seconds += report.device_seconds
            self.io_seconds += report.io_seconds
            u = u_t.T
        return u.to(grad.dtype)

    def tensors(self) -> dict[str, Tensor]:
        return {
            "a_programmed": self.a_programmed,
            "g_programmed": self.g_programmed,
            "settings": self.settings,
            "device_seconds": self.device_seconds,
            "io_seconds": self.io_seconds,
        }


@dataclass(kw_only=True)
class ThermodynamicConfig(InverseConfig):
    """Thermodynamic K-FAC (Donatella et al. 2025): damped factors inverted (method 1) or solved (method 2) by a
    simulated Ornstein-Uhlenbeck solver with factored damping ``√λ`` on each factor.

    Args:
        method: 1 (device inverses, refreshed every ``inverse_every`` steps) or 2 (device solves every step).
        hardware: quantization, noise, solver size, timing: :class:`HardwareModel` (default: ideal device).
        schedule: burn-in, sample spacing, duration or number of samples, β, chains: :class:`SolverSchedule`.
        seed: seed of the device noise.

    Example:
        >>> import torch
        >>> from kronfac.linalg.thermodynamic import HardwareModel, ThermodynamicConfig
        >>> config = ThermodynamicConfig(method=1, hardware=HardwareModel(input_bits=8, output_bits=8))
        >>> a, g = torch.eye(3, dtype=torch.float64), 2 * torch.eye(2, dtype=torch.float64)
        >>> config.build(a, g, damping=1e-4).precondition(torch.ones(2, 3, dtype=torch.float64)).shape
        torch.Size([2, 3])
    """

    method: int = 1
    hardware: HardwareModel = field(default_factory=HardwareModel)
    schedule: SolverSchedule = field(default_factory=SolverSchedule)
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.method, bool) or self.method not in (1, 2):
            raise ValueError(f"Invalid method: {self.method!r} (must be 1 (inverses) or 2 (linear solves))")
        self.method = check_int("method", self.method)
        self.seed = check_int("seed", self.seed, 0, 2**63 - 1)
        if not isinstance(self.hardware, HardwareModel):
            raise ValueError(f"Invalid hardware: {self.hardware!r} (must be a HardwareModel)")
        if not isinstance(self.schedule, SolverSchedule):
            raise ValueError(f"Invalid schedule: {self.schedule!r} (must be a SolverSchedule)")

    def build(self, a_factor: Tensor, g_factor: Tensor, damping: float) -> KroneckerInverse:
        if not (math.isfinite(damping) and damping > 0):
            raise ValueError(f"Invalid damping: {damping} (the OU solver needs damping > 0)")
        root = math.sqrt(damping)
        generator = _generator(self.seed, a_factor, g_factor)
        try:
            g_programmed = program_matrix(g_factor + root * _eye_like(g_factor), self.hardware, generator)
            if a_factor.ndim == 1:
                a_programmed = a_factor + root
                if not bool((a_programmed > 0).all()):
                    raise ValueError("diagonal factor A is not positive after damping")
            else:
                a_programmed = program_matrix(a_factor + root * _eye_like(a_factor), self.hardware, generator)
            if self.method == 1:
                return self._inverses(a_programmed, g_programmed, generator)
            for matrix in (a_programmed, g_programmed):
                if matrix.ndim == 2:
                    for block in block_slices(matrix.shape[0], self.hardware.solver_dim):
                        check_spd(_normalised(matrix[block, block])[0], name="programmed factor")
        except ValueError as exc:  # an indefinite programmed factor: let build_inverse keep the last inverse
            raise torch.linalg.LinAlgError(f"thermodynamic solver: {exc}") from exc
        settings = {"hardware": asdict(self.hardware), "schedule": asdict(self.schedule), "seed": self.seed}
        encoded = torch.tensor(list(json.dumps(settings).encode()), dtype=torch.uint8)
        return ThermodynamicSolveInverse(a_programmed, g_programmed, encoded)

    def _inverses(self, a_programmed: Tensor, g_programmed: Tensor, generator: torch.Generator) -> ThermodynamicInverse:
        g_inv, report = device_inverse(g_programmed, self.hardware, self.schedule, generator)
        device, io = report.device_seconds, report.io_seconds
        if a_programmed.ndim == 1:
            a_inv = 1.0 / a_programmed
        else:
            a_inv, report = device_inverse(a_programmed, self.hardware, self.schedule, generator)
            device, io = device + report.device_seconds, io + report.io_seconds
        seconds = torch.tensor([device, io], dtype=torch.float64)
        return ThermodynamicInverse(a_inv, g_inv, seconds[0].clone(), seconds[1].clone())
