"""Exact OU simulator of the thermodynamic solver: statistics against closed forms, determinism, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from kronfac.linalg.thermodynamic import check_spd, ou_transition, simulate_ou

DTYPE = torch.float64


def _spd(d: int, seed: int, shift: float = 0.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(d, d, generator=g, dtype=DTYPE)
    return x @ x.T / d + shift * torch.eye(d, dtype=DTYPE)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_transition_moments_match_closed_form() -> None:
    m, d, k, elapsed, beta = _spd(4, 1), 4, 40_000, 0.3, 2.0
    c = torch.randn(d, dtype=DTYPE)
    x0 = torch.randn(d, dtype=DTYPE)
    state = x0.unsqueeze(1).expand(d, k).contiguous()
    samples = ou_transition(m, c.unsqueeze(1), state, elapsed, beta=beta, generator=_gen())
    b = torch.linalg.solve(m, c)
    mean = b + torch.linalg.matrix_exp(-m * elapsed) @ (x0 - b)
    eye = torch.eye(d, dtype=DTYPE)
    cov = torch.linalg.solve(m, eye - torch.linalg.matrix_exp(-2 * m * elapsed)) / beta
    centred = samples - samples.mean(dim=1, keepdim=True)
    torch.testing.assert_close(samples.mean(dim=1), mean, atol=0.01, rtol=0)
    torch.testing.assert_close(centred @ centred.T / (k - 1), cov, atol=0.01, rtol=0)


def test_time_average_from_rest_matches_closed_form_transient() -> None:
    # Without burn-in the expected time average still remembers x(0) = 0: E[x(j dt)] = b - e^{-M j dt} b.
    m, d, dt, n = _spd(3, 2), 3, 0.05, 150  # 150 samples span three chunks of the batched recurrence
    c = torch.randn(d, 1, dtype=DTYPE)
    result = simulate_ou(m, c.expand(d, 4000), dt=dt, num_samples=n, beta=50.0, generator=_gen())
    b = torch.linalg.solve(m, c).squeeze(1)
    expected = sum(b - torch.linalg.matrix_exp(-m * dt * j) @ b for j in range(1, n + 1)) / n
    torch.testing.assert_close(result.estimate.mean(dim=1), expected, atol=3e-3, rtol=0)


def test_solve_error_shrinks_like_one_over_sqrt_duration() -> None:
    m = _spd(4, 3)
    c = torch.randn(4, 1, dtype=DTYPE)
    exact = torch.linalg.solve(m, c)
    durations = [8.0, 32.0, 128.0, 512.0]
    rms = []
    for i, duration in enumerate(durations):
        result = simulate_ou(
            m,
            c.expand(4, 256),
            dt=0.5,
            burn_in=20.0,
            duration=duration,
            time_unit="relaxation",
            generator=_gen(i),
        )
        rms.append(float((result.estimate - exact).pow(2).mean().sqrt()))
    slope = torch.linalg.lstsq(
        torch.stack([torch.log(torch.tensor(durations)), torch.ones(4)], dim=1),
        torch.log(torch.tensor(rms)).unsqueeze(1),
    ).solution[0, 0]
    assert -0.6 < float(slope) < -0.4, (slope, rms)


def test_solve_converges_to_exact_and_reports_calibrated_error() -> None:
    m = _spd(5, 4)
    c = torch.randn(5, 64, dtype=DTYPE)
    exact = torch.linalg.solve(m, c)
    result = simulate_ou(
        m, c, dt=0.5, burn_in=20.0, duration=2000.0, time_unit="relaxation", beta=100.0, generator=_gen()
    )
    error = result.estimate - exact
    assert float(error.abs().max()) < 0.02 * float(exact.abs().max())
    # The batch-means standard error is the right size: actual RMS error within a factor 2 of the reported one.
    ratio = float(error.pow(2).mean().sqrt() / result.std_error.pow(2).mean().sqrt())
    assert 0.5 < ratio < 2.0
    assert result.elapsed_relaxation_times == pytest.approx(2020.0)
    assert result.elapsed_time_constants == pytest.approx(2020.0 * result.relaxation_time / result.time_constant)


@pytest.mark.parametrize("beta", [0.5, 4.0])
def test_inverse_mode_covariance_converges_to_scaled_inverse(beta: float) -> None:
    m = _spd(4, 5)
    target = torch.linalg.inv(m) / beta
    errors = []
    for samples in (64, 1024):
        result = simulate_ou(
            m,
            mode="inverse",
            dt=1.0,
            burn_in=10.0,
            num_samples=samples,
            num_chains=64,
            beta=beta,
            time_unit="relaxation",
            generator=_gen(samples),
        )
        covariance = result.estimate / beta
        errors.append(float(torch.linalg.matrix_norm(covariance - target) / torch.linalg.matrix_norm(target)))
    assert errors[1] < 0.03
    assert errors[1] < errors[0] / 2  # 16x the samples: about 4x smaller error


def test_deterministic_for_a_seed() -> None:
    m, c = _spd(3, 6), torch.randn(3, 2, dtype=DTYPE)
    kwargs = {"dt": 0.2, "burn_in": 1.0, "num_samples": 100}
    first = simulate_ou(m, c, generator=_gen(7), **kwargs)
    second = simulate_ou(m, c, generator=_gen(7), **kwargs)
    other = simulate_ou(m, c, generator=_gen(8), **kwargs)
    assert torch.equal(first.estimate, second.estimate)
    assert torch.equal(first.std_error, second.std_error)
    assert not torch.equal(first.estimate, other.estimate)


def test_vector_rhs_keeps_its_shape() -> None:
    m = _spd(3, 9)
    result = simulate_ou(m, torch.ones(3, dtype=DTYPE), dt=0.5, num_samples=10, generator=_gen())
    assert result.estimate.shape == (3,) and result.std_error.shape == (3,)


@pytest.mark.parametrize(
    ("matrix", "match"),
    [
        (torch.tensor([[2.0, 1.0], [0.0, 2.0]], dtype=DTYPE), "not symmetric"),
        (torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=DTYPE), "not positive definite"),
        (torch.zeros(2, 3, dtype=DTYPE), "square"),
        (torch.tensor([[math.nan]], dtype=DTYPE), "non-finite"),
    ],
)
def test_bad_matrix_is_rejected(matrix: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_spd(matrix)
    with pytest.raises(ValueError, match=match):
        simulate_ou(matrix, torch.ones(matrix.shape[0], dtype=DTYPE), dt=0.1, num_samples=4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dt": 0.0, "num_samples": 4}, "dt"),
        ({"dt": -1.0, "num_samples": 4}, "dt"),
        ({"dt": 0.1, "num_samples": 4, "beta": 0.0}, "beta"),
        ({"dt": 0.1, "num_samples": 4, "burn_in": -1.0}, "burn_in"),
        ({"dt": 0.1}, "exactly one"),
        ({"dt": 0.1, "num_samples": 4, "duration": 1.0}, "exactly one"),
        ({"dt": 0.1, "num_samples": 1}, "num_samples"),
        ({"dt": 0.1, "num_samples": 4, "num_batches": 1}, "num_batches"),
        ({"dt": 0.1, "num_samples": 4, "time_unit": "seconds"}, "time_unit"),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        simulate_ou(_spd(2, 0), torch.ones(2, dtype=DTYPE), **kwargs)


def test_mode_and_rhs_must_agree() -> None:
    m = _spd(2, 0)
    with pytest.raises(ValueError, match="right-hand side"):
        simulate_ou(m, dt=0.1, num_samples=4)
    with pytest.raises(ValueError, match="no rhs"):
        simulate_ou(m, torch.ones(2, dtype=DTYPE), mode="inverse", dt=0.1, num_samples=4)
    with pytest.raises(ValueError, match="shape"):
        simulate_ou(m, torch.ones(3, dtype=DTYPE), dt=0.1, num_samples=4)
    with pytest.raises(ValueError, match="elapsed"):
        ou_transition(m, torch.ones(2, dtype=DTYPE), torch.zeros(2, dtype=DTYPE), 0.0)
