"""KronA adapter factors as layers of the curvature core (kronfac.layers.krona), against dense references."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import kronfac
from kronfac.nn import adapter_hosts, add_kron_adapters
from reference import empirical_fisher_block, factors_after_one_step, ggn_block_mse, kron_block

# The base layers are frozen: K-FAC says once that the adapters' res_scale (none here) or the head go first-order.
pytestmark = [pytest.mark.usefixtures("float64"), pytest.mark.filterwarnings("ignore::kronfac.KronfacWarning")]

A_NAME, B_NAME = "1.adapters.default.kron_a", "1.adapters.default.kron_b"


def adapted(factors, head: bool = False) -> nn.Module:
    """``Linear(6, 6)`` then an adapted ``Linear(6, 8)`` (then ``tanh`` and a head), factors random."""
    layers = [nn.Linear(6, 6), nn.Linear(6, 8)] + ([nn.Tanh(), nn.Linear(8, 3)] if head else [])
    model = nn.Sequential(*layers)
    add_kron_adapters(model, target_modules=["1"], factors=factors, scale=0.7)
    with torch.no_grad():
        for host in adapter_hosts(model).values():
            host.adapter.kron_a.weight.normal_()
    return model


@pytest.mark.parametrize("shape", [(5, 6), (4, 3, 6)])
@pytest.mark.parametrize("layer", [A_NAME, B_NAME])
@pytest.mark.parametrize("factors", [((2, 2), (4, 3)), ((4, 3), (2, 2)), ((8, 6), (1, 1))])
def test_kfac_expand_equals_ggn_of_each_factor(factors, layer: str, shape: tuple[int, ...]) -> None:
    """Each factor is the last map before the output: K-FAC-expand is the exact GGN block (square loss)."""
    model = adapted(factors)
    x = torch.randn(shape)
    a, g = factors_after_one_step(
        model, layer, x, lambda out: out.square().sum() / shape[0], fisher_type="type2", loss="mse"
    )
    dense = ggn_block_mse(model, layer, x, normaliser=shape[0])
    torch.testing.assert_close(kron_block(a, g), dense, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize(
    ("layer", "factors"),
    [(B_NAME, ((1, 2), (8, 3))), (A_NAME, ((8, 2), (1, 3)))],  # one position: m1 = 1 for B, m2 = 1 for A
)
def test_empirical_fisher_batch_one_equals_kronecker(layer: str, factors, approx: str) -> None:
    model = adapted(factors, head=True)
    x, target = torch.randn(1, 6), torch.tensor([2])

    def loss(out: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out, target)

    a, g = factors_after_one_step(model, layer, x, loss, approx=approx)
    torch.testing.assert_close(kron_block(a, g), empirical_fisher_block(model, layer, x, loss), atol=1e-8, rtol=1e-8)


def test_token_mean_loss_with_batch_sequence_gives_the_factors_of_the_summed_loss() -> None:
    """``loss_average="batch+sequence"`` counts N·L samples, not the factor's inner positions too."""
    x = torch.randn(4, 5, 6)
    torch.manual_seed(0)
    mean = factors_after_one_step(
        adapted(2, head=True), B_NAME, x, lambda o: o.square().mean(dim=-1).mean(), loss_average="batch+sequence"
    )
    torch.manual_seed(0)
    summed = factors_after_one_step(adapted(2, head=True), B_NAME, x, lambda o: o.square().mean(dim=-1).sum() / 4)
    torch.testing.assert_close(mean[0], summed[0])
    torch.testing.assert_close(mean[1] * 5, summed[1])


def test_gradients_are_the_same_with_and_without_the_capture() -> None:
    x = torch.randn(3, 4, 6)
    grads = []
    for watched in (False, True):
        torch.manual_seed(0)
        model = adapted(((2, 3), (4, 2)), head=True)
        handles = [
            m.register_forward_hook(lambda *_: None) for n, m in model.named_modules() if watched and "kron_" in n
        ]
        out = model(x)
        out.square().sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
        for h in handles:
            h.remove()
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-12, rtol=0)
    for g0, g1 in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(g0, g1, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("cls", [kronfac.KFAC, kronfac.SINGD, kronfac.AdaFisher])
def test_optimizers_precondition_the_adapter_factors(cls) -> None:
    model = adapted(2, head=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kronfac.KronfacWarning)
        opt = cls(model, lr=1e-2)
    assert {A_NAME, B_NAME} <= set(opt.layers), opt.summary()
    assert A_NAME in opt.summary() and "0 parameters first-order" in opt.summary()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    before = model(x).detach()
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert not torch.allclose(model(x), before)
    opt.close()
