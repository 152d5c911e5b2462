from __future__ import annotations

import pytest
import torch
from torch import nn

from kronfac.nn import KronGRU, KronLSTM

DT = torch.float64


def _dense_with_kron_weights(kron: KronLSTM | KronGRU) -> nn.Module:
    """An independently built nn.LSTM/nn.GRU whose weights are set to torch.kron of the factors."""
    cls = nn.LSTM if isinstance(kron, KronLSTM) else nn.GRU
    dense = cls(
        kron.input_size,
        kron.hidden_size,
        kron.num_layers,
        bias=kron.bias,
        batch_first=kron.batch_first,
        bidirectional=kron.bidirectional,
        dtype=DT,
    )
    with torch.no_grad():
        for name, p in dense.named_parameters():
            if name.startswith("weight_"):
                layer = kron.kron_weight(name)
                p.copy_(torch.kron(layer.kron_a, layer.kron_b))
            else:
                p.copy_(getattr(kron, name))
    return dense


@pytest.mark.parametrize("cls", [KronLSTM, KronGRU])
@pytest.mark.parametrize(
    ("num_layers", "batch_first", "bidirectional", "bias"),
    [(1, False, False, True), (2, True, True, True), (2, False, True, False), (1, True, False, True)],
)
@pytest.mark.parametrize("with_state", [False, True])
def test_equals_torch_rnn(
    cls: type[KronLSTM] | type[KronGRU],
    num_layers: int,
    batch_first: bool,
    bidirectional: bool,
    bias: bool,
    with_state: bool,
) -> None:
    kron = cls(6, 8, num_layers, bias, batch_first, 0.0, bidirectional, compression=3, dtype=DT)
    dense = _dense_with_kron_weights(kron)
    x = torch.randn(3, 5, 6, dtype=DT)  # (N, L, d) or (L, N, d) depending on batch_first
    batch = x.shape[0] if batch_first else x.shape[1]
    d = 2 if bidirectional else 1
    hx = None
    if with_state:
        h0 = torch.randn(d * num_layers, batch, 8, dtype=DT)
        hx = (h0, torch.randn_like(h0)) if cls is KronLSTM else h0
    out, state = kron(x, hx)
    out_ref, state_ref = dense(x, hx)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)
    if cls is KronLSTM:
        for s, s_ref in zip(state, state_ref):
            torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-12)
    else:
        torch.testing.assert_close(state, state_ref, rtol=1e-10, atol=1e-12)
    # Gradients flow into the factors.
    out.sum().backward()
    assert kron.kron_weight("weight_hh_l0").kron_a.grad is not None


@pytest.mark.parametrize("cls", [KronLSTM, KronGRU])
def test_unbatched_input_and_to_dense(cls: type[KronLSTM] | type[KronGRU]) -> None:
    kron = cls(4, 6, num_layers=2, bidirectional=True, compression=2, dtype=DT)
    dense = kron.to_dense()
    x = torch.randn(7, 4, dtype=DT)
    out, _ = kron(x)
    out_ref, _ = dense(x)
    assert out.shape == (7, 12)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [KronLSTM, KronGRU])
def test_parameter_count_matches_formula(cls: type[KronLSTM] | type[KronGRU]) -> None:
    gates = 4 if cls is KronLSTM else 3
    factors = {
        "weight_ih_l0": ((8, 2), (gates * 4, 4)),
        "weight_hh_l0": ((gates * 4, 4), (8, 8)),
    }
    kron = cls(8, 32, factors=factors)
    expected = (8 * 2 + gates * 4 * 4) + (gates * 4 * 4 + 8 * 8) + 2 * gates * 32
    assert sum(p.numel() for p in kron.parameters()) == expected
    assert kron.factor_shapes() == factors


def test_from_dense_recovers_kronecker_lstm() -> None:
    source = KronLSTM(8, 16, compression=4, dtype=DT)
    dense = source.to_dense()
    kron, errors = KronLSTM.from_dense(dense, factors=source.factor_shapes())
    assert max(errors.values()) < 1e-6
    x = torch.randn(5, 2, 8, dtype=DT)
    torch.testing.assert_close(kron(x)[0], dense(x)[0], rtol=1e-8, atol=1e-10)


def test_errors() -> None:
    with pytest.raises(ValueError, match="weight_ih_l0"):
        KronLSTM(8, 16)
    with pytest.raises(ValueError, match="unknown weight names"):
        KronGRU(8, 16, compression=4, factors={"weight_xx_l0": ((2, 2), (24, 4))})
    with pytest.raises(ValueError, match=r"expects nn\.GRU"):
        KronGRU.from_dense(nn.LSTM(4, 4), compression=2)
    lstm = KronLSTM(4, 8, compression=2)
    with pytest.raises(ValueError, match="h_0"):
        lstm(torch.randn(3, 2, 4), (torch.zeros(1, 3, 8), torch.zeros(1, 3, 8)))
    with pytest.raises(ValueError, match="Invalid input"):
        lstm(torch.randn(3, 2, 5))
    with pytest.raises(ValueError, match="dropout"):
        KronLSTM(4, 8, dropout=1.5, compression=2)


def test_dropout_between_layers_only_in_training() -> None:
    kron = KronGRU(4, 8, num_layers=2, dropout=0.5, compression=2, dtype=DT)
    dense = kron.to_dense()
    x = torch.randn(6, 3, 4, dtype=DT)
    kron.eval()
    dense.eval()
    torch.testing.assert_close(kron(x)[0], dense(x)[0], rtol=1e-10, atol=1e-12)
    kron.train()
    torch.manual_seed(1)
    a = kron(x)[0]
    torch.manual_seed(2)
    b = kron(x)[0]
    assert not torch.allclose(a, b)
    single = KronGRU(4, 8, num_layers=1, dropout=0.5, compression=2, dtype=DT).train()
    torch.testing.assert_close(single(x)[0], single(x)[0])  # no dropout after the last layer
