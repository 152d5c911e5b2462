"""The Kronecker layers on a CUDA device (skipped without one, see conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from kronfac.nn import (
    KronGRU,
    KronLSTM,
    add_kron_adapters,
    compress,
    kron_matvec,
    load_adapters,
    merge_adapters,
    save_adapters,
    unmerge_adapters,
)
from kronfac.nn.adapters import adapter_modules

DEV = "cuda"


@pytest.mark.parametrize("order", ["a_first", "b_first"])
def test_kron_matvec_matches_cpu_and_dense(order: str) -> None:
    a = torch.randn(16, 8, dtype=torch.float64, device=DEV, requires_grad=True)
    b = torch.randn(12, 32, dtype=torch.float64, device=DEV, requires_grad=True)
    x = torch.randn(3, 5, 256, dtype=torch.float64, device=DEV)
    y = kron_matvec(a, b, x, order=order)  # type: ignore[arg-type]
    torch.testing.assert_close(y, x @ torch.kron(a, b).T)
    torch.testing.assert_close(y.cpu(), kron_matvec(a.detach().cpu(), b.detach().cpu(), x.cpu(), order=order))  # type: ignore[arg-type]
    y.sum().backward()
    assert a.grad is not None and a.grad.device.type == "cuda"


@pytest.mark.parametrize("cls", [KronLSTM, KronGRU])
def test_rnn_matches_torch_on_gpu(cls: type[KronLSTM] | type[KronGRU]) -> None:
    kw = {"device": DEV, "dtype": torch.float64}
    kron = cls(8, 32, num_layers=2, batch_first=True, bidirectional=True, compression=4, **kw)
    dense = kron.to_dense()
    x = torch.randn(4, 7, 8, dtype=torch.float64, device=DEV)
    torch.testing.assert_close(kron(x)[0], dense(x)[0], rtol=1e-9, atol=1e-11)


def test_compress_and_adapters_on_gpu(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).to(DEV)
    report = compress(model, compression=4, include=["2"])
    assert report.layers[0].name == "2" and next(model[2].parameters()).device.type == "cuda"
    add_kron_adapters(model, target_modules=["0", "4"], factors=4)
    with torch.no_grad():
        for w in adapter_modules(model).values():
            w.adapter.kron_a.normal_()
    x = torch.randn(5, 16, device=DEV)
    out = model(x)
    merge_adapters(model)
    torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-4)
    unmerge_adapters(model)
    path = tmp_path / "a.safetensors"
    save_adapters(model, path)
    fresh = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).to(DEV)
    compress(fresh, compression=4, include=["2"])
    fresh.load_state_dict({k.replace(".base", ""): v for k, v in model.state_dict().items() if ".adapter." not in k})
    load_adapters(fresh, path)
    torch.testing.assert_close(fresh(x), out, rtol=1e-5, atol=1e-5)
