"""Eigh and Cholesky backends against dense damped solves (float64), and the robust build path."""

from __future__ import annotations

import warnings

import pytest
import torch

from kronfac.linalg import CholeskyConfig, EighConfig, build_inverse
from kronfac.linalg.cholesky import pi_correction


def spd(n: int, seed: int, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank or 2 * n, generator=g, dtype=torch.float64)
    return x @ x.T / x.shape[1]


def vec_solve(matrix: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return torch.linalg.solve(matrix, grad.reshape(-1)).reshape(grad.shape)


@pytest.mark.parametrize("diagonal_a", [False, True])
@pytest.mark.parametrize("rank_deficient", [False, True])
def test_eigh_equals_dense_damped_solve(diagonal_a: bool, rank_deficient: bool) -> None:
    a = spd(5, 0, rank=2 if rank_deficient else None)
    a = a.diagonal().clone() if diagonal_a else a
    g = spd(3, 1, rank=1 if rank_deficient else None)
    grad = torch.randn(3, 5, dtype=torch.float64)
    damping = 1e-2
    dense_a = torch.diag(a) if diagonal_a else a
    expected = vec_solve(torch.kron(g, dense_a) + damping * torch.eye(15, dtype=torch.float64), grad)
    inverse = EighConfig().build(a, g, damping)
    torch.testing.assert_close(inverse.precondition(grad), expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("diagonal_a", [False, True])
@pytest.mark.parametrize("use_pi", [True, False])
def test_cholesky_equals_dense_factored_damped_solve(diagonal_a: bool, use_pi: bool) -> None:
    a = spd(4, 2)
    a = a.diagonal().clone() if diagonal_a else a
    g = spd(3, 3) * 7.0
    grad = torch.randn(3, 4, dtype=torch.float64)
    damping = 1e-2
    pi = pi_correction(a, g) if use_pi else 1.0
    dense_a = torch.diag(a) if diagonal_a else a
    eye_a, eye_g = torch.eye(4, dtype=torch.float64), torch.eye(3, dtype=torch.float64)
    root = damping**0.5
    matrix = torch.kron(g + root / pi * eye_g, dense_a + pi * root * eye_a)
    inverse = CholeskyConfig(pi_correction=use_pi).build(a, g, damping)
    torch.testing.assert_close(inverse.precondition(grad), vec_solve(matrix, grad), atol=1e-10, rtol=1e-10)
    if use_pi:
        assert pi == pytest.approx(
            (a.sum() / 4 / (g.trace() / 3)).sqrt().item()
            if diagonal_a
            else (a.trace() / 4 / (g.trace() / 3)).sqrt().item()
        )


def test_failed_float32_eigh_is_retried_in_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    real = torch.linalg.eigh

    def flaky(matrix: torch.Tensor, *args, **kwargs):
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated convergence failure")
        return real(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    a, g = spd(4, 0).float(), spd(3, 1).float()
    inverse = build_inverse(EighConfig(), a, g, 1e-3, previous=None, layer="fc")
    assert inverse is not None and inverse.tensors()["q_g"].dtype == torch.float64
    grad = torch.randn(3, 4)
    assert inverse.precondition(grad).dtype == torch.float32


def test_eigh_failure_keeps_last_good_inverse_with_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    a, g = spd(4, 0), spd(3, 1)
    good = build_inverse(EighConfig(), a, g, 1e-3, previous=None, layer="fc")

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("simulated failure")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    with pytest.warns(RuntimeWarning, match="'fc'.*keeping the last good inverse"):
        kept = build_inverse(EighConfig(), a, g, 1e-3, previous=good, layer="fc")
    assert kept is good


def test_non_finite_factor_is_not_accepted_as_inverse() -> None:
    a, g = spd(4, 0), spd(3, 1)
    a[0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert build_inverse(CholeskyConfig(), a, g, 1e-3, previous=None, layer="fc") is None
    assert caught


def test_bad_config_values() -> None:
    with pytest.raises(ValueError, match="min_eigenvalue"):
        EighConfig(min_eigenvalue=-1.0)


@pytest.mark.parametrize("diagonal_a", [False, True])
def test_eigh_padded_products_equal_the_unpadded_formula(diagonal_a: bool) -> None:
    """Wide layers run their products on bases padded to a multiple of 8; the result is the unpadded formula."""
    a, g = spd(130, 0), spd(129, 1)
    a = a.diagonal().clone() if diagonal_a else a
    inverse = EighConfig().build(a, g, 1e-2)
    assert inverse.q_g.shape == (129, 129) and inverse.tensors()["q_g"].shape == (129, 129)
    grad = torch.randn(129, 130, dtype=torch.float64)
    scale = 1.0 / (torch.outer(inverse.s_g, inverse.s_a) + 1e-2)
    if diagonal_a:
        expected = inverse.q_g @ ((inverse.q_g.T @ grad) * scale)
    else:
        expected = inverse.q_g @ ((inverse.q_g.T @ grad @ inverse.q_a) * scale) @ inverse.q_a.T
    torch.testing.assert_close(inverse.precondition(grad), expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(inverse.q_g @ torch.diag(inverse.s_g) @ inverse.q_g.T, g, atol=1e-12, rtol=0)


def test_cholesky_batch_equals_one_layer_builds() -> None:
    """A refresh of many layers stacks factors of equal shape (A of one layer may share a batch with G of another);
    every inverse equals the one-layer build to round-off, diagonal A and unequal shapes included."""
    from kronfac.linalg import InverseRequest, build_inverses

    shapes = [(5, 3), (5, 3), (3, 5), (4, 4), (6, 2)]
    requests = [
        InverseRequest(spd(d_a, i), spd(d_g, 10 + i) * (i + 1), 1e-2 * (i + 1), None, f"l{i}")
        for i, (d_a, d_g) in enumerate(shapes)
    ]
    requests.append(InverseRequest(spd(4, 20).diagonal().clone(), spd(3, 21), 3e-3, None, "emb"))
    batched = build_inverses(CholeskyConfig(), requests)
    for request, inverse in zip(requests, batched):
        alone = CholeskyConfig().build(request.a_factor, request.g_factor, request.damping)
        assert inverse is not None
        for key, tensor in alone.tensors().items():
            torch.testing.assert_close(inverse.tensors()[key], tensor, atol=1e-12, rtol=1e-12)


def test_cholesky_batch_member_that_fails_takes_the_one_layer_path() -> None:
    """An indefinite factor in a batch fails alone: the others keep their batched inverse, the failing layer is
    retried on its own and, failing again, keeps its previous inverse with a warning naming it."""
    from kronfac.linalg import InverseRequest, build_inverses

    good = [InverseRequest(spd(4, i), spd(3, 5 + i), 1e-3, None, f"ok{i}") for i in range(2)]
    bad_a = spd(4, 9)
    bad_a[0, 0] = -10.0
    previous = CholeskyConfig().build(spd(4, 9), spd(3, 9), 1e-3)
    bad = InverseRequest(bad_a, spd(3, 8), 1e-3, previous, "broken")
    with pytest.warns(RuntimeWarning, match="'broken'.*keeping the last good inverse"):
        out = build_inverses(CholeskyConfig(), [good[0], bad, good[1]])
    assert out[1] is previous
    for request, inverse in zip(good, (out[0], out[2])):
        expected = CholeskyConfig().build(request.a_factor, request.g_factor, request.damping)
        torch.testing.assert_close(inverse.tensors()["a_inv"], expected.tensors()["a_inv"], atol=1e-12, rtol=1e-12)
