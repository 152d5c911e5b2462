"""KronA: Kronecker-product adapters for parameter-efficient fine-tuning, the modules.

An adapter adds ``ΔW x = s (A ⊗ B) x`` (``A`` ``(m1, n1)``, ``B`` ``(m2, n2)``, ``m1 m2 = d_out``,
``n1 n2 = d_in``); ``A`` starts at zero so the model is unchanged at initialisation. Unlike a rank-``r`` LoRA
update, ``rank(A ⊗ B) = rank(A) rank(B)`` can be full at the same parameter count. Variants (Edalati et al.
2022):

- ``"krona"``: parallel to one linear layer (``nn.Linear`` or transformers' ``Conv1D``):
  ``y = W x + b + s (A ⊗ B) x``. Mergeable into ``W`` after training.
- ``"krona_block"`` (KronA^B): parallel to a whole block ``f`` (e.g. a transformer FFN):
  ``y = f(x) + s (A ⊗ B) x``. Not mergeable (``f`` is nonlinear).
- ``"krona_block_res"`` (KronA^B_res): KronA^B plus a learnable scaled residual, ``y = f(x) + s (A ⊗ B) x + r x``
  with the scalar ``r`` starting at 0 (our choice, so that outputs are unchanged at init); needs ``d_in = d_out``.

Each factor is a :class:`KronFactor` module (a bias-free linear map), so that kronfac's optimizers can
precondition it like any linear layer (:mod:`kronfac.layers.krona` derives its Kronecker factors). A module
with adapters is a host (:class:`KronALinear`, :class:`KronABlock`) that keeps named adapters, PEFT-style: one
or more active, the others frozen and unused; :class:`ModulesToSave` keeps a trained copy of a module (a new
head) per adapter. Injection is :mod:`kronfac.nn.adapter_inject`, the model-level operations
:mod:`kronfac.nn.adapter_ops`, files :mod:`kronfac.nn.adapter_files`.

Reference:
    A. Edalati et al., "KronA: Parameter efficient tuning with Kronecker adapter", arXiv:2212.10650 (2022).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kronfac.nn.factorize import KronShape, check_shape
from kronfac.nn.kron import kron_matvec

__all__ = [
    "VARIANTS",
    "AdapterEntry",
    "AdapterHost",
    "AdapterReport",
    "KronABlock",
    "KronALinear",
    "KronAdapter",
    "KronFactor",
    "ModulesToSave",
    "Variant",
    "adapter_hosts",
    "adapter_modules",
    "adapter_report",
    "check_scale",
    "linear_layout",
    "saved_modules",
]

Variant = Literal["krona", "krona_block", "krona_block_res"]
VARIANTS: tuple[str, ...] = ("krona", "krona_block", "krona_block_res")
#: transformers' GPT-2 projection (``y = x W + b``, ``W`` stored ``(d_in, d_out)``), matched by qualified name so
#: that kronfac never imports transformers.
CONV1D = "transformers.pytorch_utils.Conv1D"


def check_scale(scale: object, dtype: torch.dtype | None = None) -> float:
    """``scale`` as a float if it can be the ``s`` of ``ΔW = s (A ⊗ B)`` (in ``dtype``, if given); else ``ValueError``.

    ``s`` must be a finite number (one that ``dtype`` can hold, if given), and non-zero: with ``s = 0``, ``ΔW``
    and the gradients of ``A`` and ``B`` (both proportional to ``s``) are zero, so the adapter does nothing and
    can never train. A negative ``s`` is allowed: ``s (A ⊗ B) = |s| ((-A) ⊗ B)``.
    """
    if isinstance(scale, bool) or not isinstance(scale, int | float):
        raise ValueError(f"Invalid scale: {scale!r}; must be a number (int or float)")
    value = float(scale)
    if not math.isfinite(value):
        raise ValueError(f"Invalid scale: {value}; must be finite")
    if value == 0:
        raise ValueError(
            "Invalid scale: 0; must be non-zero (s = 0 makes ΔW = s (A ⊗ B) and the gradients of A and B zero, "
            "so the adapter could never train)"
        )
    if dtype is not None and abs(value) > torch.finfo(dtype).max:
        raise ValueError(f"Invalid scale: {value:g}; overflows {dtype} (largest {torch.finfo(dtype).max:.4g})")
    return value


def linear_layout(module: nn.Module) -> tuple[int, int, bool] | None:
    """``(d_in, d_out, transposed)`` of an ``nn.Linear`` or a transformers ``Conv1D`` (weight stored
    ``(d_in, d_out)``: ``transposed``); ``None`` for any other module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if any(f"{c.__module__}.{c.__qualname__}" == CONV1D for c in type(module).__mro__):
        weight = module.weight
        assert isinstance(weight, Tensor)
        d_in, d_out = weight.shape
        return int(d_in), int(d_out), True
    return None


class KronFactor(nn.Module):
    """One factor of a KronA adapter: the bias-free linear map ``u ↦ F u`` on the last axis (``F`` is
    ``weight``, ``(out_features, in_features)``). Its Kronecker factors: ``kronfac.layers.krona``."""

    def __init__(
        self,
        out_features: int,
        in_features: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}"


def _watched(module: nn.Module) -> bool:
    """Whether a hook looks at ``module``'s forward (the curvature capture does, on curvature steps only)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


class KronAdapter(nn.Module):
    """The trainable part ``x ↦ s (A ⊗ B) x (+ r x)``, with ``A`` = ``kron_a.weight``, ``B`` = ``kron_b.weight``.

    The forward computes ``Y = s A X Bᵀ`` (``X`` = ``x`` reshaped ``(n1, n2)``, ``y = vec(Y)``) by
    :func:`~kronfac.nn.kron.kron_matvec` in its cheaper order. While a hook watches a factor (the curvature
    capture), it computes ``Y`` so that each factor's module is applied last: ``A`` to the columns of ``X Bᵀ``
    and ``B`` to the rows of ``A X``, both outputs being ``Y`` itself. The value is that of ``A (X Bᵀ)``; the
    second path adds ``Y_B - stopgrad(Y_B) = 0`` and carries only the gradient of ``B``, so every gradient is
    exact and each factor's hooks see its own input rows and the output gradient ``∂L/∂Y``.

    Args:
        in_features: ``d_in``.
        out_features: ``d_out``.
        factors: ``((m1, n1), (m2, n2))``.
        scale: ``s``, a fixed multiplier (like LoRA's ``alpha / r``): finite, non-zero, and held by ``dtype``
            (with ``s = 0`` the adapter could never train; a negative ``s`` is the same as negating ``A``).
        variant: ``"krona"``, ``"krona_block"`` or ``"krona_block_res"``; the last adds the learnable scalar
            ``r x`` and needs ``d_in = d_out``.
        device: Device of the parameters.
        dtype: Dtype of the parameters.

    Raises:
        ValueError: If the factors do not fit, the residual has ``d_in != d_out``, or the scale is invalid.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        factors: KronShape,
        scale: float = 1.0,
        variant: str = "krona",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"Invalid variant: {variant!r}; allowed: {VARIANTS}")
        (m1, n1), (m2, n2) = check_shape(out_features, in_features, factors)
        if variant == "krona_block_res" and in_features != out_features:
            raise ValueError(
                "Invalid variant: the residual of krona_block_res needs in == out features, "
                f"got {in_features} -> {out_features}; use variant='krona_block'"
            )
        self.variant = variant
        self.in_features = in_features
        self.out_features = out_features
        self.factor_shapes: KronShape = ((m1, n1), (m2, n2))
        self.scale = check_scale(scale, dtype or torch.get_default_dtype())
        self.kron_a = KronFactor(m1, n1, device=device, dtype=dtype)  # zero: ΔW = 0 at initialisation
        self.kron_b = KronFactor(m2, n2, device=device, dtype=dtype)
        bound = 1.0 / math.sqrt(n2)  # LoRA-style Kaiming-uniform bound for the non-zero factor
        nn.init.uniform_(self.kron_b.weight, -bound, bound)
        self.res_scale: nn.Parameter | None = (
            nn.Parameter(torch.zeros((), device=device, dtype=dtype)) if variant == "krona_block_res" else None
        )

    def forward(self, x: Tensor) -> Tensor:
        if _watched(self.kron_a) or _watched(self.kron_b):
            y = self._per_factor(x)
        else:
            y = kron_matvec(self.kron_a.weight, self.kron_b.weight, x)
        y = self.scale * y
        return y if self.res_scale is None else y + self.res_scale * x

    def _per_factor(self, x: Tensor) -> Tensor:
        """``A X Bᵀ`` with each factor's module applied last (see the class docstring); the factors see
        ``(N, L, P, d)``: batch, sequence positions (1 without), the other factor's side, features."""
        (m1, n1), (m2, n2) = self.factor_shapes
        a, b = self.kron_a.weight, self.kron_b.weight
        rows = x.reshape(x.shape[0] if x.ndim > 1 else 1, -1, n1, n2)
        xb = rows @ b.detach().T  # X Bᵀ, (N, L, n1, m2): its gradient reaches x, not B
        y = self.kron_a(xb.transpose(-1, -2)).transpose(-1, -2)  # A (X Bᵀ), (N, L, m1, m2)
        y_b = self.kron_b(a.detach() @ rows.detach())  # (A X) Bᵀ: the same value, the gradient of B only
        y = y + (y_b - y_b.detach())
        return y.reshape(*x.shape[:-1], m1 * m2)

    def delta_weight(self) -> Tensor:
        """``s (A ⊗ B)`` as a dense ``(d_out, d_in)`` matrix."""
        return self.scale * torch.kron(self.kron_a.weight, self.kron_b.weight)


class AdapterHost(nn.Module):
    """A module with named adapters beside it: ``base``, ``adapters`` (name -> :class:`KronAdapter`), which of
    them are active, whether all are disabled, and which are merged into ``base``'s weight."""

    variant_kind: str = ""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def adapter(self) -> KronAdapter:
        """The one active adapter (``ValueError`` if none or several are active)."""
        if len(self.active_adapters) != 1:
            raise ValueError(f"{len(self.active_adapters)} adapters are active ({self.active_adapters}); pick one")
        adapter = self.adapters[self.active_adapters[0]]
        assert isinstance(adapter, KronAdapter)
        return adapter

    def delta(self, x: Tensor) -> Tensor | None:
        """The sum of the active, unmerged adapters' outputs (``None``: nothing to add)."""
        if self.disabled:
            return None
        out = None
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                y = self.adapters[name](x)
                out = y if out is None else out + y
        return out


class KronALinear(AdapterHost):
    """A linear layer (``nn.Linear`` or transformers' ``Conv1D``) plus parallel KronA adapters; ``merge``
    folds an adapter's ``ΔW`` into the base weight (``merge``)."""

    variant_kind = "krona"

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        delta = self.delta(x)
        return y if delta is None else y + delta

    def _weight_delta(self, name: str) -> Tensor:
        adapter = self.adapters[name]
        assert isinstance(adapter, KronAdapter)
        layout = linear_layout(self.base)
        assert layout is not None
        delta = adapter.delta_weight()
        return (delta.T if layout[2] else delta).to(self._weight().dtype)

    def _weight(self) -> Tensor:
        weight = self.base.weight
        assert isinstance(weight, Tensor)
        return weight

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if name not in self.merged_adapters:
            self._weight().add_(self._weight_delta(name))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        if name in self.merged_adapters:
            self._weight().sub_(self._weight_delta(name))
            self.merged_adapters.remove(name)


class KronABlock(AdapterHost):
    """A whole block ``f`` plus parallel adapters on the block's input (KronA^B / KronA^B_res). A block that
    returns a tuple (transformers' layers) gets the adapters added to its first element."""

    variant_kind = "block"

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.base(x, *args, **kwargs)
        delta = self.delta(x)
        if delta is None:
            return out
        if isinstance(out, tuple):
            return (out[0] + delta, *out[1:])
        return out + delta


class ModulesToSave(nn.Module):
    """A module trained beside the adapters (a new head), PEFT's ``modules_to_save``: the frozen ``original``
    and one trainable copy per adapter in ``copies``; the forward uses the active adapter's copy (the original
    while adapters are disabled or no active adapter has a copy)."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False

    def active_module(self) -> nn.Module:
        if not self.disabled:
            for name in self.active_adapters:
                if name in self.copies:
                    return self.copies[name]
        return self.original

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.active_module()(*args, **kwargs)


def adapter_hosts(model: nn.Module) -> dict[str, AdapterHost]:
    """``{qualified name: host}`` for every module with adapters in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterHost)}


#: The former name (a host used to hold one adapter).
adapter_modules = adapter_hosts


def saved_modules(model: nn.Module) -> dict[str, ModulesToSave]:
    """``{qualified name: wrapper}`` for every module kept by ``modules_to_save``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ModulesToSave)}


@dataclass(frozen=True, kw_only=True)
class AdapterEntry:
    """One adapter of one module: names, variant, factor shapes, scale and parameter count."""

    name: str
    adapter: str
    variant: str
    in_features: int
    out_features: int
    factor_shapes: KronShape
    scale: float
    params: int
    active: bool


@dataclass(kw_only=True)
class AdapterReport:
    """Trainable-parameter report; ``str(report)`` is a markdown table."""

    adapters: list[AdapterEntry] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def __str__(self) -> str:
        lines = ["| module | adapter | variant | A | B | params | active |", "|---|---|---|---|---|---:|---|"]
        for a in self.adapters:
            shapes = f"{a.factor_shapes[0]} | {a.factor_shapes[1]}"
            lines.append(f"| {a.name} | {a.adapter} | {a.variant} | {shapes} | {a.params} | {a.active} |")
        if self.modules_to_save:
            lines.append(f"\nmodules_to_save: {', '.join(self.modules_to_save)}")
        lines.append(
            f"\ntrainable: {self.trainable_params} / {self.total_params} ({100 * self.trainable_fraction:.3f}%)"
        )
        return "\n".join(lines)


def adapter_report(model: nn.Module) -> AdapterReport:
    """Recount adapters and trainable parameters of ``model`` (e.g. after :func:`set_adapter`)."""
    entries = []
    for name, host in adapter_hosts(model).items():
        for key, adapter in host.adapters.items():
            assert isinstance(adapter, KronAdapter)
            entries.append(
                AdapterEntry(
                    name=name,
                    adapter=key,
                    variant=adapter.variant,
                    in_features=adapter.in_features,
                    out_features=adapter.out_features,
                    factor_shapes=adapter.factor_shapes,
                    scale=adapter.scale,
                    params=sum(p.numel() for p in adapter.parameters()),
                    active=key in host.active_adapters and not host.disabled,
                )
            )
    return AdapterReport(
        adapters=entries,
        modules_to_save=list(saved_modules(model)),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in model.parameters()),
    )
