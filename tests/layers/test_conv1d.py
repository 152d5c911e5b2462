"""transformers' Conv1D: found lazily (kronfac never imports transformers), tracked in GPT-2, trained by K-FAC.

Its dense-reference tests are entries of the parametrizations in ``tests/curvature/test_dense_reference.py``.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import kronfac
from kronfac.layers import Conv1DHelper, helper_for

SRC = Path(__file__).resolve().parents[2] / "src"


def test_kronfac_never_imports_transformers() -> None:
    # So it imports and runs where transformers is not installed; the Conv1D helper is found by class name.
    code = (
        "import sys, torch, kronfac; kronfac.KFAC(torch.nn.Sequential(torch.nn.Linear(3, 2))); "
        "assert 'transformers' not in sys.modules, 'kronfac imported transformers'"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_conv1d_and_its_subclasses_find_the_helper() -> None:
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")

    class MyConv1D(pytorch_utils.Conv1D):
        pass

    for module in (pytorch_utils.Conv1D(4, 3), MyConv1D(4, 3)):
        helper = helper_for(module)
        assert isinstance(helper, Conv1DHelper)
        assert helper.dims(module) == (4, 4)  # 3 inputs + the bias column, 4 outputs


def test_conv1d_matrices_are_the_transposed_weight() -> None:
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    layer = pytorch_utils.Conv1D(4, 3)
    layer(torch.randn(2, 5, 3)).square().sum().backward()
    helper = helper_for(layer)
    assert helper is not None
    grad = helper.grad_matrix(layer)
    assert grad.shape == (4, 4)
    torch.testing.assert_close(grad, torch.cat([layer.weight.grad.T, layer.bias.grad[:, None]], dim=1))
    for part, param in zip(helper.split(layer, grad), helper.params(layer)):
        assert part.shape == param.shape
        torch.testing.assert_close(part, param.grad)
    torch.testing.assert_close(helper.param_matrix(layer), torch.cat([layer.weight.T, layer.bias[:, None]], dim=1))


def tiny_gpt2() -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def test_kfac_tracks_every_conv1d_of_gpt2_and_trains() -> None:
    model = tiny_gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LayerNorms get the first-order update, as documented
        opt = kronfac.KFAC(model, lr=0.05, damping=1e-2, loss_average="batch+sequence")
    expected = {
        f"transformer.h.{i}.{name}"
        for i in range(2)
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert expected <= set(opt.layers)
    assert all(isinstance(opt.layers[name].helper, Conv1DHelper) for name in expected)
    tokens = torch.randint(0, 50, (8, 12))
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    opt.close()
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < 0.6 * losses[0]  # memorises the batch: from ln(50) ~ 3.9 towards 0
    for name in expected:
        block = opt.layers[name].block
        assert block.a_factor is not None and block.g_factor is not None
        assert bool(torch.isfinite(block.a_factor).all()) and bool(torch.isfinite(block.g_factor).all())
