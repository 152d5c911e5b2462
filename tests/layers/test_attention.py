"""nn.MultiheadAttention: the packed in-projection and out_proj, captured by recomputing each call (float64).

Two references: the rows the capture recomputes must rebuild the true gradients of both projections
(``Σ_t g_t a_tᵀ = ∇W``, for every option of the module, dropout included), and the factors must equal those of
the same attention written with two ``nn.Linear`` modules (which the Linear helper captures directly, and which
tests/curvature/test_dense_reference.py checks against torch.func) for every Fisher type and approximation.
Single-position batch-1 Fisher blocks are entries of the parametrization in test_dense_reference.py.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import kronfac
from kronfac.layers import MultiheadAttentionHelper, helper_for

E, HEADS, CLASSES = 6, 2, 3


pytestmark = pytest.mark.usefixtures("float64")


def random_biases(module: nn.Module) -> None:
    for name, param in module.named_parameters():
        if "bias" in name:
            nn.init.normal_(param)


CAUSAL = torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1)
CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # (module options, call options)
    "batch-first": ({"batch_first": True}, {}),
    "sequence-first": ({}, {}),
    "no-bias": ({"batch_first": True, "bias": False}, {}),
    "need-weights": ({"batch_first": True}, {"need_weights": True}),
    "causal-mask": ({"batch_first": True}, {"attn_mask": CAUSAL}),
    "is-causal": ({"batch_first": True}, {"attn_mask": CAUSAL, "is_causal": True}),
    "key-padding": ({"batch_first": True}, {"key_padding_mask": torch.tensor([[False] * 4 + [True]] * 3)}),
    "bias-kv-zero-attn": ({"batch_first": True, "add_bias_kv": True, "add_zero_attn": True}, {}),
    "dropout": ({"batch_first": True, "dropout": 0.3}, {}),
    "dropout-need-weights": ({"batch_first": True, "dropout": 0.3}, {"need_weights": True}),
    "unbatched": ({}, {}),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_recomputed_rows_rebuild_both_gradients(config: str) -> None:
    module_options, call_options = CONFIGS[config]
    attention = nn.MultiheadAttention(E, HEADS, **module_options)
    random_biases(attention)
    x = torch.randn(5, E) if config == "unbatched" else torch.randn(3, 5, E)
    if config == "sequence-first":
        x = x.transpose(0, 1)
    helper = helper_for(attention)
    assert isinstance(helper, MultiheadAttentionHelper)
    before = helper.before_call(attention)
    call_options = {"need_weights": False, **call_options}
    out = attention(x, x, x, **call_options)[0]
    call = helper.record_call(attention, (x, x, x), call_options, before)
    grads: list[Tensor] = []
    out.register_hook(grads.append)
    out.sin().sum().backward()
    rows = helper.call_rows(attention, call, grads[0], keep_graph=False)

    a = helper.input_rows(attention, call.inputs[""]).reshape(-1, helper.dims(attention)[0])
    g = helper.output_grad_rows(attention, rows.output_grads[""]).reshape(-1, 3 * E)
    torch.testing.assert_close(g.T @ a, helper.grad_matrix(attention), atol=1e-12, rtol=1e-10)

    linear = helper_for(attention.out_proj)
    assert linear is not None
    a = linear.input_rows(attention.out_proj, rows.inputs["out_proj"]).reshape(-1, linear.dims(attention.out_proj)[0])
    g = linear.output_grad_rows(attention.out_proj, rows.output_grads["out_proj"]).reshape(-1, E)
    torch.testing.assert_close(g.T @ a, linear.grad_matrix(attention.out_proj), atol=1e-12, rtol=1e-10)


class AttentionModel(nn.Module):
    """``head(attention(embed(x)))`` with a causal mask; ``attention`` is nn.MultiheadAttention or, unrolled, the
    same computation with its projections as two nn.Linear modules."""

    def __init__(self, unrolled_from: AttentionModel | None = None) -> None:
        super().__init__()
        self.embed = nn.Linear(4, E)
        self.attention = nn.MultiheadAttention(E, HEADS, batch_first=True)
        self.head = nn.Linear(E, CLASSES)
        random_biases(self)
        if unrolled_from is not None:
            self.load_state_dict(unrolled_from.state_dict())
            self.qkv, self.out = nn.Linear(E, 3 * E), nn.Linear(E, E)
            with torch.no_grad():
                self.qkv.weight.copy_(self.attention.in_proj_weight)
                self.qkv.bias.copy_(self.attention.in_proj_bias)
                self.out.load_state_dict(self.attention.out_proj.state_dict())
            del self.attention
        self.unrolled = unrolled_from is not None

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        mask = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool), diagonal=1)
        if not self.unrolled:
            return self.head(self.attention(h, h, h, attn_mask=mask, need_weights=False)[0])
        q, k, v = (t.unflatten(-1, (HEADS, -1)).transpose(1, 2) for t in self.qkv(h).chunk(3, dim=-1))
        scores = (q @ k.transpose(-1, -2) / math.sqrt(E // HEADS)).masked_fill(mask, -math.inf)
        context = (scores.softmax(dim=-1) @ v).transpose(1, 2).flatten(2)
        return self.head(self.out(context))


@pytest.mark.parametrize(
    ("fisher_type", "approx"), [("empirical", "expand"), ("empirical", "reduce"), ("mc", "expand"), ("type2", "expand")]
)
def test_factors_equal_those_of_the_unrolled_attention(fisher_type: str, approx: str) -> None:
    model = AttentionModel()
    unrolled = AttentionModel(unrolled_from=model)
    x, y = torch.randn(3, 5, 4), torch.randint(0, CLASSES, (3, 5))
    torch.testing.assert_close(unrolled(x), model(x), atol=1e-12, rtol=0)
    factors = []
    for net in (model, unrolled):
        opt = kronfac.KFAC(
            net, lr=0.0, fisher_type=fisher_type, approx=approx, loss_average="batch+sequence", mc_samples=4,
            factor_dtype=torch.float64, kl_clip=None,
        )  # fmt: skip
        nn.functional.cross_entropy(net(x).flatten(0, 1), y.flatten()).backward()
        opt.step()
        opt.close()
        factors.append({name: (layer.block.a_factor, layer.block.g_factor) for name, layer in opt.layers.items()})
    mha, plain = factors
    assert set(mha) == {"embed", "attention", "attention.out_proj", "head"}
    for name, twin in {"attention": "qkv", "attention.out_proj": "out", "embed": "embed", "head": "head"}.items():
        for ours, reference in zip(mha[name], plain[twin]):
            torch.testing.assert_close(ours, reference, atol=1e-12, rtol=1e-10)


def test_cross_attention_keeps_out_proj_and_warns_once_for_in_proj() -> None:
    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.MultiheadAttention(E, HEADS, batch_first=True)

        def forward(self, x: Tensor, memory: Tensor) -> Tensor:
            return self.attention(x, memory, memory, need_weights=False)[0]

    model = Cross()
    opt = kronfac.KFAC(model, lr=0.01)
    x, memory = torch.randn(2, 3, E), torch.randn(2, 4, E)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            opt.zero_grad()
            model(x, memory).square().mean().backward()
            opt.step()
    messages = [str(w.message) for w in caught if "cross-attention" in str(w.message)]
    assert len(messages) == 1 and "'attention'" in messages[0] and "first-order" in messages[0]
    assert opt.layers["attention"].block.a_factor is None  # in_proj: first-order
    assert opt.layers["attention.out_proj"].block.g_factor is not None


def test_inference_fast_path_between_training_steps() -> None:
    layer = nn.TransformerEncoderLayer(E, HEADS, dim_feedforward=12, dropout=0.1, batch_first=True)
    model = nn.Sequential(layer, nn.Linear(E, CLASSES))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LayerNorms are first-order
        opt = kronfac.KFAC(model, lr=0.05, damping=1e-2, loss_average="batch+sequence")
    assert {"0.self_attn", "0.self_attn.out_proj", "0.linear1", "0.linear2", "1"} <= set(opt.layers)
    x, y = torch.randn(8, 5, E), torch.randint(0, CLASSES, (8, 5))
    losses = []
    for step in range(12):
        model.train()
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 4 == 0:
            model.eval()
            with torch.inference_mode():  # the fused fast path: no hooks fire, nothing is captured
                model(x)
    assert all(math.isfinite(value) for value in losses) and losses[-1] < losses[0]
    for name in ("0.self_attn", "0.self_attn.out_proj"):
        block = opt.layers[name].block
        assert block.a_factor is not None and bool(torch.isfinite(block.g_factor).all())


def test_eval_mode_forwards_do_not_feed_the_statistics() -> None:
    x, y = torch.randn(3, 5, 4), torch.randint(0, CLASSES, (3, 5))
    factors = []
    for with_eval in (False, True):
        torch.manual_seed(0)
        model = AttentionModel()
        opt = kronfac.KFAC(model, lr=0.01)
        opt.zero_grad()
        if with_eval:  # a pass in eval mode with autograd (the slow path: the hooks fire), .grad untouched
            model.eval()
            torch.autograd.grad(model(torch.randn(2, 7, 4) * 10).sum(), list(model.parameters()))
            model.train()
        nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        opt.step()
        blocks = [opt.layers[name].block for name in ("attention", "attention.out_proj")]
        factors.append([factor for block in blocks for factor in (block.a_factor, block.g_factor)])
    for plain, after_eval in zip(*factors):
        assert torch.equal(plain, after_eval)


def test_autocast_forward_gives_full_precision_statistics() -> None:
    x, y = torch.randn(3, 5, 4, dtype=torch.float32), torch.randint(0, CLASSES, (3, 5))
    factors = []
    for autocast in (False, True):
        torch.manual_seed(0)
        model = AttentionModel().float()
        opt = kronfac.KFAC(model, lr=0.01)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(x)
        nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten()).backward()
        opt.step()
        blocks = [opt.layers[name].block for name in ("attention", "attention.out_proj")]
        factors.append([factor for block in blocks for factor in (block.a_factor, block.g_factor)])
    for exact, mixed in zip(*factors):
        assert mixed.dtype == torch.float32
        assert float((mixed - exact).norm() / exact.norm()) < 0.05  # bf16 forward, float32 statistics


def test_out_proj_without_its_attention_is_warned() -> None:
    model = AttentionModel()
    with pytest.warns(UserWarning, match="'attention.out_proj' gets no curvature statistics"):
        opt = kronfac.KFAC(model, exclude=["attention"])
    assert "attention" not in opt.layers


def test_separate_kdim_vdim_falls_back_to_first_order() -> None:
    model = nn.MultiheadAttention(E, HEADS, kdim=4, vdim=5)
    with pytest.warns(UserWarning, match="kdim/vdim"):
        opt = kronfac.KFAC(model)
    assert "" not in opt.layers
