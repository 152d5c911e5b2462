"""KronA: Kronecker-product adapters for parameter-efficient fine-tuning.

An adapter adds ``ΔW x = s (A ⊗ B) x`` (``A`` ``(m1, n1)``, ``B`` ``(m2, n2)``, ``m1 m2 = d_out``, ``n1 n2
= d_in``)
computed by :func:`~kronfac.nn.kron.kron_matvec`; ``A`` starts at zero so the model is unchanged at
initialisation. Unlike a rank-``r`` LoRA update, ``rank(A ⊗ B) = rank(A) rank(B)`` can be full at the same
parameter count. Variants (Edalati et al. 2022):

- ``"krona"``: parallel to one ``nn.Linear``: ``y = W x + b + s (A ⊗ B) x``. Mergeable into ``W`` after
training.
- ``"krona_block"`` (KronA^B): parallel to a whole block ``f`` (e.g. a transformer FFN):
  ``y = f(x) + s (A ⊗ B) x``. Not mergeable (``f`` is nonlinear).
- ``"krona_block_res"`` (KronA^B_res): KronA^B plus a learnable scaled residual, ``y = f(x) + s (A ⊗ B) x +
r x``
  with the scalar ``r`` starting at 0 (our choice, so that outputs are unchanged at init); needs ``d_in =
  d_out``.

Reference:
    A. Edalati et al., "KronA: Parameter efficient tuning with Kronecker adapter", arXiv:2212.10650 (2022).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from kronfac.nn.factorize import KronShape, check_shape, kron_shape_options
from kronfac.nn.kron import kron_matvec

__all__ = [
    "AdapterReport",
    "FactorSpec",
    "KronABlock",
    "KronALinear",
    "KronAdapter",
    "Variant",
    "adapter_features",
    "adapter_modules",
    "adapter_report",
    "add_kron_adapters",
    "check_scale",
    "make_wrapper",
    "set_module",
    "wrap_module",
]

Variant = Literal["krona", "krona_block", "krona_block_res"]
VARIANTS: tuple[str, ...] = ("krona", "krona_block", "krona_block_res")
#: ``None`` (most compact near-square split), ``k`` (``A`` is ``k x k``),
#: or explicit ``((m1, n1), (m2, n2))``.
FactorSpec = int | KronShape | None


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


class KronAdapter(nn.Module):
    """The trainable part ``x ↦ s (A ⊗ B) x (+ r x)``.

    Args:
        in_features: ``d_in``.
        out_features: ``d_out``.
        factors: ``((m1, n1), (m2, n2))``.
        scale: ``s``, a fixed multiplier (like LoRA's ``alpha / r``): finite, non-zero, and held by ``dtype``
            (with ``s = 0`` the adapter could never train; a negative ``s`` is the same as negating ``A``).
        residual: Add the learnable scalar residual ``r x`` (KronA^B_res); needs ``d_in = d_out``.
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
        residual: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        (m1, n1), (m2, n2) = check_shape(out_features, in_features, factors)
        if residual and in_features != out_features:
            raise ValueError(
                "Invalid variant: the residual of krona_block_res needs in == out features, "
                f"got {in_features} -> {out_features}; use variant='krona_block'"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.factor_shapes: KronShape = ((m1, n1), (m2, n2))
        self.scale = check_scale(scale, dtype or torch.get_default_dtype())
        self.kron_a = nn.Parameter(torch.zeros(m1, n1, device=device, dtype=dtype))
        self.kron_b = nn.Parameter(torch.empty(m2, n2, device=device, dtype=dtype))
        bound = 1.0 / math.sqrt(n2)  # LoRA-style Kaiming-uniform bound for the non-zero factor
        nn.init.uniform_(self.kron_b, -bound, bound)
        self.res_scale: nn.Parameter | None = (
            nn.Parameter(torch.zeros((), device=device, dtype=dtype)) if residual else None
        )

    def forward(self, x: Tensor) -> Tensor:
        y = self.scale * kron_matvec(self.kron_a, self.kron_b, x)
        return y if self.res_scale is None else y + self.res_scale * x

    def delta_weight(self) -> Tensor:
        """``s (A ⊗ B)`` as a dense ``(d_out, d_in)`` matrix."""
        return self.scale * torch.kron(self.kron_a, self.kron_b)


class KronALinear(nn.Module):
    """``nn.Linear`` plus a parallel KronA adapter; :meth:`merge` folds ``ΔW`` into the base weight."""

    variant: str = "krona"

    def __init__(self, base: nn.Linear, adapter: KronAdapter) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        return y if self.merged else y + self.adapter(x)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``ΔW`` into the base weight (``W <- W + ΔW``); forward then skips the adapter."""
        if not self.merged:
            self.base.weight.add_(self.adapter.delta_weight().to(self.base.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (``W <- W - ΔW``)."""
        if self.merged:
            self.base.weight.sub_(self.adapter.delta_weight().to(self.base.weight.dtype))
            self.merged = False


class KronABlock(nn.Module):
    """A whole block ``f`` plus a parallel adapter on the block's input (KronA^B / KronA^B_res)."""

    merged = False

    def __init__(self, base: nn.Module, adapter: KronAdapter, variant: str) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.variant = variant

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self.base(x, *args, **kwargs) + self.adapter(x)


AdapterWrapper = KronALinear | KronABlock


@dataclass(frozen=True, kw_only=True)
class AdapterEntry:
    """One adapted module: its name, variant, factor shapes, scale and adapter parameter count."""

    name: str
    variant: str
    in_features: int
    out_features: int
    factor_shapes: KronShape
    scale: float
    params: int


@dataclass(kw_only=True)
class AdapterReport:
    """Trainable-parameter report; ``str(report)`` is a markdown table."""

    adapters: list[AdapterEntry] = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def __str__(self) -> str:
        lines = ["| module | variant | A | B | adapter params |", "|---|---|---|---|---:|"]
        for a in self.adapters:
            lines.append(f"| {a.name} | {a.variant} | {a.factor_shapes[0]} | {a.factor_shapes[1]} | {a.params} |")
        lines.append(
            f"\ntrainable: {self.trainable_params} / {self.total_params} ({100 * self.trainable_fraction:.3f}%)"
        )
        return "\n".join(lines)


def adapter_modules(model: nn.Module) -> dict[str, AdapterWrapper]:
    """``{qualified name: wrapper}`` for every adapter in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, KronALinear | KronABlock)}


def adapter_report(model: nn.Module) -> AdapterReport:
    """Recount adapters and trainable parameters of ``model`` (e.g. after unfreezing a head)."""
    entries = [
        AdapterEntry(
            name=name,
            variant=w.variant,
            in_features=w.adapter.in_features,
            out_features=w.adapter.out_features,
            factor_shapes=w.adapter.factor_shapes,
            scale=w.adapter.scale,
            params=sum(p.numel() for p in w.adapter.parameters()),
        )
        for name, w in adapter_modules(model).items()
    ]
    return AdapterReport(
        adapters=entries,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in model.parameters()),
    )


def _target_matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target) or fnmatch.fnmatchcase(name, target)


def adapter_features(name: str, module: nn.Module, variant: str) -> tuple[int, int]:
    """``(d_in, d_out)`` of an adapter of ``variant`` on ``model.<name>``, or ``ValueError`` if it cannot have one.

    ``"krona"`` needs an ``nn.Linear``; block variants read the features from the module's first and last
    ``nn.Linear``, and ``"krona_block_res"`` needs ``d_in = d_out``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"Invalid variant: {variant!r}; allowed: {VARIANTS}")
    if isinstance(module, KronALinear | KronABlock):
        raise ValueError(f"{name!r} already has an adapter; call remove_adapters first")
    if variant == "krona" and not isinstance(module, nn.Linear):
        raise ValueError(
            f"Cannot add a 'krona' adapter to {name!r}: it is {type(module).__name__}, not nn.Linear; "
            "target Linear layers, or use variant='krona_block' for whole blocks"
        )
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            f"Cannot add a block adapter to {name!r} ({type(module).__name__}): no nn.Linear inside to "
            "infer the input and output features (first Linear's in_features, last Linear's out_features)"
        )
    d_in, d_out = linears[0].in_features, linears[-1].out_features
    if variant == "krona_block_res" and d_in != d_out:
        raise ValueError(
            f"{name!r}: krona_block_res needs in == out features, got {d_in} -> {d_out}; use 'krona_block'"
        )
    return d_in, d_out


def adapter_dtype(module: nn.Module) -> torch.dtype:
    """The dtype an adapter on ``module`` gets: that of its first parameter (torch's default without one)."""
    ref = next(module.parameters(), None)
    return ref.dtype if ref is not None else torch.get_default_dtype()


def default_factors(out_features: int, in_features: int) -> KronShape:
    """Most compact split (fewest ``m1 n1 + m2 n2``), ties to the highest reachable rank, then larger
    ``A``."""
    options = kron_shape_options(out_features, in_features)
    if not options:
        raise ValueError(f"A ({out_features} x {in_features}) weight has no non-trivial Kronecker split")
    return min(options, key=lambda o: (o.params, -o.max_rank, -o.shape[0][0])).shape


def resolve_adapter_factors(name: str, out_features: int, in_features: int, spec: FactorSpec) -> KronShape:
    """Turn a :data:`FactorSpec` into shapes for one module, with errors naming the module."""
    try:
        if spec is None:
            return default_factors(out_features, in_features)
        if isinstance(spec, int):
            if spec < 1 or out_features % spec or in_features % spec:
                raise ValueError(
                    f"Invalid factors: {spec}; A = ({spec}, {spec}) needs {spec} to divide both "
                    f"out_features={out_features} and in_features={in_features}"
                )
            return (spec, spec), (out_features // spec, in_features // spec)
        return check_shape(out_features, in_features, spec)
    except ValueError as err:
        raise ValueError(f"{name!r}: {err}") from err


def _spec_for(name: str, factors: FactorSpec | Mapping[str, FactorSpec]) -> FactorSpec:
    if isinstance(factors, Mapping):
        for pattern, spec in factors.items():
            if _target_matches(name, pattern):
                return spec
        return None
    return factors


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at ``model.<name>`` (``name`` non-empty: the root cannot replace itself)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def make_wrapper(name: str, module: nn.Module, variant: str, factors: KronShape, scale: float) -> AdapterWrapper:
    """A new adapter of the given variant and shapes around ``module`` (``model.<name>``), not yet in the model.

    The adapter lives on the device and in the dtype of ``module``'s first parameter, in its train/eval mode.
    """
    d_in, d_out = adapter_features(name, module, variant)
    ref = next(module.parameters(), None)
    kw: dict[str, Any] = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    try:
        adapter = KronAdapter(d_in, d_out, factors=factors, scale=scale, residual=variant == "krona_block_res", **kw)
    except ValueError as err:
        raise ValueError(f"{name!r}: {err}") from err
    wrapper: AdapterWrapper
    if variant == "krona":
        assert isinstance(module, nn.Linear)  # adapter_features refuses anything else
        wrapper = KronALinear(module, adapter)
    else:
        wrapper = KronABlock(module, adapter, variant)
    # The new modules follow the wrapped one's train/eval mode (train() would also reset the base's children).
    wrapper.training = module.training
    adapter.train(module.training)
    return wrapper


def wrap_module(model: nn.Module, name: str, variant: str, factors: KronShape, scale: float) -> AdapterWrapper:
    """Wrap ``model.<name>`` in place with an adapter of the given variant and shapes (no freezing)."""
    if not name:
        raise ValueError("Invalid module name: empty; the model itself cannot be wrapped (it would contain itself)")
    wrapper = make_wrapper(name, model.get_submodule(name), variant, factors, scale)
    set_module(model, name, wrapper)
    return wrapper


def add_kron_adapters(
    model: nn.Module,
    *,
    target_modules: Iterable[str],
    factors: FactorSpec | Mapping[str, FactorSpec] = None,
    variant: Variant = "krona",
    scale: float = 1.0,
    trainable: Iterable[str] = (),
) -> AdapterReport:
    """Freeze ``model`` and add KronA adapters to the target modules, in place.

    Args:
        model: The pretrained model.
        target_modules: Module names; a target matches a module whose qualified name equals it, ends with
            ``"." + target`` (PEFT's rule), or matches it as an ``fnmatch`` pattern. For ``"krona"`` every
            match
            must be an ``nn.Linear``; block variants take any module mapping ``(..., d_in) -> (..., d_out)``
            (features read from its first and last ``nn.Linear``).
        factors: Shapes of ``A`` and ``B``: ``None`` (most compact near-square split), ``k`` (``A`` is
            ``k x k``, ``B`` the rest), ``((m1, n1), (m2, n2))``, or a mapping from target pattern to one
            of these.
        variant: ``"krona"``, ``"krona_block"`` or ``"krona_block_res"`` (see the module docstring).
        scale: ``s`` multiplying ``A ⊗ B``; a finite non-zero number (as for :class:`KronAdapter`).
        trainable: Extra module names/patterns (same matching) whose parameters stay trainable, e.g. a new
            head.
            They are not written by ``save_adapters``.

    Returns:
        The :class:`AdapterReport` (adapters, trainable and total parameters).

    Raises:
        ValueError: For an unknown variant, a target that matches nothing or has the wrong type, factors that
            do not fit, an invalid scale, or a module that already has an adapter. The model is unchanged when
            this is raised.
    """
    if variant not in VARIANTS:
        raise ValueError(f"Invalid variant: {variant!r}; allowed: {VARIANTS}")
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if not targets:
        raise ValueError("Invalid target_modules: empty")
    names = [n for n, _ in model.named_modules() if n and any(_target_matches(n, t) for t in targets)]
    unmatched = [t for t in targets if not any(_target_matches(n, t) for n in names)]
    if unmatched:
        raise ValueError(f"Invalid target_modules: {unmatched} match no module of the model")
    # Outermost matches only: a block that matches swallows the Linear layers inside it.
    names = [n for n in names if not any(n.startswith(o + ".") for o in names)]
    plan = []
    for name in names:
        module = model.get_submodule(name)
        d_in, d_out = adapter_features(name, module, variant)
        try:
            check_scale(scale, adapter_dtype(module))
        except ValueError as err:
            raise ValueError(f"{name!r}: {err}") from err
        plan.append((name, resolve_adapter_factors(name, d_out, d_in, _spec_for(name, factors))))
    for p in model.parameters():
        p.requires_grad_(False)
    for name, shape in plan:
        wrap_module(model, name, variant, shape, scale)
    for wrapper in adapter_modules(model).values():
        for p in wrapper.adapter.parameters():
            p.requires_grad_(True)
    extra = list(trainable)
    for name, module in model.named_modules():
        if extra and name and any(_target_matches(name, t) for t in extra):
            for p in module.parameters():
                p.requires_grad_(True)
    return adapter_report(model)
