"""``KronOptimizer``: the torch.optim base every kronfac optimizer builds on.

It finds the layers that have a helper, builds one curvature block per layer (the subclass says which),
installs the capture hooks only on steps where a curvature update is due, checks for non-finite values, and
keeps the curvature state in ``state_dict`` so that a resumed run continues bit-identically. Subclasses write
``step`` from the helpers here; they never re-implement layer discovery, scheduling or checkpointing.
"""

from __future__ import annotations

import math
import warnings
from abc import abstractmethod
from collections.abc import Callable, Iterable
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from kronfac.curvature.block import Approximation, CurvatureBlock
from kronfac.curvature.capture import Capture, TrackedLayer
from kronfac.curvature.fisher import FisherType, LossAverage, LossType
from kronfac.layers import UnsupportedModuleError, helper_for

__all__ = ["CALLABLE", "KronOptimizer", "Schedule", "check_positive_int", "check_range", "resolve"]

#: Marker stored in a state_dict in place of a callable hyperparameter (callables are kept from the live group).
CALLABLE = "<callable>"

Schedule = float | Callable[[int], float]


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


def _enum(enum: type[Enum], name: str, value: Any) -> Any:
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum)
        raise ValueError(f"Invalid {name}: {value!r} (must be one of {allowed})") from None


class KronOptimizer(Optimizer):
    """Shared machinery of Kronecker-factored optimizers (see the module docstring).

    Args:
        model: the model whose Linear/Conv2d/Embedding layers get curvature blocks.
        defaults: per-group hyperparameters and their defaults.
        param_groups: optional list of dicts (``{"params": [...], "lr": ...}``) over the model's parameters;
            a layer's weight and bias must share a group. Default: all trainable parameters in one group.
        factor_every: curvature statistics are captured and averaged every this many steps.
        fisher_type: ``"empirical"``, ``"mc"`` (sampled labels) or ``"type2"`` (exact, one backward per class).
        loss: ``"cross_entropy"`` or ``"mse"``: the loss of the model output, used by ``mc``/``type2``.
        loss_average: ``"batch"`` (loss is a mean over the first dim), ``"batch+sequence"`` or ``"sum"``.
        approx: ``"expand"`` or ``"reduce"`` for weight-sharing layers (conv locations, sequence entries).
        mc_samples: sampled labels per input for ``fisher_type="mc"``.
        seed: seed of the label sampler.
        grad_scaler: a ``torch.amp.GradScaler`` whose scale is removed from the captured gradients.
        output_fn: picks the logits from a model output that is not a tensor.
        on_nonfinite: ``"raise"`` a ``FloatingPointError`` naming the layer, or ``"skip"`` the step.
        factor_dtype: storage dtype of the curvature statistics.
    """

    def __init__(
        self,
        model: nn.Module,
        defaults: dict[str, Any],
        *,
        param_groups: Iterable[dict[str, Any]] | None = None,
        factor_every: int = 1,
        fisher_type: str = "empirical",
        loss: str = "cross_entropy",
        loss_average: str | None = "batch",
        approx: str = "expand",
        mc_samples: int = 1,
        seed: int = 0,
        grad_scaler: Any = None,
        output_fn: Callable[[Any], Tensor] | None = None,
        on_nonfinite: str = "raise",
        factor_dtype: torch.dtype = torch.float32,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"kronfac optimizers take the model (an nn.Module), got {type(model).__name__}")
        check_positive_int("factor_every", factor_every)
        check_positive_int("mc_samples", mc_samples)
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"Invalid on_nonfinite: {on_nonfinite!r} (must be 'raise' or 'skip')")
        self.fisher_type = _enum(FisherType, "fisher_type", fisher_type)
        self.loss = _enum(LossType, "loss", loss)
        self.loss_average = _enum(LossAverage, "loss_average", "sum" if loss_average is None else loss_average)
        self.approx = _enum(Approximation, "approx", approx)
        self.factor_every, self.on_nonfinite, self.factor_dtype = factor_every, on_nonfinite, factor_dtype
        self.model = model

        groups = (
            [dict(g) for g in param_groups]
            if param_groups is not None
            else [{"params": [p for p in model.parameters() if p.requires_grad]}]
        )
        super().__init__(groups, defaults)

        self._param_names = {p: n for n, p in model.named_parameters()}
        group_of = {p: i for i, g in enumerate(self.param_groups) for p in g["params"]}
        self.layers: dict[str, TrackedLayer] = {}
        self.layer_groups: list[list[TrackedLayer]] = [[] for _ in self.param_groups]
        self._discover_layers(group_of)
        tracked = {p for layer in self.layers.values() for p in layer.params}
        self._plain_params = [[p for p in g["params"] if p not in tracked] for g in self.param_groups]
        self._warn_untracked(tracked, group_of)

        scale_fn = grad_scaler.get_scale if grad_scaler is not None else None
        self.capture = Capture(
            model,
            list(self.layers.values()),
            fisher_type=self.fisher_type,
            loss=self.loss,
            loss_average=self.loss_average,
            mc_samples=mc_samples,
            seed=seed,
            grad_scale=scale_fn,
            output_fn=output_fn,
        )
        self.steps = 0
        self.num_skipped = 0
        #: Distributed engine (kronfac.distributed), set by optimizers that take ``distributed=``.
        self._distributed: Any = None
        self._schedule_capture()

    # -- construction -----------------------------------------------------------------------------------
    @abstractmethod
    def make_block(self, name: str, module: nn.Module, d_in: int, d_out: int, diagonal_a: bool) -> CurvatureBlock:
        """The curvature block this method keeps for one layer."""

    def _discover_layers(self, group_of: dict[nn.Parameter, int]) -> None:
        for name, module in self.model.named_modules():
            helper = helper_for(module)
            if helper is None:
                continue
            try:
                helper.check(module)
            except UnsupportedModuleError as exc:
                warnings.warn(f"kronfac: layer {name!r} falls back to first-order updates: {exc}", stacklevel=3)
                continue
            params = helper.params(module)
            groups = {group_of.get(p) for p in params}
            if None in groups or not all(p.requires_grad for p in params):
                continue  # frozen or not optimised by this optimizer
            if len(groups) > 1:
                raise ValueError(f"Invalid param_groups: the parameters of layer {name!r} are in different groups")
            d_in, d_out = helper.dims(module)
            block = self.make_block(name, module, d_in, d_out, helper.diagonal_a)
            layer = TrackedLayer(name, module, helper, block, params)
            self.layers[name] = layer
            self.layer_groups[groups.pop()].append(layer)  # type: ignore[index]

    def _warn_untracked(self, tracked: set[nn.Parameter], group_of: dict[nn.Parameter, int]) -> None:
        owners = sorted(
            {
                name.rsplit(".", 1)[0] if "." in name else "<root>"
                for p, name in self._param_names.items()
                if p in group_of and p not in tracked
            }
        )
        if owners:
            warnings.warn(
                f"kronfac: {type(self).__name__} has no Kronecker layer helper for the parameters of {owners}; "
                "they get the first-order update",
                UserWarning,
                stacklevel=3,
            )

    # -- schedule ---------------------------------------------------------------------------------------
    def curvature_due(self, step: int | None = None) -> bool:
        return (self.steps if step is None else step) % self.factor_every == 0

    def _schedule_capture(self) -> None:
        if self.curvature_due():
            self.capture.install()
        else:
            self.capture.remove()

    def close(self) -> None:
        """Remove every hook this optimizer installed."""
        self.capture.close()

    def group_value(self, group: dict[str, Any], key: str) -> float:
        return float(resolve(group[key], self.steps))

    @staticmethod
    def run_closure(closure: Callable[[], Any] | None) -> Any:
        """Evaluate ``step``'s closure with gradients enabled (``step`` itself runs under ``no_grad``)."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    # -- checks -----------------------------------------------------------------------------------------
    def _name(self, p: nn.Parameter) -> str:
        return self._param_names.get(p, "<unnamed parameter>")

    def grads_finite(self) -> bool:
        """Check every gradient; raise (``on_nonfinite="raise"``) or warn and return False (``"skip"``)."""
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())):
            return True
        bad = next(
            (p for g in self.param_groups for p in g["params"] if p.grad is not None and not p.grad.isfinite().all()),
            None,
        )
        if bad is None:
            return True  # every entry is finite; only the norm overflowed (huge but finite gradients)
        owner = next((n for n, layer in self.layers.items() if any(q is bad for q in layer.params)), None)
        where = f"layer {owner!r}" if owner is not None else f"parameter {self._name(bad)!r}"
        return self._nonfinite(f"non-finite gradient in {where}")

    def _nonfinite(self, message: str) -> bool:
        if self.on_nonfinite == "raise":
            raise FloatingPointError(f"kronfac: {message} (pass on_nonfinite='skip' to skip such steps)")
        warnings.warn(f"kronfac: {message}; skipping", RuntimeWarning, stacklevel=3)
        return False

    def commit_curvature(self) -> None:
        """Fold the captured statistics of every layer into its running state (on due steps)."""
        if not self.curvature_due():
            return
        if self._distributed is not None:
            self._distributed.synchronize_statistics()  # pending statistics become the global batch's
        for group, layers in zip(self.param_groups, self.layer_groups):
            hyper = {k: resolve(v, self.steps) for k, v in group.items() if k != "params"}
            for layer in layers:
                block = layer.block
                if not block.has_pending():
                    block.discard_pending()
                    continue
                bad = block.pending_nonfinite()
                if bad is not None:
                    block.discard_pending()
                    self._nonfinite(f"non-finite values in the {bad} factor of layer {layer.name!r}")
                    continue
                block.commit(**hyper)

    def discard_curvature(self) -> None:
        if self._distributed is not None:
            self._distributed.discard()
        for layer in self.layers.values():
            layer.block.discard_pending()

    def finish_step(self, skipped: bool = False) -> None:
        """Advance the step counter and (un)install the hooks for the next step."""
        if skipped:
            self.num_skipped += 1
            self.discard_curvature()
        self.steps += 1
        self._schedule_capture()
        if self._distributed is not None:
            self._distributed.end_step()

    @property
    def timings(self) -> dict[str, float]:
        """Seconds of the last step by phase (``forward_backward``, ``factor``, ``comm_wait``, ``inversion``,
        ``precondition``, ``step``); measured for distributed runs only, else empty."""
        return dict(self._distributed.timings) if self._distributed is not None else {}

    # -- checkpointing ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        for group in state["param_groups"]:
            for key, value in group.items():
                if callable(value):
                    group[key] = CALLABLE
        state["kronfac"] = {
            "steps": self.steps,
            "num_skipped": self.num_skipped,
            "capture": self.capture.state_dict(),
            "layers": {name: layer.block.state_dict() for name, layer in self.layers.items()},
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("kronfac", None)
        if extra is None:
            raise ValueError("state_dict has no 'kronfac' entry: it was not saved by a kronfac optimizer")
        live = [dict(g) for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, old in zip(self.param_groups, live):
            for key, value in group.items():
                if isinstance(value, str) and value == CALLABLE:
                    group[key] = old[key]
        missing = set(self.layers) - set(extra["layers"])
        if missing:
            raise ValueError(f"state_dict has no curvature state for layers {sorted(missing)}")
        for name, layer in self.layers.items():
            layer.block.load_state_dict(extra["layers"][name])
        self.steps, self.num_skipped = int(extra["steps"]), int(extra["num_skipped"])
        self.capture.load_state_dict(extra["capture"])
        self._schedule_capture()
