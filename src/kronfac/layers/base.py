"""Layer helpers: how one module type exposes its Kronecker-factor inputs and its gradient matrix.

Every helper speaks the same shapes. For a layer ``y = W x (+ b)`` with ``W`` of shape ``d_o x d_i``:

* ``input_rows(module, x)`` returns ``(N, R, d_i)``: batch, weight-sharing positions (sequence entries,
  conv locations; ``R = 1`` for a plain MLP) and the layer input, with a trailing 1 when there is a bias.
  A layer with positions inside each sequence entry may return ``(N, R, P, d_i)`` (a KronA factor,
  :mod:`kronfac.layers.krona`): ``loss_average`` counts samples over the first two dimensions only.
* ``output_grad_rows(module, grad_out)`` returns ``(N, R, d_o)``, the gradient w.r.t. the layer output.
* ``grad_matrix(module)`` returns ``∇W`` as ``d_o x d_i`` (bias gradient as the last column), and
  ``split(module, matrix)`` maps such a matrix back to one tensor per parameter (in ``params`` order).

A :class:`CallHelper` serves layers whose output gradients are not those of their module's output (attention's
packed in-projection lies inside ``nn.MultiheadAttention``'s forward): the capture records each call and, in the
backward pass, the helper recomputes the call locally to produce the rows (of the layer and of submodules whose
forward torch never calls, such as the attention's ``out_proj``).

Helpers are found by module type (:func:`helper_for` walks the type's MRO). Types of optional libraries
(transformers' ``Conv1D``) are registered by qualified class name, so kronfac never imports those libraries: a
module matches when a class of its MRO has that ``__module__.__qualname__``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

__all__ = [
    "CallHelper",
    "CallRows",
    "LayerHelper",
    "RecordedCall",
    "UnsupportedModuleError",
    "full_tensors",
    "helper_for",
    "param_values",
    "register_helper",
    "require_grads",
]


class UnsupportedModuleError(ValueError):
    """A module of a supported type is configured in a way the helper cannot represent."""


class LayerHelper(ABC):
    """Reshapes for one module type. Stateless: one shared instance per type."""

    module_types: ClassVar[tuple[type[nn.Module], ...]] = ()
    #: Qualified class names (``"package.module.Class"``) of module types from optional libraries.
    module_names: ClassVar[tuple[str, ...]] = ()
    #: True when the input-side factor A is diagonal and kept as a vector (Embedding).
    diagonal_a: ClassVar[bool] = False
    #: Whether the layer's weight may be shared with other layers (tied embeddings): its factors are those of
    #: ``y = W x`` in the ``d_o x d_i`` orientation, so uses can be fitted by one Kronecker product
    #: (``kronfac.curvature.shared``; docs/kfac.md, "Shared parameters"). Per-feature helpers (norms) and per-call
    #: helpers (attention) are not.
    shareable: ClassVar[bool] = True

    def check(self, module: nn.Module) -> None:  # noqa: B027 - optional hook
        """Raise :class:`UnsupportedModuleError` if this module's configuration is not supported."""

    def params(self, module: nn.Module) -> list[nn.Parameter]:
        bias = getattr(module, "bias", None)
        return [module.weight] if bias is None else [module.weight, bias]  # type: ignore[list-item]

    def has_bias(self, module: nn.Module) -> bool:
        return getattr(module, "bias", None) is not None

    @abstractmethod
    def dims(self, module: nn.Module) -> tuple[int, int]:
        """``(d_i, d_o)``, with the bias column counted in ``d_i``."""

    @abstractmethod
    def input_rows(self, module: nn.Module, x: Tensor) -> Tensor:
        """Layer input as ``(N, R, d_i)`` (for a diagonal A: integer indices ``(N, R)``)."""

    @abstractmethod
    def output_grad_rows(self, module: nn.Module, grad_out: Tensor) -> Tensor:
        """Gradient w.r.t. the layer output as ``(N, R, d_o)``."""

    @abstractmethod
    def grad_matrix(self, module: nn.Module) -> Tensor:
        """The parameters' gradients as one ``d_o x d_i`` matrix."""

    @abstractmethod
    def split(self, module: nn.Module, matrix: Tensor) -> list[Tensor]:
        """Inverse of :meth:`grad_matrix` for any ``d_o x d_i`` matrix: one tensor per parameter."""

    @abstractmethod
    def param_matrix(self, module: nn.Module) -> Tensor:
        """The parameters themselves as one ``d_o x d_i`` matrix (for weight decay in matrix form)."""


@dataclass
class RecordedCall:
    """One forward call of a :class:`CallHelper`'s module, as the backward pass needs it.

    Attributes:
        state: what :meth:`CallHelper.call_rows` needs (private to the helper).
        inputs: tensors known after the forward pass, by target (``""``: the layer itself, else a submodule's
            path), in the layout of that target's own input, for its helper's ``input_rows``.
        skipped: why the layer's own statistics are not taken in this call (the capture warns once per layer).
    """

    state: Any
    inputs: dict[str, Tensor] = field(default_factory=dict)
    skipped: str | None = None


@dataclass
class CallRows:
    """Tensors of one call found in the backward pass, by target as in :class:`RecordedCall`: ``inputs`` in the
    layout of the target's input, ``output_grads`` in that of its output (for its helper's ``output_grad_rows``)."""

    inputs: dict[str, Tensor] = field(default_factory=dict)
    output_grads: dict[str, Tensor] = field(default_factory=dict)


class CallHelper(LayerHelper):
    """A layer whose output gradients lie inside its module's forward, out of reach of a hook on the output.

    The capture calls :meth:`before_call` in a forward pre-hook, :meth:`record_call` in the forward hook and
    :meth:`call_rows` with the gradient of the module's (first) output in the backward pass.
    """

    #: Paths of submodules whose statistics this module's calls provide (torch never calls their forward).
    fed_submodules: ClassVar[tuple[str, ...]] = ()
    shareable: ClassVar[bool] = False

    def before_call(self, module: nn.Module) -> Any:
        """State to take before the forward runs (the RNG state, to replay dropout); ``None`` by default."""
        return None

    @abstractmethod
    def record_call(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], before: Any
    ) -> RecordedCall:
        """What the backward pass needs from this call, and the inputs already known."""

    @abstractmethod
    def call_rows(self, module: nn.Module, call: RecordedCall, grad_out: Tensor, *, keep_graph: bool) -> CallRows:
        """The output gradients (and late inputs) of the call, given the gradient of the module's output.
        ``keep_graph``: more gradients of the same call follow (sampled Fisher), keep what can be reused."""


#: Full tensors standing in for sharded parameters (FSDP2's DTensor shards) while a step reads them:
#: ``id(param) -> (value or None, gradient)``; set by :func:`full_tensors`.
_FULL: ContextVar[dict[int, tuple[Tensor | None, Tensor]] | None] = ContextVar("kronfac_full_tensors", default=None)


@contextmanager
def full_tensors(tensors: dict[int, tuple[Tensor | None, Tensor]]) -> Iterator[None]:
    """Within the block, :func:`require_grads` and :func:`param_values` return the given full tensors for these
    parameters (by ``id``): how the optimizer hands helpers the unsharded matrices of a sharded layer."""
    token = _FULL.set(tensors)
    try:
        yield
    finally:
        _FULL.reset(token)


def require_grads(params: Sequence[Tensor]) -> list[Tensor]:
    """The parameters' ``.grad`` tensors (full ones inside :func:`full_tensors`); ``RuntimeError`` if one is
    missing."""
    full = _FULL.get()
    grads = [p.grad if full is None or id(p) not in full else full[id(p)][1] for p in params]
    missing = [i for i, g in enumerate(grads) if g is None]
    if missing:
        raise RuntimeError("layer has no gradient (was backward() called?)")
    return grads  # type: ignore[return-value]


def param_values(params: Sequence[Tensor]) -> list[Tensor]:
    """The parameters' values, detached (full ones inside :func:`full_tensors`)."""
    full = _FULL.get()
    out = []
    for p in params:
        value = None if full is None or id(p) not in full else full[id(p)][0]
        out.append(p.detach() if value is None else value)
    return out


_HELPERS: dict[type[nn.Module], LayerHelper] = {}
_NAMED_HELPERS: dict[str, LayerHelper] = {}


def qualified_name(cls: type) -> str:
    """``module.QualName`` of a class, as :attr:`LayerHelper.module_names` spells it."""
    return f"{cls.__module__}.{cls.__qualname__}"


def register_helper(helper: LayerHelper) -> LayerHelper:
    """Register a helper instance for its module types and names (subclasses included; a later registration for
    the same type replaces an earlier one)."""
    for module_type in helper.module_types:
        _HELPERS[module_type] = helper
    for name in helper.module_names:
        _NAMED_HELPERS[name] = helper
    return helper


def helper_for(module: nn.Module) -> LayerHelper | None:
    """The helper for ``module``'s type (walking its MRO, the nearest class first), or ``None`` if the type is
    unsupported."""
    for cls in type(module).__mro__:
        helper = _HELPERS.get(cls)
        if helper is None:
            helper = _NAMED_HELPERS.get(qualified_name(cls))
        if helper is not None:
            return helper
    return None
