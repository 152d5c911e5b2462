"""AdaFisher / AdaFisherW: steps against the formulas written out by hand (float64), the normalisation-layer
blocks, the first-order fallback, the averaging options and the weight-decay modes (docs/adafisher.md runs in
tests/test_docs.py)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import kronfac
from kronfac.curvature.diagonal_fisher import REFERENCE_NEW_WEIGHT, REFERENCE_OLD_WEIGHT, minmax_normalize

pytestmark = pytest.mark.filterwarnings("ignore:kronfac.*first-order update")


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def minmax(v: Tensor) -> Tensor:
    """Min-max normalisation as the paper states it (no floor needed for these well-spread vectors)."""
    return (v - v.min()) / (v.max() - v.min())


def one_step(opt: torch.optim.Optimizer, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """One cross-entropy step; returns the parameters before it."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return before


def test_minmax_normalize_maps_to_unit_interval_and_is_scale_free() -> None:
    v = torch.tensor([3.0, 5.0, 4.0, 7.0])
    torch.testing.assert_close(minmax_normalize(v), torch.tensor([0.0, 0.5, 0.25, 1.0]))
    torch.testing.assert_close(minmax_normalize(1e-9 * v), minmax_normalize(v))
    assert torch.equal(minmax_normalize(torch.full((3,), 2.0)), torch.ones(3))  # all entries at the maximum
    nearly_constant = torch.tensor([1.0, 1.0 + 1e-12])
    assert minmax_normalize(nearly_constant).min() > 1 - 1e-5  # floor: round-off is not blown up to [0, 1]


def test_linear_step_equals_formula_by_hand() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    lr, beta, damping = 0.01, 0.9, 1e-3
    opt = kronfac.AdaFisher(
        model, lr=lr, betas=(beta, 0.8), damping=damping, factor_every=1, factor_dtype=torch.float64
    )
    layer = model[0]
    before = one_step(opt, model, x, y)

    w, b = before["0.weight"], before["0.bias"]
    logits = x @ w.T + b
    grad_out = (torch.softmax(logits, dim=1) - nn.functional.one_hot(y, 3)) / x.shape[0]
    a = torch.cat([x, torch.ones(6, 1)], dim=1)
    g = grad_out * x.shape[0]  # per-sample output gradients (the core's Fisher scaling)
    h_diag = minmax((a * a).mean(0))
    s_diag = minmax((g * g).mean(0))
    fisher = torch.outer(s_diag, h_diag) + damping
    grad = torch.cat([grad_out.T @ x, grad_out.sum(0, keepdim=True).T], dim=1)
    m_hat = ((1 - beta) * grad) / (1 - beta)
    expected = torch.cat([w, b.unsqueeze(1)], dim=1) - lr * m_hat / fisher
    after = torch.cat([layer.weight.detach(), layer.bias.detach().unsqueeze(1)], dim=1)
    torch.testing.assert_close(after, expected, atol=1e-12, rtol=1e-10)


def test_conv_factors_are_means_over_unfolded_patches() -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 16, 4))
    x, y = torch.randn(5, 2, 4, 4), torch.randint(0, 4, (5,))
    out = model[0](x)  # before the optimizer exists: no hooks
    out.retain_grad()
    nn.functional.cross_entropy(model[2](model[1](out)), y).backward()
    grad_out = out.grad
    assert grad_out is not None
    opt = kronfac.AdaFisher(model, factor_every=1, factor_dtype=torch.float64)
    assert opt.layers["0"].block.a_diag is None
    one_step(opt, model, x, y)
    patches = nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 18)
    a = torch.cat([patches, torch.ones(patches.shape[0], 1)], dim=1)
    g = (grad_out * x.shape[0]).permute(0, 2, 3, 1).reshape(-1, 3)
    block = opt.layers["0"].block
    torch.testing.assert_close(block.a_diag, minmax((a * a).mean(0)))
    # S is a per-batch mean up to a positive constant (the core's scaling), removed by the normalisation.
    torch.testing.assert_close(block.g_diag, minmax((g * g).mean(0)))


def test_embedding_h_is_token_frequency() -> None:
    model = nn.Sequential(nn.Embedding(6, 3), nn.Flatten(), nn.Linear(6, 2))
    tokens = torch.tensor([[0, 1], [1, 1], [2, 5]])
    opt = kronfac.AdaFisher(model, factor_every=1, factor_dtype=torch.float64)
    one_step(opt, model, tokens, torch.tensor([0, 1, 0]))
    counts = torch.bincount(tokens.reshape(-1), minlength=6).double()
    torch.testing.assert_close(opt.layers["0"].block.a_diag, minmax(counts))


@pytest.mark.parametrize(
    "norm, shape",
    [
        (lambda: nn.LayerNorm(5), (7, 5)),
        (lambda: nn.LayerNorm(5), (3, 4, 5)),
        (lambda: nn.BatchNorm1d(5), (7, 5)),
        (lambda: nn.BatchNorm2d(5), (4, 5, 3, 3)),
    ],
    ids=["layernorm", "layernorm-seq", "batchnorm1d", "batchnorm2d"],
)
def test_norm_layer_blocks_match_definition(norm, shape) -> None:
    torch.manual_seed(3)
    layer = norm()
    with torch.no_grad():
        layer.weight.copy_(torch.rand(5) + 0.5)
        layer.bias.copy_(torch.randn(5))
    model = nn.Sequential(layer)
    x = torch.randn(*shape) * 2 + 1
    target = torch.randn(*shape)
    lr, beta, damping = 0.05, 0.9, 1e-3
    opt = kronfac.AdaFisher(
        model, lr=lr, betas=(beta, 0.8), damping=damping, factor_every=1, factor_dtype=torch.float64
    )
    gamma0, beta0 = layer.weight.detach().clone(), layer.bias.detach().clone()

    opt.zero_grad()
    out = model(x)
    out.retain_grad()
    ((out - target) ** 2).mean().backward()
    grad_out = out.grad
    assert grad_out is not None
    grad_gamma, grad_beta = layer.weight.grad.clone(), layer.bias.grad.clone()
    opt.step()

    # Definition: y_c = γ_c x̂_c + β_c; rows are samples x positions, columns the C features.
    if isinstance(layer, nn.LayerNorm):
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, unbiased=False, keepdim=True)
        x_hat = ((x - mean) / torch.sqrt(var + layer.eps)).reshape(-1, 5)
        g = grad_out.reshape(-1, 5)
    else:
        dims = [0, *range(2, x.ndim)]
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, unbiased=False, keepdim=True)
        x_hat = ((x - mean) / torch.sqrt(var + layer.eps)).movedim(1, -1).reshape(-1, 5)
        g = grad_out.movedim(1, -1).reshape(-1, 5)
    h = minmax((x_hat**2).mean(0))
    s = minmax((g**2).mean(0))
    block = opt.layers["0"].block
    torch.testing.assert_close(block.a_diag, h)
    torch.testing.assert_close(block.g_diag, s)
    torch.testing.assert_close(layer.weight.detach(), gamma0 - lr * grad_gamma / (h * s + damping))
    torch.testing.assert_close(layer.bias.detach(), beta0 - lr * grad_beta / (s + damping))


def test_kfac_still_treats_norm_layers_as_first_order() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    assert set(kronfac.KFAC(model).layers) == {"0", "3"}
    assert set(kronfac.AdaFisher(model).layers) == {"0", "1", "2", "3"}
    with pytest.warns(UserWarning, match=r"\['1', '2'\]"):
        assert set(kronfac.AdaFisher(model, norm_layers=False).layers) == {"0", "3"}


class Scale(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(n))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


@pytest.mark.parametrize("kind", ["custom-module", "layernorm-with-norm_layers-off"])
def test_unsupported_module_gets_momentum_sgd_update(kind: str) -> None:
    middle = Scale(4) if kind == "custom-module" else nn.LayerNorm(4)
    model = nn.Sequential(nn.Linear(3, 4), middle, nn.Linear(4, 2))
    param = middle.scale if isinstance(middle, Scale) else middle.weight
    lr, beta = 0.1, 0.8
    with pytest.warns(UserWarning, match=r"\['1'\]"):
        opt = kronfac.AdaFisher(model, lr=lr, betas=(beta, 0.8), factor_every=1, norm_layers=kind == "custom-module")
    assert all(p is not param for layer in opt.layers.values() for p in layer.params)
    data = [(torch.randn(5, 3), torch.randint(0, 2, (5,))) for _ in range(3)]
    grads, values = [], [param.detach().clone()]
    for x, y in data:
        one_step(opt, model, x, y)
        grads.append(param.grad.clone())
        values.append(param.detach().clone())
    m = torch.zeros(4)
    for t, (grad, prev, new) in enumerate(zip(grads, values, values[1:]), start=1):
        m = beta * m + (1 - beta) * grad
        torch.testing.assert_close(new, prev - lr * m / (1 - beta**t))


def test_parameters_are_paired_with_modules_by_identity() -> None:
    # Same-shape weights declared in an order different from the forward pass, plus a shared module.
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.late = nn.Linear(4, 4)
            self.early = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)

        def forward(self, x: Tensor) -> Tensor:
            return self.late(self.norm(self.early(x)))

    model = Net()
    opt = kronfac.AdaFisher(model, factor_every=1)
    for layer in opt.layers.values():
        assert [id(p) for p in layer.params] == [id(p) for p in layer.module.parameters()]
    one_step(opt, model, torch.randn(8, 4), torch.randint(0, 4, (8,)))
    assert opt.layers["late"].block.a_diag is not opt.layers["early"].block.a_diag


def test_ema_averaging_is_a_proper_ema() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    decay = 0.7
    opt = kronfac.AdaFisher(model, betas=(0.9, decay), factor_every=1, factor_dtype=torch.float64)
    block = opt.layers["0"].block
    history = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(6, 3, generator=g), torch.randint(0, 2, (6,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        history.append(minmax_normalize(block.batch_diagonals()[0]))
        opt.step()
    expected = history[0]
    for h in history[1:]:
        expected = decay * expected + (1 - decay) * h
    torch.testing.assert_close(block.a_diag, expected)
    assert float(block.a_diag.max()) <= 1.0  # a convex combination of [0, 1] vectors


def test_reference_averaging_uses_the_reference_coefficients() -> None:
    assert REFERENCE_OLD_WEIGHT + REFERENCE_NEW_WEIGHT != 1.0
    model = nn.Sequential(nn.Linear(3, 2))
    opt = kronfac.AdaFisher(model, averaging="reference", factor_every=1, factor_dtype=torch.float64)
    block = opt.layers["0"].block
    expected = torch.ones(4)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(6, 3)), torch.randint(0, 2, (6,))).backward()
        expected = REFERENCE_OLD_WEIGHT * expected + REFERENCE_NEW_WEIGHT * minmax_normalize(block.batch_diagonals()[0])
        opt.step()
    torch.testing.assert_close(block.a_diag, expected)
    assert float(block.a_diag.max()) < 0.02  # shrinks towards 0.008 / 0.92 of the statistics


def test_factor_every_schedules_the_statistics() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    opt = kronfac.AdaFisher(model, factor_every=3)
    assert opt.factor_every == 3
    seen = []
    for _ in range(6):
        seen.append(bool(model[0]._forward_hooks))
        one_step(opt, model, torch.randn(4, 3), torch.randint(0, 2, (4,)))
    assert seen == [True, False, False, True, False, False]


@pytest.mark.parametrize("cls", [kronfac.AdaFisher, kronfac.AdaFisherW])
def test_weight_decay_modes(cls) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 2), Scale(2))
    lr, beta, wd, damping = 0.1, 0.9, 0.5, 1e-3
    opt = cls(model, lr=lr, betas=(beta, 0.8), weight_decay=wd, damping=damping, factor_every=1)
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    before = one_step(opt, model, x, y)
    fisher = opt.layers["0"].block.fisher(damping)
    f_weight, f_bias = fisher[:, :-1], fisher[:, -1]
    for name, f in [("0.weight", f_weight), ("0.bias", f_bias), ("1.scale", torch.ones(2))]:
        p0 = before[name]
        grad = dict(model.named_parameters())[name].grad
        if cls is kronfac.AdaFisher:  # coupled: η θ joins the gradient, then is divided by F
            expected = p0 - lr * (grad + wd * p0) / f
        else:  # decoupled: θ shrinks by lr η θ outside the preconditioned step
            expected = p0 - lr * (grad / f + wd * p0)
        torch.testing.assert_close(dict(model.named_parameters())[name].detach(), expected)


def test_adafisherw_is_adafisher_with_decoupled_mode() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    torch.manual_seed(0)
    data = [(torch.randn(5, 3), torch.randint(0, 2, (5,))) for _ in range(4)]
    results = []
    for make in (
        lambda m: kronfac.AdaFisherW(m, weight_decay=0.1, factor_every=2),
        lambda m: kronfac.AdaFisher(m, weight_decay=0.1, factor_every=2, weight_decay_mode="decoupled"),
    ):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(3, 2))
        opt = make(m)
        for x, y in data:
            one_step(opt, m, x, y)
        results.append(m[0].weight.detach().clone())
    assert torch.equal(results[0], results[1])
    assert isinstance(kronfac.AdaFisherW(model), kronfac.AdaFisher)


@pytest.mark.parametrize(
    "bad",
    [
        {"betas": (1.0, 0.8)},
        {"betas": (0.9, 1.5)},
        {"betas": 0.9},
        {"factor_every": 0},
        {"averaging": "x"},
        {"weight_decay_mode": "x"},
    ],
)
def test_bad_arguments_name_themselves(bad: dict) -> None:
    (key,) = bad
    with pytest.raises(ValueError, match=key):
        kronfac.AdaFisher(nn.Sequential(nn.Linear(2, 2)), **bad)
