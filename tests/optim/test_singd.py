"""Tests of ``SINGD``: one step by hand, agreement with the reference package ``singd``, layers (Linear, Conv2d,
Embedding), bfloat16 training, schedules, per-group structures, memory, and error reporting."""

from __future__ import annotations

import importlib.util
import io
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from kronfac.curvature.singd_block import SINGDBlock
from kronfac.curvature.structures import BlockDiagonalMatrix, DiagonalMatrix, LowerTriangularMatrix
from kronfac.optim.singd import SINGD

HAS_SINGD = importlib.util.find_spec("singd") is not None


def batches(n: int, shape: tuple[int, ...], classes: int = 3, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, *shape, generator=g), torch.randint(0, classes, (16,), generator=g)) for _ in range(n)]


def train(model: nn.Module, opt: Any, data: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    losses = []
    for x, y in data:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_one_step_of_a_linear_layer_by_hand() -> None:
    """K, C, and the parameter update after one step equal DESIGN.md's formulas in float64 (bias as a column)."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    W0 = torch.cat([layer.weight, layer.bias[:, None]], dim=1).detach().clone()
    lam, alpha1, beta1, lr, wd = 1e-2, 0.5, 0.1, 0.05, 1e-3
    opt = SINGD(layer, lr=lr, damping=lam, alpha1=alpha1, lr_cov=beta1, weight_decay=wd, factor_every=1, loss="mse")
    out = layer(x)
    loss = 0.5 * ((out - y) ** 2).sum(1).mean()
    loss.backward()
    grad = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1)
    opt.step()

    a = torch.cat([x, torch.ones(8, 1, dtype=torch.float64)], dim=1)
    g = (out - y).detach()  # gradient of the summed loss w.r.t. the output
    A, G = a.T @ a / 8, g.T @ g / 8
    I5, I3 = torch.eye(5, dtype=torch.float64), torch.eye(3, dtype=torch.float64)
    m_K = 0.5 * (torch.trace(G) / 3 * A + lam * I5 - I5)  # K = C = I, m = 0
    m_C = 0.5 * (torch.trace(A) / 5 * G + lam * I3 - I3)
    K, C = I5 - beta1 * m_K, I3 - beta1 * m_C
    update = C @ C.T @ grad @ K @ K.T + wd * W0
    W1 = torch.cat([layer.weight, layer.bias[:, None]], dim=1).detach()
    torch.testing.assert_close(W1, W0 - lr * update, rtol=1e-12, atol=1e-12)
    block = opt.layers[""].block
    assert isinstance(block, SINGDBlock)
    torch.testing.assert_close(block.factors.K.to_dense(), K, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(block.factors.C.to_dense(), C, rtol=1e-12, atol=1e-12)


def conv_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 5 * 5, 8),
        nn.Tanh(),
        nn.Linear(8, 8, bias=False),
        nn.Tanh(),
        nn.Linear(8, 3),
    )


@pytest.mark.skipif(not HAS_SINGD, reason="the reference package singd is not installed")
@pytest.mark.parametrize(
    ("structure", "kfac_like"),
    [("dense", False), ("diagonal", False), ("dense", True)],
    ids=["dense", "diagonal", "ikfac"],
)
def test_matches_singd_package_for_20_steps(structure: str, kfac_like: bool) -> None:
    """Same model (Conv2d + Linear), data, seed and hyperparameters: parameters agree to 1e-5 in float32."""
    from singd.optim.optimizer import SINGD as ReferenceSINGD

    hyper = {
        "lr": 0.05,
        "momentum": 0.9,
        "damping": 1e-2,
        "alpha1": 0.0 if kfac_like else 0.5,
        "weight_decay": 1e-2,
        "lr_cov": 0.05,
        "kfac_like": kfac_like,
    }
    ours, ref = conv_model(), conv_model()
    opt = SINGD(ours, factor_every=3, structures=(structure, structure), **hyper)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singd's own naive-fallback warnings
        ref_opt = ReferenceSINGD(ref, T=3, structures=(structure, structure), **hyper)
        data = batches(20, (2, 5, 5))
        train(ours, opt, data)
        train(ref, ref_opt, data)
    start = conv_model()
    for p, q, p0 in zip(ours.parameters(), ref.parameters(), start.parameters()):
        assert not torch.allclose(p, p0)  # the comparison is not vacuous
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_conv2d_expand_and_reduce_train(approx: str) -> None:
    model = conv_model()
    opt = SINGD(model, lr=0.05, lr_cov=0.05, factor_every=1, approx=approx, structures=("diagonal", "dense"))
    losses = train(model, opt, batches(1, (2, 5, 5)) * 20)
    assert losses[-1] < 0.7 * losses[0]


def test_embedding_keeps_a_diagonal_input_factor() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 6), nn.Flatten(), nn.Linear(6 * 4, 3))
    opt = SINGD(model, lr=0.05, lr_cov=0.05, factor_every=1, structures=("dense", "dense"))
    block = opt.layers["0"].block
    assert isinstance(block, SINGDBlock) and isinstance(block.factors.K, DiagonalMatrix)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 20, (32, 4), generator=g), torch.randint(0, 3, (32,), generator=g)
    before = block.factors.K.to_dense().diagonal().clone()
    losses = train(model, opt, [(x, y)] * 40)
    assert losses[-1] < 0.5 * losses[0]
    after = block.factors.K.to_dense().diagonal()
    seen = torch.bincount(x.flatten(), minlength=20) > 0
    # only tokens that occur change their entry of K
    assert torch.equal(after[~seen], before[~seen]) and not torch.equal(after[seen], before[seen])


def mlp(dtype: torch.dtype, width: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 3)).to(
        dtype
    )


def classification_data(n: int = 128, noise: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear 3-class problem with a fraction ``noise`` of random labels, so the loss stays away from zero."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 10, generator=g)
    y = (x[:, :3] * torch.tensor([1.0, -2.0, 0.5])).argmax(1)
    flip = torch.rand(n, generator=g) < noise
    y[flip] = torch.randint(0, 3, (int(flip.sum()),), generator=g)
    return x, y


def test_pure_bfloat16_training_matches_float32() -> None:
    """200 steps with bf16 parameters and factors: no non-finite value, final loss within 10% of fp32."""
    x, y = classification_data(512)
    final = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = mlp(dtype)
        opt = SINGD(model, lr=0.01, lr_cov=0.02, damping=0.01, factor_every=2)
        data = [(x[i * 64 : (i + 1) * 64].to(dtype), y[i * 64 : (i + 1) * 64]) for i in range(8)]
        losses = train(model, opt, data * 25)
        assert all(torch.isfinite(torch.tensor(losses)))
        for layer in opt.layers.values():
            assert isinstance(layer.block, SINGDBlock)
            assert all(m.dtype == dtype and m.is_finite() for m in layer.block.factors)
        with torch.no_grad():
            final[dtype] = float(nn.functional.cross_entropy(model(x.to(dtype)).float(), y))
    assert final[torch.float32] < 0.5 * losses[0]  # it learned
    assert abs(final[torch.bfloat16] - final[torch.float32]) <= 0.1 * final[torch.float32]


@pytest.mark.parametrize("structures", [("diagonal", "diagonal"), ("block_diagonal", "lower_triangular")])
def test_bfloat16_structured_training_stays_finite(structures: tuple[str, str]) -> None:
    x, y = classification_data()
    model = mlp(torch.bfloat16)
    opt = SINGD(model, lr=0.02, lr_cov=0.02, factor_every=1, structures=structures)
    losses = train(model, opt, [(x[:64].bfloat16(), y[:64]), (x[64:].bfloat16(), y[64:])] * 20)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert all(m.is_finite() for layer in opt.layers.values() for m in layer.block.factors)  # type: ignore[attr-defined]


@pytest.mark.parametrize("preconditioner_dtype", [torch.bfloat16, torch.float32])
def test_bf16_autocast_with_preconditioner_dtype(preconditioner_dtype: torch.dtype) -> None:
    x, y = classification_data()
    model = mlp(torch.float32)
    opt = SINGD(model, lr=0.02, lr_cov=0.02, factor_every=1, preconditioner_dtype=preconditioner_dtype)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    block = next(iter(opt.layers.values())).block
    assert isinstance(block, SINGDBlock) and block.factors.K.dtype == preconditioner_dtype
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_lr_cov_schedule_and_factor_every() -> None:
    model = mlp(torch.float32)
    opt = SINGD(model, lr_cov=lambda step: 0.0 if step < 4 else 0.05, factor_every=2)
    block = opt.layers["0"].block
    assert isinstance(block, SINGDBlock)
    x, y = classification_data()
    identity = torch.eye(11)  # K of the first layer: 10 inputs + bias
    for step in range(6):
        train(model, opt, [(x[:32], y[:32])])
        moved = not torch.equal(block.factors.K.to_dense(), identity)
        assert moved == (step >= 4)  # updates at steps 0, 2 have β1 = 0; step 4 is the first real one
    assert opt.factor_every == 2


def test_param_groups_choose_their_own_structures() -> None:
    model = mlp(torch.float32)
    first, rest = [*model[0].parameters()], [p for m in (model[2], model[4]) for p in m.parameters()]
    groups = [
        {"params": first, "structures": ("diagonal", "lower_triangular")},
        {"params": rest, "structures": (("block_diagonal", {"block_size": 4}), "dense")},
    ]
    opt = SINGD(model, param_groups=groups, factor_every=1)
    b0, b2 = opt.layers["0"].block, opt.layers["2"].block
    assert isinstance(b0, SINGDBlock) and isinstance(b2, SINGDBlock)
    assert isinstance(b0.factors.K, DiagonalMatrix) and isinstance(b0.factors.C, LowerTriangularMatrix)
    assert isinstance(b2.factors.K, BlockDiagonalMatrix) and b2.factors.K.block_size == 4
    x, y = classification_data()
    train(model, opt, [(x[:32], y[:32])] * 3)
    assert isinstance(b0.factors.K, DiagonalMatrix) and b0.factors.K.is_finite()


def test_state_memory_diagonal_below_adamw() -> None:
    x, y = classification_data()
    sizes = {}
    for structures in [("dense", "dense"), ("diagonal", "diagonal"), ("block_diagonal", "block_diagonal")]:
        model = mlp(torch.float32)
        opt = SINGD(model, factor_every=1, structures=structures)
        train(model, opt, [(x[:32], y[:32])])
        sizes[structures[0]] = opt.state_bytes()
    adamw_bytes = 2 * sum(p.numel() * p.element_size() for p in mlp(torch.float32).parameters())
    assert sizes["diagonal"] < sizes["block_diagonal"] <= sizes["dense"]
    assert sizes["diagonal"] <= adamw_bytes


def test_nonfinite_factor_update_is_reported() -> None:
    x, y = classification_data()
    model = mlp(torch.float32)
    opt = SINGD(model, lr_cov=1e30, factor_every=1)
    with pytest.raises(FloatingPointError, match=r"non-finite .* in the SINGD update of layer"):
        train(model, opt, [(x[:32] * 1e10, y[:32])] * 3)

    model = mlp(torch.float32)
    opt = SINGD(model, lr_cov=1e30, factor_every=1, on_nonfinite="skip")
    with pytest.warns(RuntimeWarning, match="skipping"):
        train(model, opt, [(x[:32] * 1e10, y[:32])] * 3)
    assert opt.num_skipped >= 1
    assert all(layer.block.factors.K.is_finite() for layer in opt.layers.values())  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"structures": ("dense",)}, "structures"),
        ({"structures": ("dense", "banded")}, "Invalid structure"),
        ({"alpha1": 1.0}, "alpha1"),
        ({"lr_cov": -1.0}, "lr_cov"),
        ({"factor_every": 0}, "factor_every"),
        ({"preconditioner_dtype": "float32"}, "preconditioner_dtype"),
        ({"cache_outer": 1}, "cache_outer"),
        ({"param_groups": [{"params": [], "structures": ("dense", "nope")}]}, "Invalid structure"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SINGD(mlp(torch.float32), **kwargs)


CACHED_STRUCTURES = ["dense", "diagonal", "block_diagonal", "lower_triangular", "upper_triangular", "hierarchical"]


@pytest.mark.parametrize("kfac_like", [False, True], ids=["singd", "ikfac"])
@pytest.mark.parametrize("structure", CACHED_STRUCTURES)
def test_kept_outer_products_give_the_same_updates(structure: str, kfac_like: bool) -> None:
    """With K K^T and C C^T kept between updates the parameters follow the four-product path to round-off
    (float64, 12 steps, updates every 3)."""
    x, y = classification_data()
    data = [(x[i * 16 : (i + 1) * 16].double(), y[i * 16 : (i + 1) * 16]) for i in range(6)] * 2
    params = {}
    for cache in (True, False):
        model = mlp(torch.float64)
        opt = SINGD(
            model,
            lr=0.05,
            lr_cov=0.05,
            factor_every=3,
            structures=(structure, structure),
            kfac_like=kfac_like,
            cache_outer=cache,
        )
        train(model, opt, data)
        kept = [m for layer in opt.layers.values() for m in layer.block.outer_products()]  # type: ignore[attr-defined]
        if not cache or structure == "hierarchical":  # hierarchical applies K twice: cheaper than its dense K K^T
            assert all(m is None for m in kept)
        else:
            assert any(m is not None for m in kept)  # the comparison is not vacuous
        params[cache] = [p.detach().clone() for p in model.parameters()]
    start = [p.detach() for p in mlp(torch.float64).parameters()]
    for cached, plain, p0 in zip(params[True], params[False], start):
        assert not torch.equal(plain, p0)
        torch.testing.assert_close(cached, plain, rtol=1e-10, atol=1e-12)


def test_outer_products_are_kept_only_where_they_save_work() -> None:
    """A dense K (d_i x d_i) is squared when d_i < T d_o, C when d_o < T d_i (flops of T steps)."""
    model = nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    kept: dict[int, list[tuple[bool, bool]]] = {}
    for T in (1, 10):
        opt = SINGD(model, factor_every=T)
        kept[T] = [tuple(m is not None for m in layer.block.outer_products()) for layer in opt.layers.values()]  # type: ignore[attr-defined,misc]
        opt.close()
    # layers (d_i, d_o) = (41, 256), (257, 256), (257, 10)
    assert kept[1] == [(True, False), (False, True), (False, True)]
    assert kept[10] == [(True, True), (True, True), (False, True)]


@pytest.mark.parametrize("kfac_like", [True, False], ids=["ikfac", "singd-alpha1-0"])
def test_no_momentum_buffers_without_riemannian_momentum(kfac_like: bool) -> None:
    """IKFAC (and SINGD with α1 = 0) keep no m_K, m_C: not in the blocks, the checkpoint or state_bytes."""
    x, y = classification_data()
    sizes = {}
    for label, kwargs in (("without", {"kfac_like": kfac_like, "alpha1": 0.0}), ("with", {"alpha1": 0.5})):
        model = mlp(torch.float32)
        opt = SINGD(model, factor_every=1, **kwargs)  # type: ignore[arg-type]
        train(model, opt, [(x[:32], y[:32])] * 3)
        blocks = [layer.block for layer in opt.layers.values()]
        assert all(isinstance(b, SINGDBlock) for b in blocks)
        momenta = [m for b in blocks for m in b.factors[2:]]  # type: ignore[attr-defined]
        layer_states = [b.state_dict() for b in blocks]
        if label == "without":
            assert all(m is None for m in momenta)
            assert all(set(state) == {"K", "C"} for state in layer_states)
        else:
            assert all(m is not None for m in momenta)
            assert all(set(state) == {"K", "C", "m_K", "m_C"} for state in layer_states)
        sizes[label] = opt.state_bytes()
    momentum_bytes = sum(
        4 * (layer.block.factors.K.num_params() + layer.block.factors.C.num_params())  # type: ignore[attr-defined]
        for layer in opt.layers.values()
    )
    assert sizes["with"] - sizes["without"] == momentum_bytes


@pytest.mark.parametrize("kfac_like", [False, True], ids=["singd", "ikfac"])
@pytest.mark.parametrize("structure", ["dense", "diagonal", "lower_triangular"])
def test_checkpoint_round_trip_with_kept_products_is_exact(structure: str, kfac_like: bool) -> None:
    """Save mid-interval (K K^T kept), load into a fresh model and optimizer: the next steps are bit-identical."""
    x, y = classification_data()
    data = [(x[i * 16 : (i + 1) * 16], y[i * 16 : (i + 1) * 16]) for i in range(8)]
    kwargs: dict[str, Any] = {"factor_every": 3, "structures": (structure, structure), "kfac_like": kfac_like}
    model = mlp(torch.float32)
    opt = SINGD(model, lr=0.05, lr_cov=0.05, **kwargs)
    train(model, opt, data[:4])  # updates at steps 0 and 3: the products of step 3 are kept
    assert any(m is not None for layer in opt.layers.values() for m in layer.block.outer_products())  # type: ignore[attr-defined]
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, data[4:])
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    restored = mlp(torch.float32)
    restored.load_state_dict(saved["model"])
    restored_opt = SINGD(restored, lr=0.05, lr_cov=0.05, **kwargs)
    restored_opt.load_state_dict(saved["opt"])
    train(restored, restored_opt, data[4:])
    for p, q in zip(model.parameters(), restored.parameters()):
        assert torch.equal(p, q)
    for name, layer in opt.layers.items():
        mine, theirs = layer.block.factors, restored_opt.layers[name].block.factors  # type: ignore[attr-defined]
        for a, b in zip(mine, theirs):
            assert (a is None) == (b is None)
            if a is not None:
                assert all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in a.tensors())


@pytest.mark.parametrize("cache_outer", [True, False])
def test_nonfinite_update_names_the_layer(cache_outer: bool) -> None:
    """The one-reduction finiteness check still stops the step and names the layer and what went non-finite."""
    x, y = classification_data()
    model = mlp(torch.float32)
    opt = SINGD(model, lr_cov=1e30, factor_every=1, cache_outer=cache_outer)
    with pytest.raises(FloatingPointError, match=r"non-finite (K|C) in the SINGD update of layer '\d'"):
        train(model, opt, [(x[:32] * 1e10, y[:32])] * 3)
