"""Shared parameters (tied embedding and head, one weight in two modules): the fitting rule, its dense reference on
a tiny tied model, and one update per step for every optimizer."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.func import grad

import kronfac
from kronfac.curvature.shared import nearest_kronecker
from settings import OPTIMIZERS

V, D = 7, 4


def _psd(n: int, rank: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, rank, generator=gen, dtype=torch.float64)
    return x @ x.T


def _dense_nearest(total: torch.Tensor, n_g: int, n_a: int) -> torch.Tensor:
    """The Kronecker product nearest to ``total`` (row-major ``(n_g n_a)²``) by the SVD of Van Loan's rearrangement."""
    rearranged = total.reshape(n_g, n_a, n_g, n_a).permute(0, 2, 1, 3).reshape(n_g * n_g, n_a * n_a)
    u, s, vh = torch.linalg.svd(rearranged)
    return torch.kron((u[:, 0] * s[0]).reshape(n_g, n_g), vh[0].reshape(n_a, n_a))


def test_one_term_is_returned_as_it_is():
    gen = torch.Generator().manual_seed(0)
    a, g = _psd(3, 3, gen), _psd(5, 2, gen)
    a_fit, g_fit = nearest_kronecker([(a, g)])
    torch.testing.assert_close(a_fit, a, rtol=0, atol=0)
    torch.testing.assert_close(g_fit, g, rtol=0, atol=0)


def test_proportional_terms_are_fitted_exactly():
    gen = torch.Generator().manual_seed(1)
    a, g = _psd(3, 3, gen), _psd(4, 4, gen)
    a_fit, g_fit = nearest_kronecker([(a, g), (2.0 * a, 3.0 * g)])
    torch.testing.assert_close(torch.kron(g_fit, a_fit), 7.0 * torch.kron(g, a), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("uses", [2, 3])
def test_fit_matches_the_dense_nearest_kronecker_product(seed, uses):
    gen = torch.Generator().manual_seed(seed)
    terms = [(_psd(3, 2, gen), _psd(4, 3, gen)) for _ in range(uses)]
    total = sum(torch.kron(g, a) for a, g in terms)
    a_fit, g_fit = nearest_kronecker(terms)
    torch.testing.assert_close(torch.kron(g_fit, a_fit), _dense_nearest(total, 4, 3), rtol=1e-9, atol=1e-9)
    assert float(a_fit.trace()) > 0 and float(torch.linalg.eigvalsh(a_fit).min()) > -1e-12  # PSD again
    assert float(torch.linalg.eigvalsh(g_fit).min()) > -1e-12


def test_a_diagonal_kept_as_a_vector_is_placed_on_the_diagonal():
    gen = torch.Generator().manual_seed(2)
    counts = torch.rand(3, generator=gen, dtype=torch.float64)
    a, g1, g2 = _psd(3, 3, gen), _psd(2, 2, gen), _psd(2, 2, gen)
    a_fit, g_fit = nearest_kronecker([(counts, g1), (a, g2)])
    total = torch.kron(g1, torch.diag(counts)) + torch.kron(g2, a)
    torch.testing.assert_close(torch.kron(g_fit, a_fit), _dense_nearest(total, 2, 3), rtol=1e-9, atol=1e-9)
    vector_a, _ = nearest_kronecker([(counts, g1), (2 * counts, g2)])
    assert vector_a.ndim == 1  # every term diagonal: the fit stays a vector


class Tied(nn.Module):
    """Embedding -> tanh -> Linear head whose weight is the embedding's (as GPT-2's wte / lm_head)."""

    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, D)
        self.head = nn.Linear(D, V, bias=False)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(x)))


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, V), y.reshape(-1))


def _kfac(model: nn.Module, **kw) -> kronfac.KFAC:
    options = {"lr": 0.1, "damping": 1e-3, "momentum": 0.0, "kl_clip": None, "inverse_every": 1}
    options["loss_average"] = "batch+sequence"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kronfac.KronfacWarning)
        return kronfac.KFAC(model, **{**options, **kw})


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    _loss(model(x), y).backward()
    opt.step()


def test_tied_block_is_the_nearest_kronecker_product_of_the_dense_per_use_fisher_blocks():
    """Batch of one, one position: each use's K-FAC block is its exact Fisher block, so the shared block must be
    the nearest Kronecker product of the sum of the dense per-use blocks (torch.func, float64)."""
    torch.set_default_dtype(torch.float64)
    try:
        model = Tied()
        x, y = torch.tensor([[3]]), torch.tensor([[5]])
        opt = _kfac(model)
        _step(model, opt, x, y)
        block = opt.layers["head"].block

        def loss(w_emb: torch.Tensor, w_head: torch.Tensor) -> torch.Tensor:
            hidden = torch.tanh(nn.functional.embedding(x, w_emb))
            return _loss(hidden @ w_head.T, y)

        before = Tied().emb.weight.detach()  # the weight the statistics were taken at (same seed)
        per_use = [grad(loss, argnums=i)(before, before).reshape(-1) for i in (0, 1)]  # both V x D, head's layout
        total = sum(torch.outer(g, g) for g in per_use)
        expected = _dense_nearest(total, V, D)
        torch.testing.assert_close(torch.kron(block.g_factor, block.a_factor), expected, rtol=1e-10, atol=1e-12)
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("same_orientation", [False, True])
def test_tied_block_fits_the_untied_twins_factors_at_batch_size_four(same_orientation):
    """At any batch size the shared block is the fit of the factors the uses get as separate layers."""
    torch.set_default_dtype(torch.float64)
    try:
        if same_orientation:

            def build(tie: bool) -> nn.Module:
                torch.manual_seed(0)
                model = nn.Sequential(nn.Linear(D, D, bias=False), nn.Tanh(), nn.Linear(D, D, bias=False))
                if tie:
                    model[2].weight = model[0].weight
                else:
                    model[2].weight = nn.Parameter(model[0].weight.detach().clone())
                return model

            x, target = torch.randn(4, D), torch.randn(4, D)
            loss_fn = nn.functional.mse_loss
        else:

            def build(tie: bool) -> nn.Module:
                model = Tied(tie=tie)
                if not tie:
                    model.head.weight = nn.Parameter(model.emb.weight.detach().clone())
                return model

            x, target = torch.randint(0, V, (4, 3)), torch.randint(0, V, (4, 3))
            loss_fn = _loss
        tied, twin = build(True), build(False)
        opts = [_kfac(m, loss_average="batch+sequence") for m in (tied, twin)]
        for model, opt in zip((tied, twin), opts):
            opt.zero_grad()
            loss_fn(model(x), target).backward()
            opt.commit_curvature()
        names = list(opts[1].layers)
        first, second = (opts[1].layers[n].block for n in names)
        terms = [(first.a_factor, first.g_factor), (second.a_factor, second.g_factor)]
        if not same_orientation:  # the embedding's factors in the head's orientation, head first
            terms = [(second.a_factor, second.g_factor), (first.g_factor, first.a_factor)]
        a_fit, g_fit = nearest_kronecker(terms)
        block = next(iter(opts[0].layers.values())).block
        torch.testing.assert_close(block.a_factor, a_fit, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(block.g_factor, g_fit, rtol=1e-12, atol=1e-12)
    finally:
        torch.set_default_dtype(torch.float32)


def test_tied_weight_gets_exactly_one_update_per_step_with_one_momentum_buffer():
    model = Tied()
    opt = _kfac(model, momentum=0.9)
    x, y = torch.randint(0, V, (8, 3)), torch.randint(0, V, (8, 3))
    assert list(opt.layers) == ["head"] and opt.first_order == []
    for _ in range(2):
        before = model.emb.weight.detach().clone()
        buffer = opt.state[model.emb.weight].get("momentum_buffer")
        buffer = None if buffer is None else buffer.clone()
        _step(model, opt, x, y)
        direction = opt.layers["head"].block.precondition(model.head.weight.grad)
        expected_buffer = direction if buffer is None or not buffer.abs().sum() else 0.9 * buffer + direction
        torch.testing.assert_close(opt.state[model.emb.weight]["momentum_buffer"], expected_buffer)
        torch.testing.assert_close(before - model.emb.weight.detach(), 0.1 * expected_buffer)
    assert len([p for p in opt.state if "momentum_buffer" in opt.state[p]]) == 1


def test_one_warning_names_the_shared_parameter_and_the_rule():
    with pytest.warns(kronfac.KronfacWarning) as record:
        opt = kronfac.KFAC(Tied())
    shared = [str(w.message) for w in record if "shared" in str(w.message)]
    assert len(shared) == 1
    assert "'emb.weight'" in shared[0] and "['emb', 'head']" in shared[0] and "nearest" in shared[0]
    assert "shared" in opt.summary()


def test_weight_shared_with_separate_biases_is_first_order_with_a_warning():
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3))
    model[2].weight = model[0].weight
    with pytest.warns(kronfac.KronfacWarning, match="share some of their parameters but not all"):
        opt = kronfac.KFAC(model)
    assert opt.layers == {}
    assert sorted(opt.first_order) == ["0.bias", "0.weight", "2.bias"]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_trains_a_tied_model_and_resumes_it_exactly(name):
    x, y = torch.randint(0, V, (8, 3)), torch.randint(0, V, (8, 3))
    model = Tied()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kronfac.KronfacWarning)
        opt = OPTIMIZERS[name](model, loss_average="batch+sequence")
    assert "head" in opt.layers and "emb" not in opt.layers
    losses = []
    for _ in range(3):
        _step(model, opt, x, y)
        with torch.no_grad():
            losses.append(float(_loss(model(x), y)))
    assert all(torch.isfinite(torch.tensor(losses)))
    # the checkpoint of a tied run restores it exactly
    twin = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kronfac.KronfacWarning)
        twin_opt = OPTIMIZERS[name](twin, loss_average="batch+sequence")
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for m, o in ((model, opt), (twin, twin_opt)):
        torch.manual_seed(3)
        _step(m, o, x, y)
    torch.testing.assert_close(twin.emb.weight, model.emb.weight, rtol=0, atol=0)


def test_gpt2_tied_embedding_and_head_share_one_block():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    with pytest.warns(kronfac.KronfacWarning, match="'transformer.wte.weight' is shared by layers"):
        opt = kronfac.KFAC(model, loss_average="batch+sequence", kl_clip=None, momentum=0.0, inverse_every=1)
    assert "lm_head" in opt.layers and "transformer.wte" not in opt.layers
    assert "transformer.wte.weight" not in opt.first_order
    x = torch.randint(0, 40, (2, 8))
    before = model.lm_head.weight.detach().clone()
    opt.zero_grad()
    model(x, labels=x).loss.backward()
    opt.step()
    direction = opt.layers["lm_head"].block.precondition(model.lm_head.weight.grad)
    torch.testing.assert_close(before - model.lm_head.weight.detach(), 0.05 * direction)
