from __future__ import annotations

import pytest
import torch
from torch import nn

from kronfac.nn import KronGRU, KronLinear, KronLSTM, compress
from kronfac.nn.factorize import nearest_kronecker

DT = torch.float64


class _Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(8, 16, batch_first=True)
        self.gru = nn.GRU(16, 16, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(x)
        h, _ = self.gru(h)
        return self.head(h[:, -1])


def test_compress_replaces_modules_and_reports() -> None:
    model = _Classifier().double()
    report = compress(model, compression=4)
    assert isinstance(model.rnn, KronLSTM)
    assert isinstance(model.gru, KronGRU)
    assert isinstance(model.head, KronLinear)
    assert [x.name for x in report.layers] == ["rnn", "gru", "head"]
    for entry in report.layers:
        module = model.get_submodule(entry.name)
        assert entry.kron_params == sum(p.numel() for p in module.parameters())
        assert 0.0 < entry.rel_error < 1.0
    assert report.compression > 2.0
    assert "| total |" in str(report)
    assert model(torch.randn(2, 5, 8, dtype=DT)).shape == (2, 4)


def test_compress_exact_kronecker_model_is_lossless() -> None:
    source = KronLSTM(8, 16, batch_first=True, compression=4, dtype=DT)
    dense = source.to_dense()
    model = nn.Sequential()
    model.add_module("rnn", dense)
    x = torch.randn(3, 6, 8, dtype=DT)
    before = dense(x)[0]
    report = compress(model, compression=4)
    assert report.layers[0].rel_error < 1e-6
    torch.testing.assert_close(model.rnn(x)[0], before, rtol=1e-8, atol=1e-10)


def test_rel_error_matches_direct_computation() -> None:
    model = nn.Sequential(nn.Linear(16, 16)).double()
    w = model[0].weight.detach().clone()
    report = compress(model, compression=4)
    k = model[0].dense_weight().detach()
    assert report.layers[0].rel_error == pytest.approx(float((w - k).norm() / w.norm()), rel=1e-8)
    _, _, err = nearest_kronecker(w, report.layers[0].factor_shapes["weight"])
    assert report.layers[0].rel_error == pytest.approx(err)


def test_include_patterns_and_errors() -> None:
    model = _Classifier()
    report = compress(model, compression=4, include=["rnn", "h*"])
    assert [x.name for x in report.layers] == ["rnn", "head"]
    assert isinstance(model.gru, nn.GRU)
    with pytest.raises(ValueError, match="match no module"):
        compress(_Classifier(), compression=4, include=["decoder"])
    seq = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    with pytest.raises(ValueError, match="not supported"):
        compress(seq, compression=2, include=["1"])
    untouched = nn.Sequential(nn.Linear(64, 16), nn.Linear(7, 1))
    with pytest.raises(ValueError, match="'1'"):
        compress(untouched, compression=4)
    assert isinstance(untouched[0], nn.Linear)  # a failure leaves the model untouched
