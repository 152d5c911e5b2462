"""Argument checks and the capture options every kronfac optimizer takes with the same names and defaults.

The checks themselves live in :mod:`kronfac.validation` (shared with the config dataclasses below optim/).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from kronfac.curvature.block import Approximation
from kronfac.curvature.fisher import FisherType, LossAverage, LossType
from kronfac.validation import (
    check_bool,
    check_callable,
    check_choice,
    check_float_dtype,
    check_int,
    check_positive_int,
    check_range,
)

__all__ = [
    "CALLABLE",
    "CaptureOptions",
    "Schedule",
    "check_bool",
    "check_choice",
    "check_float_dtype",
    "check_positive_int",
    "check_range",
    "resolve",
]

#: Marker stored in a state_dict in place of a callable hyperparameter (callables are kept from the live group).
CALLABLE = "<callable>"

Schedule = float | Callable[[int], float]


def resolve(value: Any, step: int) -> Any:
    """A hyperparameter's value at ``step``: call it if it is a schedule, else return it unchanged."""
    return value(step) if callable(value) else value


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
        grad_scaler: a ``torch.amp.GradScaler`` whose scale is removed from the captured gradients, or a callable
            returning the current scale (for a scaler a framework creates after the optimizer:
            ``grad_scaler=lambda: trainer.scaler.get_scale()``).
        output_fn: picks the logits from a model output that is not a tensor.
        on_nonfinite: ``"raise"`` a ``FloatingPointError`` naming the layer, or ``"skip"`` the step.
        accumulation_steps: backward passes per ``step()`` with each loss divided by this number (the
            gradient-accumulation convention of Hugging Face, Lightning and accelerate); the curvature then equals
            that of the full batch. Losses that are summed instead of divided keep the default 1.
        include: module names or regular expressions (matched against the whole name) of the layers to
            precondition; ``None``: every supported layer. A pattern that matches no supported layer raises.
        exclude: names or patterns of layers to leave first-order (applied after ``include``).
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
    accumulation_steps: int = 1
    include: str | Sequence[str] | None = None
    exclude: str | Sequence[str] | None = None
    factor_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "fisher_type", check_choice(FisherType, "fisher_type", self.fisher_type))
        set_(self, "loss", check_choice(LossType, "loss", self.loss))
        average = "sum" if self.loss_average is None else self.loss_average
        set_(self, "loss_average", check_choice(LossAverage, "loss_average", average))
        set_(self, "approx", check_choice(Approximation, "approx", self.approx))
        set_(self, "mc_samples", check_positive_int("mc_samples", self.mc_samples))
        set_(self, "seed", check_int("seed", self.seed, 0, 2**63 - 1))
        set_(self, "max_skipped", check_positive_int("max_skipped", self.max_skipped))
        if self.on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"Invalid on_nonfinite: {self.on_nonfinite!r} (must be 'raise' or 'skip')")
        check_float_dtype("factor_dtype", self.factor_dtype)
        check_callable("output_fn", self.output_fn)
        set_(self, "accumulation_steps", check_positive_int("accumulation_steps", self.accumulation_steps))
        scaler = self.grad_scaler
        if not (scaler is None or callable(scaler) or callable(getattr(scaler, "get_scale", None))):
            raise ValueError(f"Invalid grad_scaler: {scaler!r} (must be None, a GradScaler or a callable scale)")
        for name in ("include", "exclude"):
            set_(self, name, _patterns(name, getattr(self, name)))
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

    def selects(self, name: str) -> bool:
        """Whether the layer ``name`` is chosen by ``include`` and not removed by ``exclude``."""
        if self.include is not None and not any(_matches(p, name) for p in self.include):
            return False
        return not (self.exclude is not None and any(_matches(p, name) for p in self.exclude))

    def unmatched_includes(self, names: list[str]) -> list[str]:
        """The ``include`` patterns that match none of ``names``."""
        return [p for p in self.include or () if not any(_matches(p, n) for n in names)]

    def statistics_dtype(self, parameter: Tensor) -> torch.dtype:
        """The dtype of a layer's curvature: ``factor_dtype``, or its parameters' promoted to >= float32."""
        if self.factor_dtype is not None:
            return self.factor_dtype
        return torch.promote_types(parameter.dtype, torch.float32)


def _patterns(name: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    patterns = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, (list, tuple)) else None
    if patterns is None or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"Invalid {name}: {value!r} (must be a module name or regex, or a list of them)")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"Invalid {name}: {pattern!r} is not a regular expression ({exc})") from None
    return patterns


def _matches(pattern: str, name: str) -> bool:
    return pattern == name or re.fullmatch(pattern, name) is not None
