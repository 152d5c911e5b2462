"""CG-FAC (Chen 2021): CG on the batch matrices against dense solves, memory, warm start."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kronfac
from kronfac.linalg.cg import batch_operator, cg_solve, factor_operator, operator_costs
from reference import grad_matrix_from


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("diagonal", [False, True])
def test_factor_operator_is_the_batch_operator_with_formed_factors(diagonal: bool, float64) -> None:
    a = torch.rand(7) if diagonal else torch.randn(5, 7)
    g, u = torch.randn(5, 3), torch.randn(3, 7)
    a_factor = a / 5 if diagonal else a.T @ a / 5
    got = factor_operator(a_factor, g.T @ g / 5, 0.3)(u)
    torch.testing.assert_close(got, batch_operator(a, g, 0.3, a_scale=1 / 5, g_scale=1 / 5)(u))
    dense = torch.kron(g.T @ g / 5, torch.diag(a_factor) if diagonal else a_factor) + 0.3 * torch.eye(21)
    torch.testing.assert_close(got.reshape(-1), dense @ u.reshape(-1))


def test_operator_costs_count_the_products() -> None:
    rows, factors, formation = operator_costs(100, 20, 8, 8, iterations=10)
    assert rows == 10 * 2 * 2000 * 16 and factors == 10 * 2000 * 120 and formation == 400 * 8 + 10000 * 8
    rows, factors, formation = operator_costs(100, 20, 0, 8, iterations=10, diagonal_a=True)
    assert rows == 10 * 2000 * 17 and factors == 10 * 2000 * 21 and formation == 400 * 8


def test_auto_takes_the_rows_for_a_small_batch_and_the_factors_for_a_large_one(float64) -> None:
    """A 256-wide layer: 8 rows make the rows cheaper, 2048 rows (a long sequence) the factors; same solve."""
    results = {}
    for rows in (8, 2048):
        for operator in ("auto", "rows", "factors"):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(256, 256))
            opt = kronfac.CGFAC(
                model, lr=0.1, momentum=0.0, damping=1e-2, max_iters=30, tol=1e-12, kl_clip=None,
                factor_dtype=torch.float64, operator=operator, loss_average="batch+sequence",
            )  # fmt: skip
            x = torch.randn(2, rows // 2, 256)
            for _ in range(2):
                opt.zero_grad()
                model(x).square().mean().backward()
                opt.step()
            block = opt.layers["0"].block
            results[rows, operator] = (block.last_operator, model[0].weight.detach().clone(), opt.state_bytes())
        chosen, weight, _ = results[rows, "auto"]
        assert chosen == ("rows" if rows == 8 else "factors")
        torch.testing.assert_close(weight, results[rows, "rows"][1], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(weight, results[rows, "factors"][1], rtol=1e-9, atol=1e-12)
        # the formed factors are state while they are used: (d_i^2 + d_o^2) doubles on top of the rows
        assert results[rows, "factors"][2] - results[rows, "rows"][2] == (257 * 257 + 256 * 256) * 8


def test_invalid_operator_is_refused() -> None:
    with pytest.raises(ValueError, match="Invalid operator: 'dense'"):
        kronfac.CGFAC(nn.Sequential(nn.Linear(2, 2)), operator="dense")


def test_cg_solve_matches_a_dense_solve(float64) -> None:
    m = torch.randn(12, 12)
    spd = m @ m.T + 0.1 * torch.eye(12)
    rhs = torch.randn(3, 4)
    result = cg_solve(lambda u: (spd @ u.reshape(-1)).reshape(3, 4), rhs, max_iters=100, tol=1e-13)
    torch.testing.assert_close(result.solution.reshape(-1), torch.linalg.solve(spd, rhs.reshape(-1)))
    assert result.relative_residual <= 1e-13
    warm = cg_solve(lambda u: (spd @ u.reshape(-1)).reshape(3, 4), rhs, x0=result.solution, tol=1e-12)
    assert warm.iterations == 0


def test_batch_operator_is_the_kronecker_product_without_forming_it(float64) -> None:
    a, g = torch.randn(5, 7), torch.randn(5, 3)
    u = torch.randn(3, 7)
    dense = torch.kron(g.T @ g / 5, a.T @ a / 5) + 0.3 * torch.eye(21)
    applied = batch_operator(a, g, 0.3, a_scale=1 / 5, g_scale=1 / 5)(u)
    torch.testing.assert_close(applied.reshape(-1), dense @ u.reshape(-1))


def _captured_rows(model: nn.Module, layer: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Layer input and output gradient of the mean cross-entropy, captured with plain hooks."""
    store: dict[str, torch.Tensor] = {}

    def fwd(module, args, out):
        store["x"] = args[0].detach()
        out.register_hook(lambda grad: store.__setitem__("dy", grad.detach()))

    handle = layer.register_forward_hook(fwd)
    nn.functional.cross_entropy(model(x), y).backward()
    handle.remove()
    return store["x"], store["dy"]


def _dense_factors(layer: nn.Module, inp: torch.Tensor, dy: torch.Tensor, batch: int):
    """``A = mean a a^T`` over every row (expand), ``G = M Σ dy dy^T`` for a loss averaged over ``M`` samples."""
    if isinstance(layer, nn.Conv2d):
        a = F.unfold(inp, layer.kernel_size, padding=layer.padding, stride=layer.stride).transpose(1, 2)
        g = dy.flatten(2).transpose(1, 2)
    else:
        a, g = inp, dy
    a = a.reshape(-1, a.shape[-1])
    a = torch.cat([a, torch.ones(a.shape[0], 1)], dim=1)
    g = g.reshape(-1, g.shape[-1])
    return a.T @ a / a.shape[0], batch * g.T @ g


MODELS = {
    "linear": (lambda: nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)), (4, 6)),
    "sequence": (lambda: nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Flatten(), nn.Linear(15, 3)), (4, 3, 6)),
    "conv": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(48, 3)), (4, 2, 4, 4)),
}


@pytest.mark.parametrize("operator", ["rows", "factors"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_step_equals_the_dense_damped_solve(kind: str, operator: str, float64) -> None:
    build, shape = MODELS[kind]
    model = build()
    x, y = torch.randn(shape), torch.randint(0, 3, (shape[0],))
    lr, damping = 0.5, 0.03
    opt = kronfac.CGFAC(
        model, lr=lr, momentum=0.0, damping=damping, max_iters=500, tol=1e-14, kl_clip=None, warm_start=False,
        factor_dtype=torch.float64, operator=operator,
    )  # fmt: skip
    layer = model[0]
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    inp, dy = _captured_rows(model, layer, x, y)
    opt.step()
    a_factor, g_factor = _dense_factors(layer, inp, dy, shape[0])
    grad = grad_matrix_from(layer, {f"0.{n}": p.grad for n, p in layer.named_parameters()}, "0")
    matrix = torch.kron(g_factor, a_factor) + damping * torch.eye(grad.numel())
    expected = torch.linalg.solve(matrix, grad.reshape(-1))
    delta = {f"0.{n}": (before[n] - p.detach()) / lr for n, p in layer.named_parameters()}
    got = grad_matrix_from(layer, delta, "0").reshape(-1)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("operator", ["rows", "factors"])
@pytest.mark.parametrize("history", [1, 3])
def test_equals_the_dense_solve_with_the_truncated_ema(history: int, operator: str, float64) -> None:
    """history = H: the factors are K-FAC's EMA truncated to the last H batches (weights ρ^b, normalised)."""
    model = nn.Sequential(nn.Embedding(9, 4), nn.Flatten(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))
    rho, damping = 0.6, 0.05
    opt = kronfac.CGFAC(
        model, lr=0.1, momentum=0.0, damping=damping, max_iters=300, tol=1e-14, kl_clip=None, factor_decay=rho,
        history=history, factor_dtype=torch.float64, operator=operator,
    )  # fmt: skip
    g = torch.Generator().manual_seed(4)
    factors: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
    for _ in range(3):
        x, y = torch.randint(0, 9, (5, 2), generator=g), torch.randint(0, 3, (5,), generator=g)
        opt.zero_grad()
        store: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        handles = [model.get_submodule(n).register_forward_hook(_recorder(store, n)) for n in opt.layers]
        nn.functional.cross_entropy(model(x), y).backward()
        for h in handles:
            h.remove()
        factors.append({n: _layer_factors(model.get_submodule(n), *store[n], batch=5) for n in opt.layers})
        grads = {n: layer.helper.grad_matrix(layer.module).clone() for n, layer in opt.layers.items()}
        opt.step()
    weights = [rho**b for b in range(history)]
    weights = [w / sum(weights) for w in weights]
    recent = factors[::-1][:history]
    for name, layer in opt.layers.items():
        a_bar = sum(w * f[name][0] for w, f in zip(weights, recent))
        g_bar = sum(w * f[name][1] for w, f in zip(weights, recent))
        matrix = torch.kron(g_bar, a_bar) + damping * torch.eye(grads[name].numel())
        expected = torch.linalg.solve(matrix, grads[name].reshape(-1))
        got = layer.block.precondition(grads[name])
        torch.testing.assert_close(got.reshape(-1), expected, rtol=1e-6, atol=1e-9)


def _recorder(store: dict, name: str):
    def hook(module, args, out):
        def grad_hook(grad):
            store[name] = (args[0].detach(), grad.detach())

        out.register_hook(grad_hook)

    return hook


def _layer_factors(module: nn.Module, inp: torch.Tensor, dy: torch.Tensor, batch: int):
    if isinstance(module, nn.Embedding):
        counts = torch.bincount(inp.reshape(-1), minlength=module.num_embeddings).to(torch.float64)
        g = dy.reshape(-1, dy.shape[-1])
        return torch.diag(counts / inp.numel()), batch * g.T @ g
    return _dense_factors(module, inp, dy, batch)


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    def walk(obj) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(walk(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(walk(v) for v in obj)
        return 0

    return walk(opt.curvature_state_dict()["layers"])


@pytest.mark.parametrize("side", ["in", "out"])
def test_state_memory_is_linear_in_each_dimension(side: str) -> None:
    """Curvature state (the batch rows) grows linearly in d_i and in d_o; K-FAC's grows quadratically."""

    def measure(cls, dim: int, **kwargs) -> int:
        d_in, d_out = (dim, 16) if side == "in" else (16, dim)
        model = nn.Sequential(nn.Linear(d_in, d_out))
        opt = cls(model, lr=0.1, damping=1e-2, **kwargs)
        model(torch.randn(8, d_in)).square().mean().backward()
        opt.step()
        return _state_bytes(opt)

    for cls, kwargs, linear in [(kronfac.CGFAC, {"max_iters": 3}, True), (kronfac.KFAC, {}, False)]:
        small, mid, big = (measure(cls, d, **kwargs) for d in (32, 64, 128))
        assert ((big - mid) == 2 * (mid - small)) == linear, (cls.__name__, small, mid, big)
    model = nn.Sequential(nn.Linear(512, 512))
    opt = kronfac.CGFAC(model, lr=0.1, damping=1e-2, max_iters=3, warm_start=False)
    model(torch.randn(8, 512)).square().mean().backward()
    opt.step()
    assert opt.state_bytes() == _state_bytes(opt) == 8 * (513 + 512) * 4  # the rows only: N (d_i + d_o)


def test_warm_start_reuses_the_previous_solution(float64) -> None:
    model = nn.Sequential(nn.Linear(30, 40))
    opt = kronfac.CGFAC(
        model, lr=0.0, damping=1e-2, max_iters=400, tol=1e-10, momentum=0.0, kl_clip=None, factor_dtype=torch.float64,
        warm_start=True,
    )  # fmt: skip
    x = torch.randn(6, 30)
    model(x).square().mean().backward()
    opt.step()
    block = opt.layers["0"].block
    first = block.last_iterations
    opt.step()  # same gradient, same rows (lr = 0): CG starts at the solution
    assert first > 0 and block.last_iterations == 0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_iters": 0}, "max_iters"),
        ({"tol": -1.0}, "tol"),
        ({"history": 0}, "history"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        kronfac.CGFAC(nn.Sequential(nn.Linear(3, 2)), **kwargs)


@pytest.mark.parametrize("key", ["inverse_every", "inverse", "correction"])
def test_options_cgfac_does_not_have_are_refused(key: str) -> None:
    with pytest.raises(TypeError, match=key):
        kronfac.CGFAC(nn.Sequential(nn.Linear(3, 2)), **{key: 3})
