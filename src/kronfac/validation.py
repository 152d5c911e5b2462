"""Argument checks shared by every kronfac constructor and config dataclass (one module, imported by all layers).

Each check returns the value normalised to a plain Python type (so a state_dict stays loadable with
``weights_only=True``) or raises ``ValueError`` naming the argument and what it must be, as torch.optim does
(``ValueError(f"Invalid learning rate: {lr}")``). Numbers must be finite; numpy scalars and 0-d tensors are
accepted wherever torch.optim accepts a float; booleans are never integers or numbers.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from enum import Enum
from typing import Any, TypeVar

import torch

__all__ = [
    "check_bool",
    "check_choice",
    "check_float_dtype",
    "check_int",
    "check_positive_int",
    "check_range",
]

E = TypeVar("E", bound=Enum)


def _scalar(value: Any) -> Any:
    """A 0-d tensor or numpy scalar as the Python number it holds (other values unchanged)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.ndim == 0 else value
    item = getattr(value, "item", None)
    if item is not None and type(value).__module__ == "numpy" and getattr(value, "ndim", 1) == 0:
        return item()
    return value


def check_range(
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> Any:
    """A finite number in ``[low, high]`` (open ends where asked), returned as ``float`` (or ``int`` when it is
    one). A callable (a schedule of the step) is checked at step 0 and returned as it is; the optimizer checks it
    again at every step it is evaluated."""
    if callable(value) and not isinstance(value, torch.Tensor):
        check_range(f"{name} (schedule at step 0)", value(0), low, high, low_open=low_open, high_open=high_open)
        return value
    number = _scalar(value)
    if isinstance(number, bool) or not isinstance(number, numbers.Real):
        raise ValueError(f"Invalid {name}: {value!r} (must be a finite number)")
    if not math.isfinite(number):
        raise ValueError(f"Invalid {name}: {value!r} (must be finite)")
    number = int(number) if isinstance(number, numbers.Integral) else float(number)
    below = number <= low if low_open else number < low
    above = number >= high if high_open else number > high
    if below or above:
        left = "(" if low_open or low == -math.inf else "["
        right = ")" if high_open or high == math.inf else "]"
        raise ValueError(f"Invalid {name}: {value!r} (must be in {left}{low}, {high}{right})")
    return number


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """An integer (Python, numpy or a 0-d integer tensor; never a bool or a float) in ``[low, high]``."""
    number = _scalar(value)
    if isinstance(number, bool) or not isinstance(number, numbers.Integral):
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer)")
    number = int(number)
    if (low is not None and number < low) or (high is not None and number > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer {bounds})")
    return number


def check_positive_int(name: str, value: Any) -> int:
    """An integer >= 1."""
    return check_int(name, value, 1)


def check_bool(name: str, value: Any) -> bool:
    """``True`` or ``False`` (a numpy bool too), never ``0``/``1`` or a string."""
    value = _scalar(value)
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (must be True or False)")
    return value


def check_float_dtype(name: str, value: Any, *, optional: bool = True) -> torch.dtype | None:
    """A floating ``torch.dtype`` (``None`` allowed when ``optional``)."""
    if value is None and optional:
        return None
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        hint = " (pass torch.float32, not a string)" if isinstance(value, str) else ""
        raise ValueError(f"Invalid {name}: {value!r} (must be a floating torch.dtype{' or None' * optional}){hint}")
    return value


def check_choice(enum: type[E], name: str, value: Any) -> E:
    """``enum(value)``, or ``ValueError`` naming ``name`` and the allowed values."""
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum)
        raise ValueError(f"Invalid {name}: {value!r} (must be one of {allowed})") from None


def check_callable(name: str, value: Any, *, optional: bool = True) -> Callable[..., Any] | None:
    """A callable (``None`` allowed when ``optional``)."""
    if (value is None and optional) or callable(value):
        return value
    raise ValueError(f"Invalid {name}: {value!r} (must be a callable{' or None' * optional})")
