"""Kronecker factors against the exact Fisher/GGN blocks built with torch.func (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kronfac
from reference import empirical_fisher_block, factors_after_one_step, ggn_block_mse, kron_block

pytestmark = pytest.mark.usefixtures("float64")


def cross_entropy(target: torch.Tensor):
    return lambda out: nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))


def conv1d(d_in: int, d_out: int) -> nn.Module:
    """transformers' GPT-2 ``Conv1D`` (``y = x W + b``, ``W`` stored ``d_in x d_out``); skips without transformers."""
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    layer = pytorch_utils.Conv1D(d_out, d_in)
    nn.init.normal_(layer.bias)  # zeros by default: a random bias tests the bias column too
    return layer


class SelfAttention(nn.Module):
    """``head(attention(x, x, x))``: one MultiheadAttention, batch first, layers ``0`` (in_proj), ``0.out_proj``."""

    def __init__(self, embed_dim: int = 4, heads: int = 2, classes: int = 3, bias: bool = True) -> None:
        super().__init__()
        self.add_module("0", nn.MultiheadAttention(embed_dim, heads, batch_first=True, bias=bias))
        self.head = nn.Linear(embed_dim, classes)
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                nn.init.normal_(param)  # zeros by default: random biases test the bias columns too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attention = self.get_submodule("0")
        return self.head(attention(x, x, x, need_weights=False)[0])


LINEAR_CASES = {
    "linear-bias": (lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)), (1, 3)),
    "linear-nobias": (lambda: nn.Sequential(nn.Linear(3, 4, bias=False), nn.Tanh(), nn.Linear(4, 3)), (1, 3)),
    "conv1d": (lambda: nn.Sequential(conv1d(3, 4), nn.Tanh(), nn.Linear(4, 3)), (1, 3)),
    "conv1d-sequence": (lambda: nn.Sequential(conv1d(3, 4), nn.Tanh(), nn.Linear(4, 3)), (1, 1, 3)),
    # One position: the softmax is 1 and q, k get no gradient; tests/layers/test_attention.py covers longer ones.
    "mha-in-proj": (SelfAttention, (1, 1, 4)),
    "mha-in-proj-nobias": (lambda: SelfAttention(bias=False), (1, 1, 4)),
    "mha-out-proj": (SelfAttention, (1, 1, 4), "0.out_proj"),
    "conv-stride-pad-dilation": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=2), nn.Tanh(), nn.Flatten(), nn.Linear(3, 3)
        ),
        (1, 2, 3, 3),
    ),
    "conv-nobias": (
        lambda: nn.Sequential(nn.Conv2d(2, 3, (2, 3), bias=False), nn.Tanh(), nn.Flatten(), nn.Linear(3, 3)),
        (1, 2, 2, 3),
    ),
}


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_empirical_fisher_batch_one_equals_kronecker(case: str, approx: str) -> None:
    build, shape, *layer = LINEAR_CASES[case]
    name = layer[0] if layer else "0"
    model = build()
    x, target = torch.randn(shape), torch.tensor([1])
    a, g = factors_after_one_step(model, name, x, cross_entropy(target), approx=approx)
    dense = empirical_fisher_block(model, name, x, cross_entropy(target))
    torch.testing.assert_close(kron_block(a, g), dense, atol=1e-8, rtol=1e-8)


def test_empirical_fisher_embedding_single_token() -> None:
    model = nn.Sequential(nn.Embedding(6, 4), nn.Tanh(), nn.Linear(4, 3))
    x, target = torch.tensor([[2]]), torch.tensor([[0]])
    a, g = factors_after_one_step(model, "0", x, cross_entropy(target))
    assert a.ndim == 1 and a.shape == (6,)
    dense = empirical_fisher_block(model, "0", x, cross_entropy(target))
    torch.testing.assert_close(kron_block(a, g), dense, atol=1e-8, rtol=1e-8)


DEEP_LINEAR_LAYERS = {
    "linear-bias": lambda d_in, d_out: nn.Linear(d_in, d_out),
    "linear-nobias": lambda d_in, d_out: nn.Linear(d_in, d_out, bias=False),
    "conv1d": conv1d,
}


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 3)])
@pytest.mark.parametrize("layer", ["0", "1", "2"])
@pytest.mark.parametrize("layer_type", list(DEEP_LINEAR_LAYERS))
def test_kfac_expand_equals_ggn_of_deep_linear_network(layer_type: str, layer: str, shape: tuple[int, ...]) -> None:
    make = DEEP_LINEAR_LAYERS[layer_type]
    model = nn.Sequential(make(3, 4), make(4, 5), make(5, 2))
    x = torch.randn(shape)
    a, g = factors_after_one_step(
        model, layer, x, lambda out: out.square().sum() / shape[0], fisher_type="type2", loss="mse"
    )
    dense = ggn_block_mse(model, layer, x, normaliser=shape[0])
    torch.testing.assert_close(kron_block(a, g), dense, atol=1e-8, rtol=1e-8)


def test_mc_fisher_approaches_exact_fisher() -> None:
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4))
    x, target = torch.randn(32, 5), torch.randint(0, 4, (32,))
    _, exact = factors_after_one_step(model, "2", x, cross_entropy(target), fisher_type="type2")
    errors = []
    for samples in (1, 16, 256):
        _, mc = factors_after_one_step(model, "2", x, cross_entropy(target), fisher_type="mc", mc_samples=samples)
        errors.append(float((mc - exact).norm() / exact.norm()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < errors[0] / 4  # ~1/sqrt(S): 16x fewer samples error expected at 256 vs 1
    assert errors[2] < 0.1


def test_mc_fisher_mse_is_unbiased_for_ggn() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    x = torch.randn(8, 3)
    _, exact = factors_after_one_step(model, "1", x, lambda o: o.square().sum() / 8, fisher_type="type2", loss="mse")
    _, mc = factors_after_one_step(
        model, "1", x, lambda o: o.square().sum() / 8, fisher_type="mc", loss="mse", mc_samples=4000
    )
    torch.testing.assert_close(mc, exact, atol=0.05 * float(exact.abs().max()), rtol=0.0)


def test_inplace_op_after_layer_gives_same_factors() -> None:
    x, target = torch.randn(8, 3), torch.randint(0, 3, (8,))
    results = []
    for inplace in (False, True):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(inplace=inplace), nn.Linear(5, 3))
        results.append(factors_after_one_step(model, "0", x, cross_entropy(target)))
    torch.testing.assert_close(results[0][1], results[1][1], atol=0, rtol=0)
    for fisher_type in ("mc", "type2"):
        mc = []
        for inplace in (False, True):
            torch.manual_seed(1)
            model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(inplace=inplace), nn.Linear(5, 3))
            mc.append(factors_after_one_step(model, "0", x, cross_entropy(target), fisher_type=fisher_type)[1])
        torch.testing.assert_close(mc[0], mc[1], atol=1e-12, rtol=0)


def test_reduce_factors_match_their_definition() -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.Flatten(), nn.Linear(3 * 9, 2))
    x = torch.randn(4, 2, 4, 4)
    grads: dict[str, torch.Tensor] = {}

    def keep(module, grad_in, grad_out) -> None:
        grads["go"] = grad_out[0]

    x.requires_grad_(True)
    model[0].register_full_backward_hook(keep)
    a, g = factors_after_one_step(model, "0", x, lambda o: o.square().sum() / 4, approx="reduce")
    patches = nn.functional.unfold(x, 2).transpose(1, 2)
    patches = torch.cat([patches, torch.ones(4, 9, 1)], dim=2).mean(dim=1)
    torch.testing.assert_close(a, patches.T @ patches / 4)
    summed = grads["go"].flatten(2).sum(2) * 4  # loss averaged over 4 samples: g = 4 grad_out
    torch.testing.assert_close(g, summed.T @ summed / 4)


class BroadcastPositions(nn.Module):
    """As in Hugging Face's GPT-2 and BERT: the position embedding is looked up once, ``(1, T)``, and broadcast over
    the batch (``expand=True`` looks it up per sample instead, ``(N, T)``)."""

    def __init__(self, vocab: int = 7, length: int = 5, width: int = 4, out: int = 3) -> None:
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(vocab, width), nn.Embedding(length, width), nn.Linear(width, out)

    def forward(self, x: torch.Tensor, expand: bool = False) -> torch.Tensor:
        ids = torch.arange(x.shape[1])[None]
        return self.head(torch.tanh(self.tok(x) + self.pos(ids.expand_as(x) if expand else ids)))


@pytest.mark.parametrize("loss_average", ["batch", "batch+sequence"])
def test_a_layer_broadcast_over_the_batch_gets_the_scale_of_its_per_sample_factor(loss_average: str) -> None:
    """The output gradient of a layer broadcast over the batch arrives summed over the samples; with one sample
    carrying all of the loss gradient (the others sit at their targets) that sum is the per-sample gradient,
    so G must equal the one of the same layer looked up per sample (before the fix it was N times smaller)."""
    torch.manual_seed(0)
    model = BroadcastPositions()
    x = torch.randint(0, 7, (4, 5))
    with torch.no_grad():
        target = model(x)
    target[0] = torch.randn(5, 3)
    g = {}
    for expand in (False, True):

        def loss_fn(out: torch.Tensor) -> torch.Tensor:
            return ((out - target) ** 2).sum(-1).mean() if loss_average == "batch+sequence" else \
                ((out - target) ** 2).sum((1, 2)).mean()  # fmt: skip

        opt = kronfac.KFAC(model, lr=0.0, factor_dtype=torch.float64, kl_clip=None, loss_average=loss_average)
        loss_fn(model(x, expand=expand)).backward()
        opt.step()
        opt.close()
        model.zero_grad()
        g[expand] = opt.layers["pos"].block.g_factor
    torch.testing.assert_close(g[False], g[True], atol=1e-10, rtol=1e-10)
