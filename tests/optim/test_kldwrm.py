"""KLD-WRM (Puiu 2022) as a K-FAC correction: SO against the dense wake minimiser, Q/QE against their definitions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kronfac
from reference import ggn_block_mse, grad_matrix_from


def _mse(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (model(x) - t).square().sum(-1).mean()


def _theta(model: nn.Module) -> torch.Tensor:
    """Row-major vec of the ``[W | b]`` matrix of the first layer (kronfac's ordering)."""
    layer = model[0]
    grads = {"0.weight": layer.weight.detach(), "0.bias": layer.bias.detach()}
    return grad_matrix_from(layer, grads, "0").reshape(-1).clone()


def _grad(model: nn.Module) -> torch.Tensor:
    layer = model[0]
    return grad_matrix_from(layer, {"0.weight": layer.weight.grad, "0.bias": layer.bias.grad}, "0").reshape(-1)


def _ggn(x: torch.Tensor) -> torch.Tensor:
    """Exact GGN of the mean MSE of a linear layer on ``x`` (weight-independent), on a fresh module so that the
    optimizer's hooks do not see these forward passes."""
    return ggn_block_mse(nn.Sequential(nn.Linear(3, 2)), "0", x, normaliser=x.shape[0])


def _batches(steps: int, n: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(n, 3, generator=g), torch.randn(n, 2, generator=g)) for _ in range(steps)]


def _linear_mse_opt(model: nn.Module, correction: kronfac.KLDWRM, rho: float, damping: float, lr) -> kronfac.KFAC:
    return kronfac.KFAC(
        model,
        lr=lr,
        momentum=0.0,
        damping=damping,
        factor_decay=rho,
        inverse_every=1,
        inverse=kronfac.EighConfig(),  # the dense references below use K-FAC's exact damping
        kl_clip=None,
        fisher_type="type2",
        loss="mse",
        factor_dtype=torch.float64,
        correction=correction,
    )


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 6), nn.Tanh(), nn.Linear(6, 3)
    )


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 6) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(10, 1, 6, 6, generator=g), torch.randint(0, 3, (10,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("variant", ["so", "q", "qe"])
def test_rho_zero_so_equals_kfac_and_every_variant_differs_with_rho(variant: str) -> None:
    reference, model = _classifier(), _classifier()
    options = {"lr": 0.1, "damping": 1e-2, "inverse_every": 2, "kl_clip": 1e-2}
    _train(reference, kronfac.KFAC(reference, **options))
    _train(
        model, kronfac.KFAC(model, correction=kronfac.KLDWRM(variant, rho=0.0 if variant == "so" else 0.5), **options)
    )
    same = all(torch.equal(p, q) for p, q in zip(reference.parameters(), model.parameters()))
    assert same == (variant == "so")


def test_so_step_is_the_dense_minimiser_of_the_quadratic_wake_objective() -> None:
    """θ_{k+1} = argmin g_k^T (θ - θ_k) + (1/lr_k) Σ_j w_kj ½ (θ - θ_j)^T (F_j + δI) (θ - θ_j), with exact F_j
    from torch.func, EMA weights w_kj of decay ρ and a changing learning rate."""
    torch.set_default_dtype(torch.float64)
    try:
        rho, damping, steps = 0.6, 0.05, 6
        model = nn.Sequential(nn.Linear(3, 2))
        schedule = lambda k: 0.2 / (1 + 0.3 * k)  # noqa: E731 - the ratio λ_k/λ_{k-1} must matter
        opt = _linear_mse_opt(model, kronfac.KLDWRM("so"), rho, damping, schedule)
        thetas, fishers = [], []
        for k, (x, t) in enumerate(_batches(steps)):
            thetas.append(_theta(model))
            fishers.append(_ggn(x))
            opt.zero_grad()
            _mse(model, x, t).backward()
            g_k = _grad(model).clone()
            opt.step()
            w = [rho**k] + [(1 - rho) * rho ** (k - j) for j in range(1, k + 1)]
            eye = torch.eye(g_k.numel())
            hessian = sum(wj * (f + damping * eye) for wj, f in zip(w, fishers))
            anchor = sum(wj * (f + damping * eye) @ th for wj, f, th in zip(w, fishers, thetas))
            expected = torch.linalg.solve(hessian, anchor - schedule(k) * g_k)
            torch.testing.assert_close(_theta(model), expected, rtol=1e-9, atol=1e-10)
        opt.close()
    finally:
        torch.set_default_dtype(torch.float32)


def test_q_preconditions_with_augmented_factors() -> None:
    """Q with ρ = 0: u = ((Ḡ + lr G_k) ⊗ (Ā + lr A_k) + δI)^{-1} vec(g_k), K-FAC's exact damping."""
    torch.set_default_dtype(torch.float64)
    try:
        lr, damping = 0.3, 0.05
        model = nn.Sequential(nn.Linear(3, 2))
        correction = kronfac.KLDWRM("q", rho=0.0)
        opt = _linear_mse_opt(model, correction, 0.7, damping, lr)
        for x, t in _batches(3):
            before = _theta(model)
            opt.zero_grad()
            _mse(model, x, t).backward()
            g_k = _grad(model).clone()
            opt.step()
        block = opt.layers["0"].block
        a_batch, g_batch = correction.batch["0"]
        matrix = torch.kron(block.g_factor + lr * g_batch, block.a_factor + lr * a_batch)
        expected = torch.linalg.solve(matrix + damping * torch.eye(g_k.numel()), g_k)
        torch.testing.assert_close((before - _theta(model)) / lr, expected, rtol=1e-9, atol=1e-10)
    finally:
        torch.set_default_dtype(torch.float32)


def test_qe_inner_steps_reach_the_exact_wake_minimiser() -> None:
    """For a linear model with MSE the KL terms are exactly quadratic, so QE's inner gradient steps converge to
    argmin g^T s + ½ s^T F_k s + λ Σ_j w_j [½ (θ-θ_j)^T F_k (θ-θ_j) + δ/2 ||θ-θ_j||²] over the stored networks."""
    torch.set_default_dtype(torch.float64)
    try:
        rho, damping, lr, networks = 0.5, 0.1, 0.2, 3
        model = nn.Sequential(nn.Linear(3, 2))
        correction = kronfac.KLDWRM("qe", inner_steps=400, inner_lr=0.2, networks=networks)
        opt = _linear_mse_opt(model, correction, rho, damping, lr)
        history: list[torch.Tensor] = []
        for k, (x, t) in enumerate(_batches(4)):
            theta_k = _theta(model)
            history.insert(0, theta_k)
            opt.zero_grad()
            _mse(model, x, t).backward()
            g_k = _grad(model).clone()
            opt.step()
            stored = history[:networks]
            m = len(stored)
            w = [(1 - rho) * rho**j for j in range(m - 1)] + [rho ** (m - 1)]
            f = _ggn(x)
            eye = torch.eye(g_k.numel())
            lam = 1.0 / lr
            hessian = f + lam * (f + damping * eye)
            rhs = f @ theta_k - g_k + lam * sum(wj * (f + damping * eye) @ th for wj, th in zip(w, stored))
            expected = torch.linalg.solve(hessian, rhs)
            torch.testing.assert_close(_theta(model), expected, rtol=1e-7, atol=1e-8, msg=f"step {k}")
        assert correction.wake is not None and len(correction.wake.snapshots) == networks
        correction.close()
    finally:
        torch.set_default_dtype(torch.float32)


def test_qe_forward_passes_leave_the_curvature_statistics_alone() -> None:
    model = _classifier()
    opt = kronfac.KFAC(model, lr=0.1, damping=1e-2, correction=kronfac.KLDWRM("qe", inner_steps=3))
    _train(model, opt, steps=2)
    assert all(not layer.block.has_pending() for layer in opt.layers.values())


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"variant": "x"}, "variant"),
        ({"rho": 1.0}, "rho"),
        ({"rho": -0.1}, "rho"),
        ({"inner_steps": -1}, "inner_steps"),
        ({"inner_lr": 0.0}, "inner_lr"),
        ({"networks": 0}, "networks"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        kronfac.KLDWRM(**kwargs)


def test_correction_must_be_a_rule_and_is_bound_once() -> None:
    with pytest.raises(ValueError, match="correction"):
        kronfac.KFAC(_classifier(), correction="so")
    rule = kronfac.KLDWRM("so")
    kronfac.KFAC(_classifier(), correction=rule)
    with pytest.raises(ValueError, match="correction"):
        kronfac.KFAC(_classifier(), correction=rule)


def test_preconditioner_takes_the_correction() -> None:
    model = _classifier()
    pre = kronfac.KFACPreconditioner(model, damping=1e-2, correction=kronfac.KLDWRM("q", rho=0.3))
    sgd = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(10, 1, 6, 6), torch.randint(0, 3, (10,))
    for _ in range(3):
        sgd.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        pre.step()
        assert pre.num_skipped == 0
        sgd.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
