"""A hardware model around the exact OU simulator: what a digital host and an analog thermodynamic solver do.

Follows the setting of Donatella et al. 2025 ("Scalable Thermodynamic Second-order Optimization"): the host
programs a symmetric positive definite matrix into the solver's couplings, streams right-hand sides in, lets the
device relax and reads results out. Every assumption is a named field of :class:`HardwareModel`:

* **input quantization** (``input_bits``): the matrix and the right-hand sides are quantized per tensor
  (:func:`~kronfac.linalg.thermodynamic.quantize.quantize`) before they reach the device;
* **output quantization** (``output_bits``): results are quantized per tensor when read back;
* **analog noise** (``analog_noise``): each programmed coupling carries a fixed Gaussian error (symmetric),
  with standard deviation relative to the largest coupling, drawn anew each time a matrix is programmed;
* **stabilization** (``stabilize``): quantization and noise can make a damped factor indefinite, and then the
  physical system diverges. The host, which knows the quantization error ``E`` and the noise level, adds
  ``(||E||_F + 3 σ sqrt(n)) I`` (an upper bound on the spectral perturbation, O(n^2) to compute): extra damping.
  Our choice, not the paper's; with ``stabilize=False`` an indefinite matrix raises ``ValueError``;
* **solver dimension** (``solver_dim``): a matrix larger than the solver is split into diagonal blocks of at
  most ``solver_dim`` rows, solved one after the other, and the coupling between blocks is dropped (the
  block-diagonal approximation of the factor);
* **scaling**: couplings are normalised by the largest absolute row sum (a Gershgorin bound on ``λ_max``), so
  the fastest mode relaxes no faster than the device ``time_constant`` and simulated time converts to seconds
  as ``t * time_constant``; right-hand sides are normalised to the device's unit input range, so ``β`` is a
  signal-to-thermal-noise ratio;
* **I/O** (``io_bandwidth``): every value moved between host and device costs its bit width (32 bits when not
  quantized) over a link of ``io_bandwidth`` bits per second; a symmetric matrix moves its upper triangle.

Times given to the device (``dt``, ``burn_in``, ``duration`` of :class:`SolverSchedule`) are in relaxation times
``1/λ_min`` of the programmed block. The simulator knows ``λ_min`` exactly; a real host would use the damping as
a lower bound on it, which is exact up to the factor ``(λ_min(A) + √λ) / √λ``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kronfac.linalg.thermodynamic.ou import OUMode, simulate_ou
from kronfac.linalg.thermodynamic.quantize import check_bits, quantize
from kronfac.validation import check_bool, check_int, check_positive_int, check_range

__all__ = [
    "DeviceReport",
    "HardwareModel",
    "SolverSchedule",
    "block_slices",
    "device_inverse",
    "device_solve",
    "program_matrix",
]

#: Bits per value moved when a side is not quantized (the host's float32).
UNQUANTIZED_BITS = 32
#: Multiple of the expected spectral norm (2 σ sqrt(n)) of a symmetric Gaussian noise matrix used as margin.
NOISE_MARGIN = 1.5


@dataclass(kw_only=True)
class HardwareModel:
    """Assumptions about the analog solver and its link to the host (defaults: ideal device, our timing guesses).

    Args:
        input_bits: bits (sign included) of the matrix and right-hand sides sent to the device; ``None`` sends
            them exactly.
        output_bits: bits of the values read back; ``None`` reads them exactly.
        analog_noise: standard deviation of the fixed Gaussian error on each programmed coupling, relative to
            the largest coupling (0 = none).
        solver_dim: largest matrix the device holds; larger matrices are split into diagonal blocks
            (``None`` = unlimited).
        time_constant: seconds per unit of normalised device time (the fastest mode's time constant). Our
            assumption: 1 µs, the order of RC time constants of board-level analog circuits.
        io_bandwidth: host-device link in bits per second. Our assumption: 100 Gbit/s.
        stabilize: add the damping margin described in the module docstring when quantization or noise is on.
    """

    input_bits: int | None = None
    output_bits: int | None = None
    analog_noise: float = 0.0
    solver_dim: int | None = None
    time_constant: float = 1e-6
    io_bandwidth: float = 1e11
    stabilize: bool = True

    def __post_init__(self) -> None:
        check_bits(self.input_bits, "input_bits")
        check_bits(self.output_bits, "output_bits")
        self.analog_noise = check_range("analog_noise", self.analog_noise, 0.0)
        self.solver_dim = None if self.solver_dim is None else check_positive_int("solver_dim", self.solver_dim)
        self.time_constant = check_range("time_constant (seconds)", self.time_constant, 0.0, low_open=True)
        self.io_bandwidth = check_range("io_bandwidth (bits per second)", self.io_bandwidth, 0.0, low_open=True)
        self.stabilize = check_bool("stabilize", self.stabilize)

    @property
    def input_value_bits(self) -> int:
        return UNQUANTIZED_BITS if self.input_bits is None else self.input_bits

    @property
    def output_value_bits(self) -> int:
        return UNQUANTIZED_BITS if self.output_bits is None else self.output_bits


#: Simulated time steps one read-out of the solver may take (the default schedule takes 266), and steps times
#: chains: a bound on the work of one simulated solve (~1 s of CPU for a 64-dim block at the bound).
MAX_SOLVER_STEPS = 100_000
MAX_SOLVER_WORK = 2_000_000


@dataclass(kw_only=True)
class SolverSchedule:
    """How long the device runs for one read-out; times in relaxation times ``1/λ_min`` of the programmed block.

    Args:
        dt: sample spacing (> 0).
        burn_in: relaxation before sampling (>= 0).
        num_samples: samples per chain after burn-in (>= 2); ignored when ``duration`` is set.
        duration: sampling time after burn-in (> 0), overrides ``num_samples``.
        beta: inverse temperature β (solve mode: signal-to-thermal-noise ratio of unit-range inputs).
        num_chains: independent chains sampled together in inverse mode.
        num_batches: batches of the batch-means standard error.
    """

    dt: float = 0.5
    burn_in: float = 5.0
    num_samples: int = 256
    duration: float | None = None
    beta: float = 1e3
    num_chains: int = 32
    num_batches: int = 10

    def __post_init__(self) -> None:
        self.dt = check_range("dt", self.dt, 0.0, low_open=True)
        self.burn_in = check_range("burn_in", self.burn_in, 0.0)
        if self.duration is not None:
            self.duration = check_range("duration", self.duration, 0.0, low_open=True)
        self.num_samples = check_int("num_samples", self.num_samples, 2)
        self.beta = check_range("beta", self.beta, 0.0, low_open=True)
        self.num_chains = check_positive_int("num_chains", self.num_chains)
        self.num_batches = check_int("num_batches", self.num_batches, 2)
        # Bounded work (also when a schedule arrives inside a checkpoint): the simulator takes one step per dt.
        sampling = self.duration if self.duration is not None else self.num_samples * self.dt
        steps = (self.burn_in + sampling) / self.dt
        if steps > MAX_SOLVER_STEPS or steps * self.num_chains > MAX_SOLVER_WORK:
            raise ValueError(
                f"Invalid SolverSchedule: {steps:.3g} steps x {self.num_chains} chains per read-out exceeds the "
                f"budget ({MAX_SOLVER_STEPS:.0e} steps, {MAX_SOLVER_WORK:.0e} chain-steps); shorten burn_in or "
                "duration, raise dt, or use fewer samples or chains"
            )

    def simulator_kwargs(self) -> dict[str, Any]:
        length: dict[str, Any] = (
            {"duration": self.duration} if self.duration is not None else {"num_samples": self.num_samples}
        )
        return {
            "dt": self.dt,
            "burn_in": self.burn_in,
            "beta": self.beta,
            "num_batches": self.num_batches,
            "time_unit": "relaxation",
            **length,
        }


@dataclass(frozen=True)
class DeviceReport:
    """What one device call cost: seconds on the device and on the link, blocks used, worst standard error."""

    device_seconds: float
    io_seconds: float
    num_blocks: int
    max_std_error: float


def block_slices(size: int, solver_dim: int | None) -> list[slice]:
    """Contiguous diagonal blocks of at most ``solver_dim`` rows covering ``range(size)``."""
    if solver_dim is None or solver_dim >= size:
        return [slice(0, size)]
    count = math.ceil(size / solver_dim)
    bounds = [round(i * size / count) for i in range(count + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(count)]


def program_matrix(matrix: Tensor, hardware: HardwareModel, generator: torch.Generator | None = None) -> Tensor:
    """The matrix the device actually holds: quantized, with analog noise and the stabilizing shift.

    Coupling between the diagonal blocks of ``hardware.solver_dim`` is dropped. The result is symmetric but not
    checked for definiteness (the simulator does that).
    """
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"matrix must be square, got shape {tuple(matrix.shape)}")
    size = matrix.shape[0]
    programmed = quantize(matrix, hardware.input_bits)
    margin = float(torch.linalg.matrix_norm(programmed - matrix)) if hardware.input_bits is not None else 0.0
    if hardware.analog_noise > 0:
        sigma = hardware.analog_noise * float(programmed.abs().max())
        noise = torch.randn(programmed.shape, generator=generator, dtype=matrix.dtype, device=matrix.device)
        programmed = programmed + sigma * (noise + noise.T) / math.sqrt(2.0)
        margin += NOISE_MARGIN * 2.0 * sigma * math.sqrt(size)
    if hardware.stabilize and margin > 0:
        programmed = programmed + margin * torch.eye(size, dtype=matrix.dtype, device=matrix.device)
    blocks = block_slices(size, hardware.solver_dim)
    if len(blocks) == 1:
        return programmed
    kept = torch.zeros_like(programmed)
    for block in blocks:
        kept[block, block] = programmed[block, block]
    return kept


def _normalised(block: Tensor) -> tuple[Tensor, float]:
    scale = float(block.abs().sum(dim=1).max())
    return block / scale, scale


def device_solve(
    programmed: Tensor,
    rhs: Tensor,
    hardware: HardwareModel,
    schedule: SolverSchedule,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, DeviceReport]:
    """Solve ``programmed @ X = rhs`` for all columns of ``rhs`` on the (simulated) device.

    Raises:
        ValueError: if a programmed block is not symmetric positive definite.
    """
    rhs_in = quantize(rhs, hardware.input_bits)
    rhs_range = float(rhs_in.abs().max())
    solution = torch.zeros_like(rhs_in)
    device_time, max_se = 0.0, 0.0
    blocks = block_slices(programmed.shape[0], hardware.solver_dim)
    if rhs_range > 0:
        for block in blocks:
            matrix, scale = _normalised(programmed[block, block])
            result = simulate_ou(
                matrix,
                rhs_in[block] / rhs_range,
                mode=OUMode.SOLVE,
                generator=generator,
                **schedule.simulator_kwargs(),
            )
            solution[block] = result.estimate * (rhs_range / scale)
            device_time += result.elapsed_time * hardware.time_constant
            max_se = max(max_se, float(result.std_error.max()) * rhs_range / scale)
    out = quantize(solution, hardware.output_bits)
    matrix_values = sum((b.stop - b.start) * (b.stop - b.start + 1) // 2 for b in blocks)
    bits = (matrix_values + rhs.numel()) * hardware.input_value_bits + out.numel() * hardware.output_value_bits
    return out, DeviceReport(device_time, bits / hardware.io_bandwidth, len(blocks), max_se)


def device_inverse(
    programmed: Tensor,
    hardware: HardwareModel,
    schedule: SolverSchedule,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, DeviceReport]:
    """Estimate ``programmed^{-1}`` (block-diagonal when blocked) from the stationary covariance.

    Raises:
        ValueError: if a programmed block is not symmetric positive definite.
    """
    inverse = torch.zeros_like(programmed)
    device_time, max_se = 0.0, 0.0
    blocks = block_slices(programmed.shape[0], hardware.solver_dim)
    for block in blocks:
        matrix, scale = _normalised(programmed[block, block])
        result = simulate_ou(
            matrix,
            mode=OUMode.INVERSE,
            num_chains=schedule.num_chains,
            generator=generator,
            **schedule.simulator_kwargs(),
        )
        inverse[block, block] = result.estimate / scale
        # The parallel chains stand for one long chain on one device: burn in once, then sample them all.
        burn = schedule.burn_in * result.relaxation_time
        device_time += (burn + schedule.num_chains * (result.elapsed_time - burn)) * hardware.time_constant
        max_se = max(max_se, float(result.std_error.max()) / scale)
    out = quantize(inverse, hardware.output_bits)
    values = sum((b.stop - b.start) * (b.stop - b.start + 1) // 2 for b in blocks)
    bits = values * (hardware.input_value_bits + hardware.output_value_bits)
    return out, DeviceReport(device_time, bits / hardware.io_bandwidth, len(blocks), max_se)
