"""``KronLSTM`` and ``KronGRU``: recurrent layers whose weight matrices are Kronecker products.

Each ``W_ih`` (``G h x d_in``, ``G = 4`` for LSTM, ``3`` for GRU, gates stacked like PyTorch's) and ``W_hh``
(``G h x h``) of every layer and direction is a :class:`~kronfac.nn.kron_linear.KronLinear` without bias; biases
stay
dense. The constructor and ``forward`` follow ``nn.LSTM`` / ``nn.GRU``: ``batch_first``, ``num_layers``,
``dropout``, ``bidirectional``, optional initial states, unbatched input; gate equations are PyTorch's, so
with
``W = A ⊗ B`` materialised the outputs equal ``nn.LSTM`` / ``nn.GRU`` (see :meth:`KronRNNBase.to_dense`).
``PackedSequence`` and ``proj_size`` are not supported.

The recurrence runs in a Python loop over time (the input projection of all steps is one batched call).
:class:`StructuredRNN` takes any factory of weight modules, so the same loop serves dense, low-rank or pruned
weights (used by the benchmarks for like-for-like latency).

Reference:
    U. Thakker et al., "Compressing RNNs for IoT devices by 15-38x using Kronecker products",
    arXiv:1906.02876.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kronfac.nn.factorize import DEFAULT_TOLERANCE, KronShape, check_shape, kron_shapes, nearest_kronecker
from kronfac.nn.kron_linear import KronLinear, init_kron_factors

__all__ = ["KronGRU", "KronLSTM", "KronRNNBase", "StructuredRNN", "WeightFactory"]

Mode = Literal["LSTM", "GRU"]
_GATES = {"LSTM": 4, "GRU": 3}

#: ``make_weight(name, out_features, in_features)`` returns a module mapping ``(..., in) -> (..., out)``.
WeightFactory = Callable[[str, int, int], nn.Module]

State = Tensor | tuple[Tensor, Tensor]


class StructuredRNN(nn.Module):
    """LSTM/GRU with pluggable weight modules and the ``nn.LSTM`` / ``nn.GRU`` contract.

    Args:
        mode: ``"LSTM"`` or ``"GRU"``.
        input_size: Features per time step.
        hidden_size: ``h``.
        num_layers: Stacked layers.
        bias: Whether to use the dense biases ``b_ih``, ``b_hh``.
        batch_first: Input/output as ``(N, L, ·)`` instead of ``(L, N, ·)``.
        dropout: Dropout on the outputs of every layer but the last (training only), in ``[0, 1)``.
        bidirectional: Run a reverse direction too and concatenate.
        make_weight: Factory of weight modules; names follow PyTorch (``weight_ih_l0``,
            ``weight_hh_l1_reverse``).
        device: Device of the biases.
        dtype: Dtype of the biases.
    """

    def __init__(
        self,
        mode: Mode,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        *,
        make_weight: WeightFactory,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if mode not in _GATES:
            raise ValueError(f"Invalid mode: {mode!r}; allowed: {sorted(_GATES)}")
        if input_size < 1 or hidden_size < 1:
            raise ValueError(f"Invalid sizes: input_size={input_size}, hidden_size={hidden_size}; must be >= 1")
        if num_layers < 1:
            raise ValueError(f"Invalid num_layers: {num_layers}; must be >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Invalid dropout: {dropout}; must be in [0, 1)")
        self.mode: Mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.num_directions = 2 if bidirectional else 1
        gate_size = _GATES[mode] * hidden_size
        self.weights = nn.ModuleDict()
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else hidden_size * self.num_directions
            for direction in range(self.num_directions):
                sfx = self._suffix(layer, direction)
                self.weights[f"weight_ih{sfx}"] = make_weight(f"weight_ih{sfx}", gate_size, layer_in)
                self.weights[f"weight_hh{sfx}"] = make_weight(f"weight_hh{sfx}", gate_size, hidden_size)
                if bias:
                    for kind in ("ih", "hh"):
                        p = nn.Parameter(torch.empty(gate_size, device=device, dtype=dtype))
                        self.register_parameter(f"bias_{kind}{sfx}", p)
        self.reset_biases()

    @staticmethod
    def _suffix(layer: int, direction: int) -> str:
        return f"_l{layer}" + ("_reverse" if direction == 1 else "")

    def reset_biases(self) -> None:
        """``U(-1/√h, 1/√h)``, PyTorch's default for recurrent biases."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for name, p in self.named_parameters(recurse=False):
            if name.startswith("bias_"):
                nn.init.uniform_(p, -bound, bound)

    def _bias(self, kind: str, sfx: str) -> Tensor | None:
        return getattr(self, f"bias_{kind}{sfx}") if self.bias else None

    def _check_state(self, state: Tensor, batch: int, name: str) -> None:
        expected = (self.num_layers * self.num_directions, batch, self.hidden_size)
        if tuple(state.shape) != expected:
            raise ValueError(f"Invalid {name}: expected shape {expected}, got {tuple(state.shape)}")

    def _step(self, gi: Tensor, gh: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if self.mode == "LSTM":
            assert c is not None
            i, f, g, o = (gi + gh).chunk(4, dim=-1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c_new), c_new
        ir, iz, inn = gi.chunk(3, dim=-1)
        hr, hz, hn = gh.chunk(3, dim=-1)
        r = torch.sigmoid(ir + hr)
        z = torch.sigmoid(iz + hz)
        n = torch.tanh(inn + r * hn)
        return (1.0 - z) * n + z * h, None

    def forward(self, input: Tensor, hx: State | None = None) -> tuple[Tensor, State]:
        """Run the sequence.

        Args:
            input: ``(L, N, d_in)`` (``(N, L, d_in)`` if ``batch_first``) or unbatched ``(L, d_in)``.
            hx: Initial state(s) of shape ``(D * num_layers, N, h)`` (``(D * num_layers, h)`` unbatched), a
                pair
                ``(h_0, c_0)`` for LSTM; zeros when ``None``.

        Returns:
            ``output`` ``(L, N, D h)`` (batch_first: ``(N, L, D h)``) and ``h_n`` (LSTM: ``(h_n, c_n)``).
        """
        if input.ndim not in (2, 3) or input.shape[-1] != self.input_size:
            raise ValueError(
                f"Invalid input: expected (L, N, {self.input_size}), "
                f"(N, L, {self.input_size}) with batch_first, "
                f"or unbatched (L, {self.input_size}); got {tuple(input.shape)}"
            )
        unbatched = input.ndim == 2
        x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if self.batch_first else input)
        seq_len = x.shape[0]
        h0, c0 = self._initial_state(hx, x, unbatched)
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self.num_directions):
                k = layer * self.num_directions + direction
                sfx = self._suffix(layer, direction)
                gi = self.weights[f"weight_ih{sfx}"](x)
                b_ih, b_hh = self._bias("ih", sfx), self._bias("hh", sfx)
                if b_ih is not None:
                    gi = gi + b_ih
                w_hh = self.weights[f"weight_hh{sfx}"]
                h, c = h0[k], (c0[k] if c0 is not None else None)
                steps: list[Tensor] = [x.new_empty(0)] * seq_len
                order = range(seq_len - 1, -1, -1) if direction == 1 else range(seq_len)
                for t in order:
                    gh = w_hh(h)
                    if b_hh is not None:
                        gh = gh + b_hh
                    h, c = self._step(gi[t], gh, h, c)
                    steps[t] = h
                outputs.append(torch.stack(steps))
                h_n.append(h)
                if c is not None:
                    c_n.append(c)
            x = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, p=self.dropout, training=True)
        out = x.squeeze(1) if unbatched else (x.transpose(0, 1) if self.batch_first else x)
        hn = torch.stack(h_n)
        if unbatched:
            hn = hn.squeeze(1)
        if self.mode == "GRU":
            return out, hn
        cn = torch.stack(c_n)
        return out, (hn, cn.squeeze(1) if unbatched else cn)

    def _initial_state(self, hx: State | None, x: Tensor, unbatched: bool) -> tuple[Tensor, Tensor | None]:
        batch = x.shape[1]
        shape = (self.num_layers * self.num_directions, batch, self.hidden_size)
        if hx is None:
            zeros = x.new_zeros(shape)
            return zeros, (zeros if self.mode == "LSTM" else None)
        if self.mode == "LSTM":
            if not isinstance(hx, tuple) or len(hx) != 2:
                raise ValueError("Invalid hx: LSTM expects a pair (h_0, c_0)")
            h0, c0 = hx
            if unbatched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
            self._check_state(h0, batch, "h_0")
            self._check_state(c0, batch, "c_0")
            return h0, c0
        if not isinstance(hx, Tensor):
            raise ValueError("Invalid hx: GRU expects a single tensor h_0")
        h0 = hx.unsqueeze(1) if unbatched else hx
        self._check_state(h0, batch, "h_0")
        return h0, None

    def extra_repr(self) -> str:
        return (
            f"{self.mode}({self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
            f"bias={self.bias}, "
            f"batch_first={self.batch_first}, dropout={self.dropout}, bidirectional={self.bidirectional})"
        )


class KronRNNBase(StructuredRNN):
    """Common part of :class:`KronLSTM` and :class:`KronGRU`: Kronecker weights, conversion to and from dense.

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, device, dtype: As for
            ``nn.LSTM`` / ``nn.GRU``.
        compression: Target ratio for every weight matrix (closest near-square split, see
            :func:`~kronfac.nn.factorize.kron_shapes`).
        factors: Explicit ``((m1, n1), (m2, n2))`` per weight name (``"weight_ih_l0"``, ``"weight_hh_l0"``,
            ``"weight_ih_l0_reverse"``, ...); names not given fall back to ``compression``.
        tolerance: How far (as a factor) the achieved compression of one matrix may be from ``compression``.

    Raises:
        ValueError: If a weight has neither explicit factors nor a compression, or its shape cannot be
            factored.
    """

    _mode: Mode

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        *,
        compression: float | None = None,
        factors: Mapping[str, KronShape] | None = None,
        tolerance: float = DEFAULT_TOLERANCE,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        explicit = dict(factors or {})
        used: set[str] = set()

        def make_weight(name: str, out_features: int, in_features: int) -> nn.Module:
            if name in explicit:
                shape = check_shape(out_features, in_features, explicit[name])
                used.add(name)
            elif compression is not None:
                try:
                    shape = kron_shapes(out_features, in_features, compression, tolerance=tolerance)
                except ValueError as err:
                    raise ValueError(f"{name}: {err}") from err
            else:
                raise ValueError(f"{name}: pass compression=<ratio> or factors={{{name!r}: ((m1, n1), (m2, n2))}}")
            layer = KronLinear(in_features, out_features, factors=shape, bias=False, device=device, dtype=dtype)
            init_kron_factors(layer.kron_a, layer.kron_b, hidden_size)
            return layer

        super().__init__(
            self._mode,
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            make_weight=make_weight,
            device=device,
            dtype=dtype,
        )
        unknown = set(explicit) - used
        if unknown:
            raise ValueError(f"Invalid factors: unknown weight names {sorted(unknown)}; known: {sorted(self.weights)}")

    def kron_weight(self, name: str) -> KronLinear:
        """The :class:`KronLinear` holding weight ``name`` (e.g. ``"weight_hh_l0"``)."""
        module = self.weights[name]
        assert isinstance(module, KronLinear)
        return module

    def factor_shapes(self) -> dict[str, KronShape]:
        """``{weight name: ((m1, n1), (m2, n2))}``."""
        return {name: self.kron_weight(name).factor_shapes for name in self.weights}

    def _dense_cls(self) -> type[nn.LSTM] | type[nn.GRU]:
        return nn.LSTM if self.mode == "LSTM" else nn.GRU

    def to_dense(self) -> nn.Module:
        """An ``nn.LSTM`` / ``nn.GRU`` with the materialised weights ``A ⊗ B`` and the same biases."""
        ref = next(iter(self.parameters()))
        dense = self._dense_cls()(
            self.input_size,
            self.hidden_size,
            self.num_layers,
            bias=self.bias,
            batch_first=self.batch_first,
            dropout=self.dropout,
            bidirectional=self.bidirectional,
            device=ref.device,
            dtype=ref.dtype,
        )
        with torch.no_grad():
            for name in self.weights:
                getattr(dense, name).copy_(self.kron_weight(name).dense_weight())
            for name, p in self.named_parameters(recurse=False):
                getattr(dense, name).copy_(p)
        return dense

    @classmethod
    def from_dense(
        cls,
        rnn: nn.Module,
        *,
        compression: float | None = None,
        factors: Mapping[str, KronShape] | None = None,
        tolerance: float = DEFAULT_TOLERANCE,
    ) -> tuple[KronRNNBase, dict[str, float]]:
        """Nearest-Kronecker conversion of a trained ``nn.LSTM`` (for :class:`KronLSTM`) or ``nn.GRU``.

        Returns:
            The new module (same configuration, device and dtype; biases copied) and
            ``{weight name: relative Frobenius error}``.

        Raises:
            ValueError: If ``rnn`` is of the wrong type or uses ``proj_size``.
        """
        dense_cls = nn.LSTM if cls._mode == "LSTM" else nn.GRU
        if type(rnn) is not dense_cls:
            raise ValueError(f"Invalid rnn: {cls.__name__}.from_dense expects nn.{cls._mode}, got {type(rnn)}")
        assert isinstance(rnn, nn.LSTM | nn.GRU)
        if getattr(rnn, "proj_size", 0):
            raise ValueError("Invalid rnn: proj_size > 0 is not supported")
        ref = next(rnn.parameters())
        kron = cls(
            rnn.input_size,
            rnn.hidden_size,
            rnn.num_layers,
            rnn.bias,
            rnn.batch_first,
            float(rnn.dropout),
            rnn.bidirectional,
            compression=compression,
            factors=factors,
            tolerance=tolerance,
            device=ref.device,
            dtype=ref.dtype,
        )
        errors = {}
        with torch.no_grad():
            for name in kron.weights:
                layer = kron.kron_weight(name)
                a, b, errors[name] = nearest_kronecker(getattr(rnn, name), layer.factor_shapes)
                layer.kron_a.copy_(a)
                layer.kron_b.copy_(b)
            for name, p in kron.named_parameters(recurse=False):
                p.copy_(getattr(rnn, name))
        return kron, errors


class KronLSTM(KronRNNBase):
    """``nn.LSTM`` with Kronecker-product weights. See :class:`KronRNNBase` for the extra arguments."""

    _mode: Mode = "LSTM"


class KronGRU(KronRNNBase):
    """``nn.GRU`` with Kronecker-product weights. See :class:`KronRNNBase` for the extra arguments."""

    _mode: Mode = "GRU"
