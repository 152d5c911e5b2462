"""The warm eigenbasis refresh of ``EighConfig(refresh="warm")``: convergence to ``torch.linalg.eigh`` (float64),
the residual fallback, the full-refresh schedule, batching over equal shapes, and K-FAC with it."""

from __future__ import annotations

import io
import itertools
import statistics

import pytest
import torch
from torch import nn

import kronfac
from kronfac.bench import METHODS, TASKS
from kronfac.bench.runner import run_one
from kronfac.linalg import EighConfig, build_inverse
from kronfac.linalg.base import InverseRequest, build_inverses, symmetrize
from kronfac.linalg.eigh import EighInverse, refine_eigenbasis

F64 = torch.float64


def spectrum_matrix(n: int, seed: int, ratio: float = 0.6) -> torch.Tensor:
    """SPD matrix with eigenvalues ratio^k (well separated, so orthogonal iteration converges at rate ``ratio``)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return (q * ratio ** torch.arange(n, dtype=F64)) @ q.T


def perturbed(matrix: torch.Tensor, seed: int, size: float = 1e-2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(matrix.shape, generator=g, dtype=F64)
    return matrix + size * (noise + noise.T) / 2


def vec_solve(a: torch.Tensor, g: torch.Tensor, damping: float, grad: torch.Tensor) -> torch.Tensor:
    matrix = torch.kron(g, a) + damping * torch.eye(grad.numel(), dtype=F64)
    return torch.linalg.solve(matrix, grad.reshape(-1)).reshape(grad.shape)


def test_refine_converges_to_eigh_as_iterations_grow() -> None:
    matrix = spectrum_matrix(8, 0)
    basis = torch.linalg.eigh(perturbed(matrix, 1))[1]
    s_ref, q_ref = torch.linalg.eigh(matrix)
    errors = []
    for iters in (0, 1, 4, 16, 64, 256):
        q, s, residual = refine_eigenbasis(matrix, basis, iters)
        errors.append(float((s.sort().values - s_ref).abs().max()))
        if iters >= 1:
            assert torch.all(s[:-1] >= s[1:])  # descending
        assert float(residual) == pytest.approx(
            float(torch.linalg.matrix_norm(matrix @ q - q * s) / torch.linalg.matrix_norm(matrix))
        )
    assert all(later <= earlier * 1.01 for earlier, later in itertools.pairwise(errors))
    assert errors[-1] < 1e-13
    # the basis: each vector equals eigh's up to its sign (descending here, ascending there)
    overlap = (q.T @ q_ref.flip(-1)).diagonal().abs()
    torch.testing.assert_close(overlap, torch.ones(8, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(q.T @ q, torch.eye(8, dtype=F64), atol=1e-13, rtol=0)
    assert float(residual) < 1e-13


def test_refine_is_batched() -> None:
    matrices = torch.stack([spectrum_matrix(5, seed) for seed in range(3)])
    bases = torch.stack([torch.linalg.eigh(perturbed(m, 7))[1] for m in matrices])
    q, s, residual = refine_eigenbasis(matrices, bases, 3)
    for k in range(3):
        q1, s1, r1 = refine_eigenbasis(matrices[k], bases[k], 3)
        torch.testing.assert_close(q[k], q1, atol=1e-13, rtol=0)
        torch.testing.assert_close(s[k], s1, atol=1e-13, rtol=0)
        assert float(residual[k]) == pytest.approx(float(r1), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("diagonal_a", [False, True])
def test_warm_preconditioner_converges_to_the_exact_solve(diagonal_a: bool) -> None:
    a, g = spectrum_matrix(6, 2), spectrum_matrix(4, 3, ratio=0.5)
    a = a.diagonal().clone() if diagonal_a else a
    old_a = a + 0.01 if diagonal_a else perturbed(a, 4)
    previous = EighConfig().build(old_a, perturbed(g, 5), 1e-3)
    grad = torch.randn(4, 6, dtype=F64, generator=torch.Generator().manual_seed(6))
    expected = vec_solve(torch.diag(a) if diagonal_a else a, g, 1e-3, grad)
    errors = []
    for iters in (1, 8, 64, 400):
        config = EighConfig(refresh="warm", warm_iters=iters, residual_tol=float("inf"))
        inverse = config.build_from(a, g, 1e-3, previous)
        assert int(inverse.age) == 1
        errors.append(float((inverse.precondition(grad) - expected).abs().max() / expected.abs().max()))
    assert errors[0] > 1e-6  # one step from a perturbed basis is not exact ...
    assert errors[-1] < 1e-10  # ... and many converge to it


def test_residual_test_falls_back_to_a_full_eigh() -> None:
    a, g = spectrum_matrix(6, 0), spectrum_matrix(5, 1)
    q_a, _ = torch.linalg.qr(torch.randn(6, 6, dtype=F64, generator=torch.Generator().manual_seed(2)))
    q_g, _ = torch.linalg.qr(torch.randn(5, 5, dtype=F64, generator=torch.Generator().manual_seed(3)))
    far = EighInverse(q_a, torch.ones(6, dtype=F64), q_g, torch.ones(5, dtype=F64), torch.tensor(1e-3, dtype=F64))
    exact = EighConfig().build(a, g, 1e-3)
    checked = EighConfig(refresh="warm", warm_iters=1, residual_tol=0.05).build_from(a, g, 1e-3, far)
    assert torch.equal(checked.q_a, exact.q_a) and torch.equal(checked.q_g, exact.q_g)
    assert torch.equal(checked.s_a, exact.s_a) and torch.equal(checked.s_g, exact.s_g)
    assert int(checked.age) == 1  # a fallback is not a scheduled full refresh
    unchecked = EighConfig(refresh="warm", warm_iters=1, residual_tol=float("inf")).build_from(a, g, 1e-3, far)
    assert not torch.equal(unchecked.q_a, exact.q_a)
    # zero iterations keep the basis and re-estimate the eigenvalues as Rayleigh quotients
    kept = EighConfig(refresh="warm", warm_iters=0, residual_tol=float("inf")).build_from(a, g, 1e-3, far)
    assert torch.equal(kept.q_a, q_a)
    torch.testing.assert_close(kept.s_a, (q_a * (a @ q_a)).sum(0))


def test_full_refresh_schedule() -> None:
    a, g = spectrum_matrix(5, 0), spectrum_matrix(4, 1)
    config = EighConfig(refresh="warm", full_every=3, residual_tol=float("inf"))
    previous, ages = None, []
    for step in range(7):
        inverse = build_inverse(config, perturbed(a, step), perturbed(g, 10 + step), 1e-3, previous=previous, layer="x")
        assert isinstance(inverse, EighInverse)
        exact = EighConfig().build(symmetrize(perturbed(a, step)), symmetrize(perturbed(g, 10 + step)), 1e-3)
        assert torch.equal(inverse.q_a, exact.q_a) == (int(inverse.age) == 0)
        ages.append(int(inverse.age))
        previous = inverse
    assert ages == [0, 1, 2, 0, 1, 2, 0]
    always = EighConfig(refresh="warm", full_every=1)
    inverse = build_inverse(always, a, g, 1e-3, previous=previous, layer="x")
    assert inverse is not None and torch.equal(inverse.q_a, EighConfig().build(symmetrize(a), g, 1e-3).q_a)


def test_batched_refresh_equals_one_layer_at_a_time() -> None:
    config = EighConfig(refresh="warm", warm_iters=2, residual_tol=float("inf"))
    requests = []
    for k in range(3):  # two layers of equal shape, one of another
        d_a, d_g = (6, 4) if k < 2 else (3, 4)
        a, g = spectrum_matrix(d_a, k), spectrum_matrix(d_g, 10 + k)
        previous = EighConfig().build(perturbed(a, 20 + k), perturbed(g, 30 + k), 1e-3)
        requests.append(InverseRequest(a, g, 1e-3, previous, f"layer{k}"))
    batched = build_inverses(config, requests)
    for request, inverse in zip(requests, batched):
        alone = build_inverse(
            config, request.a_factor, request.g_factor, 1e-3, previous=request.previous, layer=request.layer
        )
        assert isinstance(inverse, EighInverse) and isinstance(alone, EighInverse)
        for name, value in alone.tensors().items():
            torch.testing.assert_close(inverse.tensors()[name], value, atol=1e-12, rtol=0)


def test_warm_config_validation() -> None:
    for kwargs, name in (
        ({"refresh": "lazy"}, "refresh"),
        ({"warm_iters": -1}, "warm_iters"),
        ({"full_every": 0}, "full_every"),
        ({"residual_tol": -1.0}, "residual_tol"),
    ):
        with pytest.raises(ValueError, match=name):
            EighConfig(**kwargs)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Linear(16, 3))


def _train(model: nn.Module, opt: kronfac.KFAC, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_kfac_with_warm_refresh_resumes_bit_identically() -> None:
    def build() -> tuple[nn.Module, kronfac.KFAC]:
        torch.manual_seed(0)
        model = _mlp()
        config = kronfac.EighConfig(refresh="warm", full_every=3)
        return model, kronfac.KFAC(model, lr=0.05, damping=1e-2, inverse_every=2, inverse=config)

    model, opt = build()
    _train(model, opt, range(13))
    assert {int(layer.block.inverse.age) for layer in opt.layers.values()} == {0}  # 7 refreshes: 0,1,2,0,1,2,0
    model, opt = build()
    _train(model, opt, range(9))  # 5 refreshes: the next is warm, from the saved bases
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    _train(model, opt, range(9, 17))
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model, resumed = build()
    resumed_model.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["opt"])
    _train(resumed_model, resumed, range(9, 17))
    for (name, p), q in zip(model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(p, q), name


def test_kfac_with_warm_refresh_trains_like_exact_on_a_bench_task() -> None:
    """mlp-digits with the bench settings: the final test accuracy of the warm refresh is within the seed noise
    of the exact one (three seeds)."""
    task, method = TASKS["mlp-digits"], METHODS["kfac"]
    accuracy: dict[str, list[float]] = {}
    for name, config in (("exact", kronfac.EighConfig()), ("warm", kronfac.EighConfig(refresh="warm"))):
        accuracy[name] = [
            run_one(task, method, 0.03, seed, 100, extra={"damping": 1e-3, "inverse": config}).final["accuracy"]
            for seed in range(3)
        ]
    noise = max(statistics.stdev(accuracy["exact"]), statistics.stdev(accuracy["warm"]), 0.005)
    gap = statistics.fmean(accuracy["warm"]) - statistics.fmean(accuracy["exact"])
    assert gap >= -3 * noise, accuracy
