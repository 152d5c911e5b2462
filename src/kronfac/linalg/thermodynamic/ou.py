"""Exact simulation of the Ornstein-Uhlenbeck process behind a thermodynamic linear-algebra solver.

A thermodynamic solver (Aifer et al. 2023, "Thermodynamic linear algebra"; used for K-FAC by Donatella et al.
2025, "Scalable Thermodynamic Second-order Optimization") is a physical system of coupled, noisy oscillators
whose state follows

    dx = -(M x - c) dt + sqrt(2/β) dW,        i.e.  dx = -M (x - b) dt + sqrt(2/β) dW  with  b = M^{-1} c,

for a symmetric positive definite coupling matrix ``M``. Its stationary distribution is Gaussian with mean
``M^{-1} c`` and covariance ``M^{-1} / β``. Two read-outs follow:

* **solve**: the time average of ``x`` after a burn-in estimates ``M^{-1} c`` (one column per right-hand side);
* **inverse**: with ``c = 0`` the sample covariance of ``x`` estimates ``M^{-1} / β``; times ``β`` gives ``M^{-1}``.

We simulate the process *exactly*: with ``M = Q diag(s) Q^T`` the modes ``z = Q^T x`` are independent scalar OU
processes, and over a time step ``Δ`` the transition is Gaussian with mean ``μ + e^{-sΔ} (z - μ)``
(``μ = Q^T c / s``) and variance ``(1 - e^{-2sΔ}) / (β s)``. There is no discretisation error; ``dt`` is only
the spacing at which the device state is sampled. Samples are generated in chunks (a short linear recurrence
written as one batched matrix product), batched over many right-hand sides or independent chains.

Time is in the units of ``M`` (``time_unit="absolute"``: the fastest mode relaxes in ``1/λ_max``, the slowest
in ``1/λ_min``) or in relaxation times ``1/λ_min`` (``time_unit="relaxation"``). The standard error reported
with each estimate comes from batch means (the samples are split into contiguous batches), so it accounts for
the autocorrelation of the trajectory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

__all__ = ["OUMode", "OUResult", "check_spd", "ou_transition", "simulate_ou"]

#: Chunk length of the batched recurrence: memory is ``d * CHUNK^2`` numbers, work per sample ``O(d k CHUNK)``.
CHUNK = 64
#: Decay exponents beyond this are flushed to zero (see :func:`_decay`).
FLUSH = 48.0


class OUMode(str, Enum):
    """What the solver reads out: the time-averaged mean (``solve``) or the sample covariance (``inverse``)."""

    SOLVE = "solve"
    INVERSE = "inverse"


@dataclass(frozen=True)
class OUResult:
    """An estimate from the simulated solver plus diagnostics.

    Attributes:
        estimate: ``M^{-1} c`` (solve mode, same shape as ``c``) or ``M^{-1}`` (inverse mode, ``β`` times the
            sample covariance).
        std_error: estimated standard error of every entry of ``estimate`` (batch means).
        elapsed_time: simulated device time, burn-in included, in the units of ``M``.
        time_constant: ``1 / λ_max(M)``, the time constant of the fastest mode.
        relaxation_time: ``1 / λ_min(M)``, the time constant of the slowest mode.
        num_samples: samples per chain after burn-in.
        num_chains: independent chains (inverse mode) or right-hand sides (solve mode) simulated together.
    """

    estimate: Tensor
    std_error: Tensor
    elapsed_time: float
    time_constant: float
    relaxation_time: float
    num_samples: int
    num_chains: int

    @property
    def elapsed_time_constants(self) -> float:
        """Elapsed device time in units of the fastest time constant (what a hardware clock would count)."""
        return self.elapsed_time / self.time_constant

    @property
    def elapsed_relaxation_times(self) -> float:
        """Elapsed device time in units of the slowest relaxation time ``1/λ_min``."""
        return self.elapsed_time / self.relaxation_time


def check_spd(matrix: Tensor, *, name: str = "M", rtol: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Validate a symmetric positive definite drift matrix and return its eigenvalues and eigenvectors.

    Raises:
        ValueError: if ``matrix`` is not square, not finite, not symmetric (to ``rtol`` of its largest entry)
            or not positive definite; the message names the problem.
    """
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty square matrix, got shape {tuple(matrix.shape)}")
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError(f"{name} has non-finite entries")
    scale = float(matrix.abs().max())
    asymmetry = float((matrix - matrix.T).abs().max())
    if asymmetry > rtol * scale:
        raise ValueError(
            f"{name} is not symmetric (max |M - M^T| = {asymmetry:.3g} vs max |M| = {scale:.3g}); "
            "the OU solver needs a symmetric positive definite drift matrix"
        )
    eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (matrix + matrix.T))
    if not bool(eigenvalues[0] > 0):
        raise ValueError(
            f"{name} is not positive definite (smallest eigenvalue {float(eigenvalues[0]):.3g}); "
            "the OU process has no stationary distribution (add damping)"
        )
    return eigenvalues, eigenvectors


def _check_positive(value: float, name: str) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"Invalid {name}: {value!r} (must be a finite number > 0)")


def _as_columns(tensor: Tensor, d: int, name: str) -> Tensor:
    columns = tensor.unsqueeze(1) if tensor.ndim == 1 else tensor
    if columns.ndim != 2 or columns.shape[0] != d:
        raise ValueError(f"{name} must have shape ({d},) or ({d}, k), got {tuple(tensor.shape)}")
    if not bool(torch.isfinite(columns).all()):
        raise ValueError(f"{name} has non-finite entries")
    return columns


def _modal_step(
    z: Tensor, mean: Tensor, rates: Tensor, elapsed: float, beta: float, generator: torch.Generator | None
) -> Tensor:
    """Exact transition of independent scalar OU modes (rows of ``z``) over ``elapsed`` time."""
    decay = torch.exp(-rates * elapsed).unsqueeze(1)
    std = torch.sqrt(-torch.expm1(-2 * rates * elapsed) / (beta * rates)).unsqueeze(1)
    noise = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
    return mean + decay * (z - mean) + std * noise


def ou_transition(
    matrix: Tensor,
    rhs: Tensor,
    state: Tensor,
    elapsed: float,
    *,
    beta: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample ``x(t + elapsed)`` given ``x(t) = state`` exactly, for every column of ``state``.

    Args:
        matrix: symmetric positive definite ``M`` (``d x d``).
        rhs: ``c`` (``d`` or ``d x k``), broadcast against ``state``.
        state: ``x(t)`` (``d`` or ``d x k``).
        elapsed: time step ``Δ > 0`` in the units of ``M``.
        beta: inverse temperature ``β > 0``.
        generator: source of the Gaussian noise.

    Returns:
        A sample of ``x(t + Δ)`` shaped like ``state``.
    """
    _check_positive(elapsed, "elapsed")
    _check_positive(beta, "beta")
    rates, basis = check_spd(matrix)
    d = matrix.shape[0]
    x = _as_columns(state.to(matrix.dtype), d, "state")
    c = _as_columns(rhs.to(matrix.dtype), d, "rhs")
    mean = (basis.T @ c) / rates.unsqueeze(1)
    z = _modal_step(basis.T @ x, mean.expand_as(x), rates, float(elapsed), float(beta), generator)
    return (basis @ z).reshape(state.shape)


def _decay(exponent: Tensor) -> Tensor:
    """``exp(-exponent)``, flushed to zero below ``e^-FLUSH``: subnormal numbers make CPU matmuls crawl, and
    a factor below 1e-21 next to the unit diagonal of the recurrence is below float64 round-off anyway."""
    return torch.where(exponent < FLUSH, torch.exp(-exponent), torch.zeros_like(exponent))


def _batch_sizes(num_samples: int, num_batches: int) -> list[int]:
    batches = min(num_batches, num_samples)
    base, extra = divmod(num_samples, batches)
    return [base + (1 if i < extra else 0) for i in range(batches)]


def simulate_ou(
    matrix: Tensor,
    rhs: Tensor | None = None,
    *,
    mode: OUMode | str = OUMode.SOLVE,
    dt: float,
    burn_in: float = 0.0,
    duration: float | None = None,
    num_samples: int | None = None,
    beta: float = 1.0,
    num_chains: int = 1,
    num_batches: int = 10,
    initial: Tensor | None = None,
    time_unit: str = "absolute",
    generator: torch.Generator | None = None,
) -> OUResult:
    """Run the solver: burn in, then sample every ``dt`` and average (solve) or form the covariance (inverse).

    Args:
        matrix: symmetric positive definite ``M`` (``d x d``).
        rhs: solve mode: ``c`` (``d`` or ``d x k``, one chain per column). Inverse mode: must be ``None``.
        mode: ``"solve"`` or ``"inverse"``.
        dt: sample spacing, > 0.
        burn_in: time simulated (in one exact transition) before sampling starts, >= 0.
        duration: sampling time after burn-in (``num_samples = round(duration / dt)``, at least 2).
        num_samples: samples per chain after burn-in, >= 2 (give ``duration`` or ``num_samples``, not both).
        beta: inverse temperature ``β`` of the noise, > 0.
        num_chains: independent chains in inverse mode (ignored in solve mode: one chain per column of ``c``).
        num_batches: batches for the batch-means standard error, >= 2.
        initial: starting state (``d`` or ``d x k``); zeros (a device at rest) by default.
        time_unit: ``"absolute"`` (units of ``M``) or ``"relaxation"`` (multiples of ``1/λ_min``) for ``dt``,
            ``burn_in`` and ``duration``.
        generator: source of the noise; a seeded generator makes the result deterministic.

    Returns:
        An :class:`OUResult`.

    Raises:
        ValueError: on a non-symmetric or indefinite ``M``, ``dt <= 0``, or any other invalid argument.
    """
    mode = OUMode(mode)
    _check_positive(dt, "dt")
    _check_positive(beta, "beta")
    if not (math.isfinite(burn_in) and burn_in >= 0):
        raise ValueError(f"Invalid burn_in: {burn_in!r} (must be >= 0)")
    if (duration is None) == (num_samples is None):
        raise ValueError("Give exactly one of duration (> 0) and num_samples (>= 2)")
    if duration is not None:
        _check_positive(duration, "duration")
        num_samples = max(2, round(duration / dt))
    assert num_samples is not None
    if num_samples < 2:
        raise ValueError(f"Invalid num_samples: {num_samples} (must be >= 2)")
    if num_batches < 2:
        raise ValueError(f"Invalid num_batches: {num_batches} (must be >= 2)")
    if time_unit not in ("absolute", "relaxation"):
        raise ValueError(f"Invalid time_unit: {time_unit!r} (must be 'absolute' or 'relaxation')")

    rates, basis = check_spd(matrix)
    d, dtype = matrix.shape[0], matrix.dtype
    unit = 1.0 / float(rates[0]) if time_unit == "relaxation" else 1.0
    step, burn = float(dt) * unit, float(burn_in) * unit

    if mode is OUMode.SOLVE:
        if rhs is None:
            raise ValueError("Solve mode needs a right-hand side rhs")
        c = _as_columns(rhs.to(dtype), d, "rhs")
        chains = c.shape[1]
        mean = (basis.T @ c) / rates.unsqueeze(1)
    else:
        if rhs is not None:
            raise ValueError("Inverse mode takes no rhs (it samples the process with c = 0)")
        if num_chains < 1:
            raise ValueError(f"Invalid num_chains: {num_chains} (must be >= 1)")
        chains = num_chains
        mean = matrix.new_zeros(d, chains)
    if initial is None:
        z = matrix.new_zeros(d, chains)
    else:
        z = basis.T @ _as_columns(initial.to(dtype), d, "initial").expand(d, chains)
    if burn > 0:
        z = _modal_step(z, mean, rates, burn, float(beta), generator)

    # Chunked recurrence z_j = a z_{j-1} + η_j:  z_{1..L} = a^{1..L} z_0 + P η with P[j, i] = a^{j-i} (i <= j).
    sizes = _batch_sizes(num_samples, num_batches)
    lags = torch.arange(min(CHUNK, max(sizes)), dtype=dtype, device=matrix.device)
    lag_matrix = lags.unsqueeze(1) - lags.unsqueeze(0)
    transfer = _decay(rates.view(d, 1, 1) * step * lag_matrix.clamp_min(0)) * (lag_matrix >= 0)
    decay_powers = _decay(rates.unsqueeze(1) * step * (lags + 1))
    decay = torch.exp(-rates * step).unsqueeze(1)
    noise_std = torch.sqrt(-torch.expm1(-2 * rates * step) / (beta * rates)).view(d, 1, 1)
    drive = ((1 - decay) * mean).unsqueeze(1)

    batch_means = []
    for size in sizes:
        total = matrix.new_zeros((d, chains) if mode is OUMode.SOLVE else (d, d))
        done = 0
        while done < size:
            length = min(len(lags), size - done)
            noise = torch.randn((d, length, chains), generator=generator, dtype=dtype, device=matrix.device)
            eta = drive + noise_std * noise
            path = decay_powers[:, :length, None] * z.unsqueeze(1) + transfer[:, :length, :length] @ eta
            z = path[:, -1, :]
            if mode is OUMode.SOLVE:
                total += path.sum(dim=1)
            else:
                flat = path.reshape(d, length * chains)
                total += flat @ flat.T
            done += length
        batch_means.append(total / (size if mode is OUMode.SOLVE else size * chains))

    modal = torch.stack(batch_means)
    weights = torch.tensor(sizes, dtype=dtype, device=matrix.device)
    if mode is OUMode.SOLVE:
        per_batch = basis @ modal
    else:
        per_batch = float(beta) * (basis @ modal @ basis.T)
    estimate = (weights.view(-1, 1, 1) * per_batch).sum(0) / weights.sum()
    std_error = per_batch.std(dim=0) / math.sqrt(per_batch.shape[0])
    if mode is OUMode.SOLVE and rhs is not None and rhs.ndim == 1:
        estimate, std_error = estimate.squeeze(1), std_error.squeeze(1)
    return OUResult(
        estimate=estimate,
        std_error=std_error,
        elapsed_time=burn + num_samples * step,
        time_constant=1.0 / float(rates[-1]),
        relaxation_time=1.0 / float(rates[0]),
        num_samples=num_samples,
        num_chains=chains,
    )
