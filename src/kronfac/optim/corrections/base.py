"""The interface of a correction: a gradient transform composed into a kronfac step (optax-style).

A correction sees what the step hands it and nothing else: a :class:`CorrectionContext` at bind time (the model,
its tracked layers, the loss description, a way to run forward passes that do not feed the curvature), and at
each stage of :meth:`kronfac.optim.base.KronOptimizer.step` the data of that stage. Every hook has a default that
leaves the step unchanged, so a correction overrides only the stages it changes.

Stages, in step order: :meth:`Correction.before_commit` (batch statistics reduced, not yet folded in),
:meth:`Correction.after_refresh` (refresh steps), then per layer or parameter :meth:`Correction.transform` (the
gradient before weight decay and preconditioning), :meth:`Correction.precondition` (a replacement
preconditioner, or ``None``), :meth:`Correction.observe` (the final direction), and :meth:`Correction.refine`
over all groups' directions before the update kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from kronfac.curvature.capture import TrackedLayer
from kronfac.curvature.fisher import LossAverage, LossType
from kronfac.optim.types import GroupStep

__all__ = ["Correction", "CorrectionContext"]


@dataclass(frozen=True)
class CorrectionContext:
    """What a correction may read of the optimizer it is bound to.

    Attributes:
        model: the model.
        layers: name -> tracked layer (module, helper, curvature block, parameters), in registration order.
        param_names: parameter -> its name in ``model.named_parameters()``.
        loss: the loss of the model output (for KL terms).
        loss_average: rows the loss is averaged over.
        output_fn: picks the logits from a model output that is not a tensor (``None``: the first tensor).
        paused_capture: a context manager inside which forward passes do not feed the curvature statistics.
        average: replaces tensors in place by their mean over the data-parallel ranks (a no-op in one process),
            for terms a correction computes from the local batch (so DDP replicas stay identical).
    """

    model: nn.Module
    layers: dict[str, TrackedLayer]
    param_names: dict[Any, str]
    loss: LossType
    loss_average: LossAverage
    output_fn: Callable[[Any], Tensor] | None
    paused_capture: Callable[[], AbstractContextManager[None]]
    average: Callable[[list[Tensor]], None]


class Correction:
    """Base of the corrections; every stage defaults to "no change". Bind one instance to one optimizer."""

    _context: CorrectionContext | None = None

    def bind(self, context: CorrectionContext) -> None:
        """Attach to an optimizer (once)."""
        if self._context is not None:
            raise ValueError(f"Invalid correction: this {type(self).__name__} is already bound to an optimizer")
        self._context = context

    @property
    def context(self) -> CorrectionContext:
        if self._context is None:
            raise RuntimeError(f"{type(self).__name__} is not bound to an optimizer")
        return self._context

    def before_commit(self) -> None:
        """Read the pending (reduced) batch statistics of the layers' blocks."""

    def after_refresh(self, layers: list[tuple[TrackedLayer, dict[str, Any]]]) -> None:
        """The blocks were refreshed; ``layers``: each layer with its group's hyperparameters."""

    def transform(self, key: str, grad: Tensor, hyper: dict[str, Any]) -> Tensor:
        """The gradient to use in place of ``grad`` (``key``: layer name, or parameter name for parameters
        without a block; ``grad``: the layer's ``d_o x d_i`` matrix or the parameter's gradient)."""
        return grad

    def precondition(self, layer: TrackedLayer, grad: Tensor) -> Tensor | None:
        """A direction for ``layer`` in place of the method's, or ``None`` to keep the method's."""
        return None

    def observe(self, key: str, direction: Tensor, hyper: dict[str, Any]) -> None:
        """See a layer's final direction (after the KL clip)."""

    def refine(self, steps: list[GroupStep]) -> list[GroupStep]:
        """Refine every group's directions before the update kernel runs."""
        return steps

    def close(self) -> None:
        """Remove hooks the correction installed."""

    def state_dict(self) -> dict[str, Any]:
        """The correction's state, saved in the optimizer's ``state_dict`` (none by default)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
