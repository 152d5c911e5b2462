"""Hardware model of the thermodynamic solver: quantization, blocking, stabilization, I/O accounting."""

from __future__ import annotations

import pytest
import torch

from kronfac.linalg.thermodynamic import (
    HardwareModel,
    SolverSchedule,
    block_slices,
    device_inverse,
    device_solve,
    program_matrix,
    quantization_error_bound,
    quantize,
)

DTYPE = torch.float64
LONG = SolverSchedule(dt=0.5, burn_in=20.0, num_samples=4000, beta=1e4, num_chains=64)


def _spd(d: int, seed: int, shift: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(d, d, generator=g, dtype=DTYPE)
    return x @ x.T / d + shift * torch.eye(d, dtype=DTYPE)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, 8, 12, 16])
def test_quantization_error_is_bounded_by_bit_width(bits: int) -> None:
    values = torch.linspace(-3.0, 3.0, 10_001, dtype=DTYPE)
    error = (quantize(values, bits) - values).abs().max()
    bound = quantization_error_bound(3.0, bits)
    assert float(error) <= bound * (1 + 1e-12)
    assert float(error) >= 0.9 * bound  # the bound is attained on a dense grid: it is the right size
    if bits >= 3:
        assert quantization_error_bound(3.0, bits) < 0.51 * quantization_error_bound(3.0, bits - 1)


def test_quantization_keeps_zero_symmetry_and_is_idempotent() -> None:
    m = _spd(6, 1)
    q = quantize(m, 4)
    assert torch.equal(q, q.T)
    assert torch.equal(quantize(torch.zeros(3, dtype=DTYPE), 4), torch.zeros(3, dtype=DTYPE))
    assert float(quantize(torch.tensor([0.01, 1.0], dtype=DTYPE), 4)[0]) == 0.0
    assert torch.equal(quantize(q, 4), q)
    assert quantize(m, None) is m
    assert len(torch.unique(q)) <= 2**4 - 1


@pytest.mark.parametrize("bits", [0, -1])
def test_bits_below_one_are_rejected(bits: int) -> None:
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.ones(2), bits)
    with pytest.raises(ValueError, match="input_bits"):
        HardwareModel(input_bits=bits)
    with pytest.raises(ValueError, match="output_bits"):
        HardwareModel(output_bits=bits)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"analog_noise": -0.1}, "analog_noise"),
        ({"solver_dim": 0}, "solver_dim"),
        ({"time_constant": 0.0}, "time_constant"),
        ({"io_bandwidth": -1.0}, "io_bandwidth"),
    ],
)
def test_bad_hardware_is_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HardwareModel(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"dt": 0.0}, "dt"), ({"burn_in": -1.0}, "burn_in"), ({"duration": 0.0}, "duration"), ({"beta": 0}, "beta")],
)
def test_bad_schedule_is_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SolverSchedule(**kwargs)


def test_ideal_device_solves_and_inverts() -> None:
    m, hw = _spd(5, 2), HardwareModel()
    rhs = torch.randn(5, 3, dtype=DTYPE)
    exact = torch.linalg.solve(m, rhs)
    solution, report = device_solve(m, rhs, hw, LONG, _gen())
    assert float((solution - exact).abs().max()) < 1e-2 * float(exact.abs().max())
    assert report.max_std_error < 1e-2 * float(exact.abs().max())
    inverse, _ = device_inverse(m, hw, LONG, _gen())
    target = torch.linalg.inv(m)
    assert float(torch.linalg.matrix_norm(inverse - target) / torch.linalg.matrix_norm(target)) < 0.03


def test_solution_error_shrinks_with_bits() -> None:
    m = _spd(6, 3)
    rhs = torch.randn(6, 2, dtype=DTYPE)
    exact = torch.linalg.solve(m, rhs)
    errors = {}
    for bits in (3, 6, 12):
        hw = HardwareModel(input_bits=bits, output_bits=bits)
        solution, _ = device_solve(program_matrix(m, hw, _gen()), rhs, hw, LONG, _gen())
        errors[bits] = float((solution - exact).norm() / exact.norm())
    assert errors[12] < errors[6] < errors[3]
    assert errors[12] < 0.02


def test_blocking_drops_coupling_between_blocks() -> None:
    assert block_slices(10, None) == [slice(0, 10)]
    assert block_slices(10, 4) == [slice(0, 3), slice(3, 7), slice(7, 10)]
    m, hw = _spd(6, 4), HardwareModel(solver_dim=3)
    programmed = program_matrix(m, hw)
    block_diagonal = torch.block_diag(m[:3, :3], m[3:, 3:])
    assert torch.equal(programmed, block_diagonal)
    rhs = torch.randn(6, 2, dtype=DTYPE)
    solution, report = device_solve(programmed, rhs, hw, LONG, _gen())
    exact = torch.linalg.solve(block_diagonal, rhs)
    assert report.num_blocks == 2
    assert float((solution - exact).abs().max()) < 1e-2 * float(exact.abs().max())


def test_stabilization_keeps_a_quantized_nearly_singular_factor_definite() -> None:
    x = torch.randn(8, 3, dtype=DTYPE)
    m = x @ x.T + 1e-3 * torch.eye(8, dtype=DTYPE)  # rank 3 + small damping: quantization breaks definiteness
    hw = HardwareModel(input_bits=3, analog_noise=0.01)
    programmed = program_matrix(m, hw, _gen())
    assert float(torch.linalg.eigvalsh(programmed)[0]) > 0
    unstable = HardwareModel(input_bits=3, stabilize=False)
    with pytest.raises(ValueError, match="not positive definite"):
        device_solve(program_matrix(m, unstable), torch.ones(8, 1, dtype=DTYPE), unstable, LONG)


def test_io_time_counts_bits_over_bandwidth() -> None:
    m = _spd(4, 5)
    hw = HardwareModel(input_bits=8, output_bits=4, io_bandwidth=1000.0)
    short = SolverSchedule(num_samples=4)
    _, report = device_solve(program_matrix(m, hw), torch.ones(4, 3, dtype=DTYPE), hw, short)
    assert report.io_seconds == pytest.approx(((10 + 12) * 8 + 12 * 4) / 1000.0)
    _, report = device_inverse(program_matrix(m, hw), hw, short)
    assert report.io_seconds == pytest.approx(10 * (8 + 4) / 1000.0)
    assert report.device_seconds > 0
