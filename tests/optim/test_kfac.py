"""K-FAC specifics: the step against a dense solve, schedules, hooks, fallbacks, AMP, the preconditioner."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import kronfac
from reference import grad_matrix_from, kron_block


def cross_entropy_step(model: nn.Module, opt, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    out = model(x)
    nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
    opt.step()


MODELS = {
    "linear": (lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), (6, 4), "0"),
    "conv": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(48, 3)), (6, 2, 4, 4), "0"),
    "embedding": (lambda: nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(8, 3)), None, "0"),
}


@pytest.mark.parametrize("inverse", ["eigh", "cholesky"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_step_equals_dense_damped_solve(kind: str, inverse: str) -> None:
    torch.set_default_dtype(torch.float64)
    try:
        build, shape, layer = MODELS[kind]
        model = build()
        x = torch.randint(0, 7, (6, 2)) if shape is None else torch.randn(shape)
        y = torch.randint(0, 3, (6,))
        config = kronfac.EighConfig() if inverse == "eigh" else kronfac.CholeskyConfig()
        lr, damping = 0.3, 0.05
        opt = kronfac.KFAC(
            model, lr=lr, momentum=0.0, damping=damping, kl_clip=None, inverse=config, factor_dtype=torch.float64
        )
        module = model.get_submodule(layer)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        cross_entropy_step(model, opt, x, y)
        block = opt.layers[layer].block
        grads = {f"{layer}.{n}": p.grad for n, p in module.named_parameters()}
        grad = grad_matrix_from(module, grads, layer)
        a = torch.diag(block.a_factor) if block.a_factor.ndim == 1 else block.a_factor
        g = block.g_factor
        if inverse == "eigh":
            matrix = kron_block(a, g) + damping * torch.eye(grad.numel())
        else:
            pi = kronfac.linalg.cholesky.pi_correction(block.a_factor, g)
            root = damping**0.5
            matrix = torch.kron(g + root / pi * torch.eye(g.shape[0]), a + pi * root * torch.eye(a.shape[0]))
        expected = torch.linalg.solve(matrix, grad.reshape(-1)).reshape(grad.shape)
        after = {n: p.detach() for n, p in model.named_parameters()}
        delta = {
            f"{layer}.{n}": (after[f"{layer}.{n}"] - before[f"{layer}.{n}"]) / -lr for n, _ in module.named_parameters()
        }
        torch.testing.assert_close(grad_matrix_from(module, delta, layer), expected, atol=1e-9, rtol=1e-7)
    finally:
        torch.set_default_dtype(torch.float32)


def test_hooks_exist_only_on_curvature_steps_and_close_removes_them() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    opt = kronfac.KFAC(model, factor_every=3, inverse_every=3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    installed = []
    for _ in range(6):
        installed.append(bool(model[0]._forward_hooks))
        cross_entropy_step(model, opt, x, y)
    assert installed == [True, False, False, True, False, False]
    opt.close()
    assert not model[0]._forward_hooks and not model[2]._forward_hooks


def test_unsupported_modules_are_listed_once_and_get_first_order_updates() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    with pytest.warns(UserWarning, match=r"\['1'\].*first-order") as record:
        opt = kronfac.KFAC(model, lr=0.1, momentum=0.0, kl_clip=None)
    assert len([w for w in record if "first-order" in str(w.message)]) == 1
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    before = model[1].weight.detach().clone()
    cross_entropy_step(model, opt, x, y)
    torch.testing.assert_close(model[1].weight.detach(), before - 0.1 * model[1].weight.grad)


def test_grouped_conv_falls_back_with_a_warning() -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="groups=2"):
        opt = kronfac.KFAC(model)
    assert list(opt.layers) == ["2"]


def test_callable_lr_and_damping_and_their_checkpoint() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    opt = kronfac.KFAC(model, lr=lambda step: 0.1 / (1 + step), damping=lambda step: 1e-2 * 0.9**step)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    for _ in range(3):
        cross_entropy_step(model, opt, x, y)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)  # lambdas are not pickled
    buffer.seek(0)
    opt2 = kronfac.KFAC(model, lr=lambda step: 0.1 / (1 + step), damping=1e-2)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    assert callable(opt2.param_groups[0]["lr"]) and opt2.steps == 3


def test_kl_clip_bounds_the_step() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    lr, kappa = 10.0, 1e-4
    opt = kronfac.KFAC(model, lr=lr, momentum=0.0, damping=1e-2, kl_clip=kappa)
    before = model[0].weight.detach().clone()
    cross_entropy_step(model, opt, x, y)
    grad = torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], 1)
    update = -(model[0].weight.detach() - before) / lr
    bias_update = opt.layers["0"].block.precondition(grad)
    nu = update.norm() / bias_update[:, :-1].norm()
    assert nu < 1
    torch.testing.assert_close(lr**2 * (nu * bias_update * grad).sum() * nu, torch.tensor(kappa), rtol=1e-4, atol=0)


def test_preconditioner_with_sgd_equals_kfac() -> None:
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    results = []
    for use_pre in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        if use_pre:
            pre = kronfac.KFACPreconditioner(model, damping=1e-2, inverse_every=2, kl_clip=1e-2, lr=0.1)
            sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            for _ in range(5):
                sgd.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                pre.step()
                sgd.step()
        else:
            opt = kronfac.KFAC(model, lr=0.1, momentum=0.9, damping=1e-2, inverse_every=2, kl_clip=1e-2)
            for _ in range(5):
                cross_entropy_step(model, opt, x, y)
        results.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*results):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)


def test_sequence_inputs_and_loss_average() -> None:
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 10))
    x = torch.randint(0, 10, (4, 7))
    opts = {}
    for average in ("batch", "batch+sequence"):
        opt = kronfac.KFAC(model, lr=0.0, loss_average=average)
        cross_entropy_step(model, opt, x, x)
        opts[average] = opt.layers["1"].block.g_factor
        opt.close()
    # Same gradients (the loss is the token mean either way); batch+sequence scales G by the 7 tokens per sample.
    torch.testing.assert_close(opts["batch+sequence"], 7 * opts["batch"])


def test_autocast_bfloat16_and_grad_scaler_give_unscaled_factors() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    plain = kronfac.KFAC(model, lr=0.0)
    cross_entropy_step(model, plain, x, y)
    reference = plain.layers["2"].block.g_factor.clone()
    plain.close()

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt = kronfac.KFAC(model, lr=0.0, grad_scaler=scaler)
    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    torch.testing.assert_close(opt.layers["2"].block.g_factor, reference, rtol=1e-5, atol=1e-7)
    opt.close()

    opt = kronfac.KFAC(model, lr=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert opt.layers["2"].block.g_factor.dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_kfac_invalid_arguments() -> None:
    model = nn.Linear(3, 2)
    for kwargs, name in [
        ({"inverse_every": 0}, "inverse_every"),
        ({"kl_clip": -1.0}, "kl_clip"),
        ({"factor_decay": 1.5}, "factor_decay"),
        ({"fisher_type": "exact"}, "fisher_type"),
        ({"approx": "sideways"}, "approx"),
        ({"loss": "hinge"}, "loss"),
        ({"inverse": "eigh"}, "inverse"),
        ({"mc_samples": 0}, "mc_samples"),
        ({"momentum": 1.5}, "momentum"),
    ]:
        with pytest.raises(ValueError, match=name):
            kronfac.KFAC(model, **kwargs)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        kronfac.KFAC(list(model.parameters()))
