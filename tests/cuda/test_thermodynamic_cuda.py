"""Thermodynamic solver and backend on a CUDA device (skipped without one, see conftest.py): same answers as on
the CPU."""

from __future__ import annotations

import pytest
import torch

import kronfac
from kronfac.linalg.cholesky import CholeskyConfig
from kronfac.linalg.eigh import EighConfig
from kronfac.linalg.thermodynamic import SolverSchedule, ThermodynamicConfig, simulate_ou

CUDA = torch.device("cuda")
LONG = {
    1: SolverSchedule(dt=1.0, burn_in=10.0, num_samples=2000, num_chains=64),
    2: SolverSchedule(dt=0.5, burn_in=20.0, num_samples=2000, beta=1e6),
}
TOLERANCE = {1: 3e-2, 2: 3e-3}


def test_simulator_on_cuda_solves_and_inverts() -> None:
    g = torch.Generator(device=CUDA).manual_seed(0)
    x = torch.randn(6, 6, dtype=torch.float64, device=CUDA, generator=g)
    m = x @ x.T / 6 + 0.5 * torch.eye(6, dtype=torch.float64, device=CUDA)
    c = torch.randn(6, 8, dtype=torch.float64, device=CUDA, generator=g)
    solve = simulate_ou(m, c, dt=0.5, burn_in=20, duration=2000, beta=100.0, time_unit="relaxation", generator=g)
    exact = torch.linalg.solve(m, c)
    assert solve.estimate.device.type == "cuda"
    assert float((solve.estimate - exact).abs().max()) < 0.02 * float(exact.abs().max())
    inverse = simulate_ou(
        m, mode="inverse", dt=1.0, burn_in=10, num_samples=1000, num_chains=64, time_unit="relaxation", generator=g
    )
    target = torch.linalg.inv(m)
    assert float(torch.linalg.matrix_norm(inverse.estimate - target) / torch.linalg.matrix_norm(target)) < 0.03


@pytest.mark.parametrize("method", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backend_on_cuda_matches_factored_damping(method: int, dtype: torch.dtype) -> None:
    x, y = torch.randn(300, 6, dtype=dtype, device=CUDA), torch.randn(300, 4, dtype=dtype, device=CUDA)
    a, g = x.T @ x / 300, y.T @ y / 300
    grad = torch.randn(4, 6, dtype=dtype, device=CUDA)
    reference = CholeskyConfig(pi_correction=False).build(a, g, 1e-2).precondition(grad)
    update = ThermodynamicConfig(method=method, schedule=LONG[method]).build(a, g, 1e-2).precondition(grad)
    assert update.device.type == "cuda" and update.dtype == dtype
    assert float((update - reference).norm() / reference.norm()) < TOLERANCE[method]


def _train(inverse: kronfac.InverseConfig) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double().to(CUDA)
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    x = torch.randn(512, 4, dtype=torch.float64).to(CUDA)
    y = torch.randn(512, 3, dtype=torch.float64).to(CUDA)
    opt = kronfac.KFAC(
        model,
        lr=0.1,
        momentum=0.0,
        damping=1e-12,
        kl_clip=None,
        inverse_every=1,
        loss="mse",
        factor_dtype=torch.float64,
        inverse=inverse,
    )
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return start, torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("method", [1, 2])
def test_kfac_on_cuda_with_thermodynamic_backend_equals_eigh(method: int) -> None:
    start, eigh = _train(EighConfig())
    _, thermo = _train(ThermodynamicConfig(method=method, schedule=LONG[method]))
    assert thermo.device.type == "cuda"
    assert float((thermo - eigh).norm() / (eigh - start).norm()) < TOLERANCE[method]
