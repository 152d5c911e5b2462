"""``ThermodynamicConfig`` as a K-FAC inverse backend: agreement with the digital backends, state, failures."""

from __future__ import annotations

import pytest
import torch

import kronfac
from kronfac.linalg.base import build_inverse, inverse_from_state, inverse_to_state
from kronfac.linalg.cholesky import CholeskyConfig
from kronfac.linalg.eigh import EighConfig
from kronfac.linalg.thermodynamic import HardwareModel, SolverSchedule, ThermodynamicConfig

DTYPE = torch.float64
LONG = {
    1: SolverSchedule(dt=1.0, burn_in=10.0, num_samples=2000, num_chains=64),
    2: SolverSchedule(dt=0.5, burn_in=20.0, num_samples=2000, beta=1e6),
}
TOLERANCE = {1: 3e-2, 2: 3e-3}


def _factors(d_in: int = 6, d_out: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = torch.randn(300, d_in, dtype=DTYPE), torch.randn(300, d_out, dtype=DTYPE)
    return x.T @ x / 300, y.T @ y / 300


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("method", [1, 2])
def test_ideal_device_matches_factored_damping(method: int) -> None:
    a, g = _factors()
    grad = torch.randn(4, 6, dtype=DTYPE)
    reference = CholeskyConfig(pi_correction=False).build(a, g, 1e-2).precondition(grad)
    inverse = ThermodynamicConfig(method=method, schedule=LONG[method]).build(a, g, 1e-2)
    assert _relative(inverse.precondition(grad), reference) < TOLERANCE[method]
    assert float(inverse.device_seconds) > 0 and float(inverse.io_seconds) > 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("method", [1, 2])
def test_diagonal_input_factor(method: int) -> None:
    _, g = _factors()
    a = torch.rand(6, dtype=DTYPE) + 0.5
    grad = torch.randn(4, 6, dtype=DTYPE)
    reference = CholeskyConfig(pi_correction=False).build(a, g, 1e-2).precondition(grad)
    inverse = ThermodynamicConfig(method=method, schedule=LONG[method]).build(a, g, 1e-2)
    assert _relative(inverse.precondition(grad), reference) < TOLERANCE[method]


@pytest.mark.parametrize("method", [1, 2])
def test_state_round_trip_and_determinism(method: int) -> None:
    a, g = _factors()
    grad = torch.randn(4, 6, dtype=DTYPE)
    config = ThermodynamicConfig(method=method, hardware=HardwareModel(input_bits=8, output_bits=8), seed=3)
    first, second = config.build(a, g, 1e-2), config.build(a, g, 1e-2)
    assert torch.equal(first.precondition(grad), second.precondition(grad))
    restored = inverse_from_state(inverse_to_state(first))
    assert type(restored) is type(first)
    assert torch.equal(restored.precondition(grad), first.precondition(grad))
    other = ThermodynamicConfig(method=method, hardware=config.hardware, seed=4).build(a, g, 1e-2)
    assert not torch.equal(other.precondition(grad), first.precondition(grad))


@pytest.mark.parametrize("method", [1, 2])
def test_indefinite_programmed_factor_keeps_the_last_inverse(method: int) -> None:
    x = torch.randn(8, 2, dtype=DTYPE)
    a, g = x @ x.T, torch.eye(3, dtype=DTYPE)  # rank 2: 2-bit quantization breaks definiteness
    config = ThermodynamicConfig(method=method, hardware=HardwareModel(input_bits=2, stabilize=False))
    with pytest.raises(torch.linalg.LinAlgError, match="thermodynamic solver"):
        config.build(a, g, 1e-6)
    with pytest.warns(RuntimeWarning, match="keeping the last good inverse"):
        assert build_inverse(config, a, g, 1e-6, previous=None, layer="fc") is None
    stable = ThermodynamicConfig(method=method, hardware=HardwareModel(input_bits=2))
    update = stable.build(a, g, 1e-6).precondition(torch.randn(3, 8, dtype=DTYPE))
    assert bool(torch.isfinite(update).all())


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="method"):
        ThermodynamicConfig(method=3)
    a, g = _factors()
    with pytest.raises(ValueError, match="damping"):
        ThermodynamicConfig().build(a, g, 0.0)


def _train(inverse: kronfac.InverseConfig, steps: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    x, y = torch.randn(512, 4, dtype=DTYPE), torch.randn(512, 3, dtype=DTYPE)
    opt = kronfac.KFAC(
        model,
        lr=0.1,
        momentum=0.0,
        damping=1e-12,
        kl_clip=None,
        inverse_every=1,
        loss="mse",
        factor_dtype=DTYPE,
        inverse=inverse,
    )
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return start, torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("method", [1, 2])
def test_kfac_with_long_unquantized_thermodynamic_solver_equals_kfac_with_eigh(method: int) -> None:
    # Tiny damping makes the factored damping of the thermodynamic backend agree with eigh's exact damping.
    start, eigh = _train(EighConfig())
    _, thermo = _train(ThermodynamicConfig(method=method, schedule=LONG[method]))
    assert float((thermo - eigh).norm() / (eigh - start).norm()) < TOLERANCE[method]
