"""Argument checks and the capture options every kronfac optimizer takes with the same names and defaults.

The checks raise ``ValueError`` naming the argument and its allowed range, as torch.optim does
(``ValueError(f"Invalid learning rate: {lr}")``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, TypeVar

import torch
from torch import Tensor

from kronfac.curvature.block import Approximation
from kronfac.curvature.fisher import FisherType, LossAverage, LossType

__all__ = [
    "CALLABLE",
    "CaptureOptions",
    "Schedule",
    "check_choice",
    "check_positive_int",
    "check_range",
    "resolve",
]

#: Marker stored in a state_dict in place of a callable hyperparameter (callables are kept from the live group).
CALLABLE = "<callable>"

Schedule = float | Callable[[int], float]

E = TypeVar("E", bound=Enum)


def resolve(value: Any, step: int) -> Any:
    """A hyperparameter's value at ``step``: call it if it is a schedule, else return it unchanged."""
    return value(step) if callable(value) else value


def check_range(name: str, value: Any, low: float, high: float = math.inf, *, low_open: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``low <= value <= high`` (``low < value`` if ``low_open``).
    Callables are checked at step 0."""
    checked = resolve(value, 0) if callable(value) else value
    if not isinstance(checked, (int, float)) or isinstance(checked, bool) or math.isnan(checked):
        raise ValueError(f"Invalid {name}: {value!r} (must be a number)")
    below = checked <= low if low_open else checked < low
    if below or checked > high:
        interval = f"{'(' if low_open else '['}{low}, {high}{']' if high != math.inf else ')'}"
        raise ValueError(f"Invalid {name}: {value!r} (must be in {interval})")


def check_positive_int(name: str, value: Any) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an integer >= 1 (bools are refused)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= 1)")


def check_choice(enum: type[E], name: str, value: Any) -> E:
    """``enum(value)``, or ``ValueError`` naming ``name`` and the allowed values."""
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum)
        raise ValueError(f"Invalid {name}: {value!r} (must be one of {allowed})") from None


@dataclass(frozen=True, kw_only=True)
class CaptureOptions:
    """The keyword-only options shared by every kronfac optimizer (same names and defaults everywhere).

    Args:
        param_groups: optional list of dicts (``{"params": [...], "lr": ...}``) over the model's parameters;
            a layer's weight and bias must share a group. Default: all trainable parameters in one group.
        fisher_type: ``"empirical"``, ``"mc"`` (sampled labels) or ``"type2"`` (exact, one backward per class).
        loss: ``"cross_entropy"`` or ``"mse"``: the loss of the model output, used by ``mc``/``type2``.
        loss_average: ``"batch"`` (loss is a mean over the first dim), ``"batch+sequence"`` or ``"sum"``
            (``None`` is ``"sum"``).
        approx: ``"expand"`` or ``"reduce"`` for weight-sharing layers (conv locations, sequence entries).
        mc_samples: sampled labels per input for ``fisher_type="mc"``.
        seed: seed of the label sampler.
        grad_scaler: a ``torch.amp.GradScaler`` whose scale is removed from the captured gradients.
        output_fn: picks the logits from a model output that is not a tensor.
        on_nonfinite: ``"raise"`` a ``FloatingPointError`` naming the layer, or ``"skip"`` the step.
        max_skipped: with ``"skip"``, this many consecutive skipped steps raise ``FloatingPointError`` naming
            what kept failing (a diverged run does not skip silently for ever).
        factor_dtype: storage dtype of the curvature statistics; ``None``: the layer's parameter dtype promoted
            to at least float32 (a float64 model gets float64 curvature).
    """

    # The enum fields also take their string values (and loss_average None); __post_init__ converts them.
    param_groups: Iterable[dict[str, Any]] | None = None
    fisher_type: FisherType = FisherType.EMPIRICAL
    loss: LossType = LossType.CROSS_ENTROPY
    loss_average: LossAverage = LossAverage.BATCH
    approx: Approximation = Approximation.EXPAND
    mc_samples: int = 1
    seed: int = 0
    grad_scaler: Any = None
    output_fn: Callable[[Any], Tensor] | None = None
    on_nonfinite: str = "raise"
    max_skipped: int = 10
    factor_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "fisher_type", check_choice(FisherType, "fisher_type", self.fisher_type))
        set_(self, "loss", check_choice(LossType, "loss", self.loss))
        average = "sum" if self.loss_average is None else self.loss_average
        set_(self, "loss_average", check_choice(LossAverage, "loss_average", average))
        set_(self, "approx", check_choice(Approximation, "approx", self.approx))
        check_positive_int("mc_samples", self.mc_samples)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"Invalid seed: {self.seed!r} (must be an integer)")
        check_positive_int("max_skipped", self.max_skipped)
        if self.on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"Invalid on_nonfinite: {self.on_nonfinite!r} (must be 'raise' or 'skip')")
        if self.factor_dtype is not None and not (
            isinstance(self.factor_dtype, torch.dtype) and self.factor_dtype.is_floating_point
        ):
            raise ValueError(f"Invalid factor_dtype: {self.factor_dtype!r} (must be None or a floating torch.dtype)")
        if self.output_fn is not None and not callable(self.output_fn):
            raise ValueError(f"Invalid output_fn: {self.output_fn!r} (must be None or a callable)")
        if self.grad_scaler is not None and not callable(getattr(self.grad_scaler, "get_scale", None)):
            raise ValueError(f"Invalid grad_scaler: {self.grad_scaler!r} (must be None or a torch.amp.GradScaler)")
        if self.param_groups is not None:
            set_(self, "param_groups", [dict(g) for g in self.param_groups])

    @classmethod
    def keywords(cls, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """The options' values out of a constructor's ``locals()``, to forward them to another constructor."""
        return {f.name: arguments[f.name] for f in fields(cls)}

    @classmethod
    def pick(cls, arguments: Mapping[str, Any]) -> CaptureOptions:
        """The options out of a constructor's ``locals()`` (every optimizer lists them explicitly)."""
        return cls(**cls.keywords(arguments))

    def statistics_dtype(self, parameter: Tensor) -> torch.dtype:
        """The dtype of a layer's curvature: ``factor_dtype``, or its parameters' promoted to >= float32."""
        if self.factor_dtype is not None:
            return self.factor_dtype
        return torch.promote_types(parameter.dtype, torch.float32)
