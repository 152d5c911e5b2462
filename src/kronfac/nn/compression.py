"""``compress``: replace trained ``nn.Linear`` / ``nn.LSTM`` / ``nn.GRU`` modules by nearest Kronecker
products.

Every weight ``W`` becomes the ``A ⊗ B`` nearest in Frobenius norm (Van Loan-Pitsianis rank-1 SVD, see
:func:`~kronfac.nn.factorize.nearest_kronecker`); biases are copied. The result is ready to fine-tune. The
report lists, per replaced module, dense and Kronecker parameter counts and the relative reconstruction error.

Reference:
    U. Thakker et al., "Compressing RNNs for IoT devices by 15-38x using Kronecker products",
    arXiv:1906.02876.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from kronfac.nn.factorize import DEFAULT_TOLERANCE, kron_shapes
from kronfac.nn.kron_linear import KronLinear
from kronfac.nn.rnn import KronGRU, KronLSTM, KronRNNBase

__all__ = ["CompressionReport", "LayerCompression", "compress"]

_SUPPORTED = (nn.Linear, nn.LSTM, nn.GRU)


@dataclass(frozen=True, kw_only=True)
class LayerCompression:
    """One replaced module.

    Attributes:
        name: Qualified module name in the model.
        kind: ``"Linear"``, ``"LSTM"`` or ``"GRU"``.
        dense_params: Parameters before (weights and biases).
        kron_params: Parameters after (factors and biases).
        rel_error: ``‖W - A ⊗ B‖_F / ‖W‖_F`` over all weight matrices of the module together.
        factor_shapes: ``{weight name: ((m1, n1), (m2, n2))}``.
    """

    name: str
    kind: str
    dense_params: int
    kron_params: int
    rel_error: float
    factor_shapes: dict[str, tuple[tuple[int, int], tuple[int, int]]]

    @property
    def compression(self) -> float:
        return self.dense_params / self.kron_params


@dataclass(kw_only=True)
class CompressionReport:
    """What :func:`compress` did; ``str(report)`` is a markdown table."""

    layers: list[LayerCompression] = field(default_factory=list)

    @property
    def dense_params(self) -> int:
        return sum(layer.dense_params for layer in self.layers)

    @property
    def kron_params(self) -> int:
        return sum(layer.kron_params for layer in self.layers)

    @property
    def compression(self) -> float:
        return self.dense_params / self.kron_params if self.kron_params else 1.0

    def __str__(self) -> str:
        lines = [
            "| module | kind | dense params | Kronecker params | compression | rel. error |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for x in self.layers:
            lines.append(
                f"| {x.name} | {x.kind} | {x.dense_params} | {x.kron_params} | {x.compression:.1f}x | "
                f"{x.rel_error:.3g} |"
            )
        lines.append(f"| total | | {self.dense_params} | {self.kron_params} | {self.compression:.1f}x | |")
        return "\n".join(lines)


def _matches(name: str, include: Iterable[str] | None) -> bool:
    if include is None:
        return True
    return any(name == pat or fnmatch.fnmatchcase(name, pat) for pat in include)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _convert(name: str, module: nn.Module, compression: float, tolerance: float) -> tuple[nn.Module, LayerCompression]:
    dense_params = sum(p.numel() for p in module.parameters())
    if isinstance(module, nn.Linear):
        try:
            shape = kron_shapes(module.out_features, module.in_features, compression, tolerance=tolerance)
            layer, err = KronLinear.from_linear(module, factors=shape)
        except ValueError as e:
            raise ValueError(f"Cannot compress {name!r}: {e}") from e
        new: nn.Module = layer
        shapes = {"weight": layer.factor_shapes}
        kind = "Linear"
    else:
        cls: type[KronRNNBase] = KronLSTM if isinstance(module, nn.LSTM) else KronGRU
        try:
            rnn, errors = cls.from_dense(module, compression=compression, tolerance=tolerance)
        except ValueError as e:
            raise ValueError(f"Cannot compress {name!r}: {e}") from e
        new = rnn
        shapes = rnn.factor_shapes()
        kind = "LSTM" if isinstance(module, nn.LSTM) else "GRU"
        # Combine per-matrix relative errors into one over all weights of the module.
        norms = {n: float(getattr(module, n).detach().double().norm() ** 2) for n in errors}
        total = sum(norms.values())
        err = math.sqrt(sum(errors[n] ** 2 * norms[n] for n in errors) / total) if total > 0 else 0.0
    report = LayerCompression(
        name=name,
        kind=kind,
        dense_params=dense_params,
        kron_params=sum(p.numel() for p in new.parameters()),
        rel_error=err,
        factor_shapes=shapes,
    )
    return new, report


def compress(
    model: nn.Module,
    *,
    compression: float,
    include: Iterable[str] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> CompressionReport:
    """Replace ``nn.Linear`` / ``nn.LSTM`` / ``nn.GRU`` modules of ``model`` in place by Kronecker versions.

    Args:
        model: The trained model; modified in place (modules are swapped on their parents).
        compression: Target ratio of dense to Kronecker parameters for every weight matrix, > 1.
        include: Qualified module names or ``fnmatch`` patterns (``"encoder.*"``) to compress; ``None`` means
            every supported module. Matching modules of other types raise.
        tolerance: See :func:`~kronfac.nn.factorize.kron_shapes`.

    Returns:
        The per-layer :class:`CompressionReport`.

    Raises:
        ValueError: If a module matched by ``include`` is unsupported, a pattern matches nothing, or a weight
            cannot be factored at ``compression`` (the message names the module).
    """
    if not compression > 1.0:
        raise ValueError(f"Invalid compression: {compression}; must be > 1")
    patterns = list(include) if include is not None else None
    targets: list[tuple[str, nn.Module]] = []
    matched: set[str] = set()
    for name, module in model.named_modules():
        if not name or not _matches(name, patterns):
            continue
        if patterns is not None:
            matched.update(p for p in patterns if name == p or fnmatch.fnmatchcase(name, p))
        if isinstance(module, _SUPPORTED):
            if any(name.startswith(t + ".") for t, _ in targets):
                continue
            targets.append((name, module))
        elif patterns is not None and name in patterns:
            raise ValueError(
                f"Cannot compress {name!r}: {type(module).__name__} is not supported (Linear, LSTM, GRU only)"
            )
    if patterns is not None:
        missing = [p for p in patterns if p not in matched]
        if missing:
            raise ValueError(f"Invalid include: patterns {missing} match no module of the model")
    # Convert everything first so that a failure leaves the model untouched.
    converted = [(name, *_convert(name, module, compression, tolerance)) for name, module in targets]
    report = CompressionReport()
    for name, new, entry in converted:
        _set_module(model, name, new)
        report.layers.append(entry)
    return report
