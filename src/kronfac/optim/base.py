"""``KronOptimizer``: the torch.optim base every kronfac optimizer builds on, and its one ``step``.

One step, for every method (the method supplies only its math: :meth:`KronOptimizer.make_block`,
:meth:`KronOptimizer.direction` and the update kernel :meth:`KronOptimizer.update`):

1. closure (under ``enable_grad``), then the finite check of every gradient;
2. on curvature steps (every ``factor_every``): the communicator reduces the captured statistics over the
   ranks, a correction may read them, each block folds them into its running state (``commit``);
3. on refresh steps (every ``refresh_every``): each block recomputes what it derives (inverses, damped
   diagonals), through the communicator when distributed;
4. per param group: the gradient matrix of each layer (plus the correction's transform and weight decay
   before or after, as the method says) becomes the method's direction; KL clip where the group has
   ``kl_clip``; parameters without a block take their gradient;
5. a correction may refine the directions; decoupled weight decay; the method's update kernel;
6. the step counter advances and the capture hooks are installed for the next step only if it captures.
"""

from __future__ import annotations

import math
import weakref
from abc import abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from kronfac.curvature.block import CurvatureBlock, refresh_blocks
from kronfac.curvature.capture import Capture, TrackedLayer
from kronfac.curvature.shared import SharedParameter, SharedUse, UseStatistics
from kronfac.distributed import CurvatureSync, DistributedConfig, process_group_active, sharded
from kronfac.distributed.placement import LayerPlacement
from kronfac.errors import KronfacRuntimeWarning, warn
from kronfac.layers import LayerHelper, UnsupportedModuleError, helper_for
from kronfac.layers.base import full_tensors
from kronfac.optim import checkpoint
from kronfac.optim.corrections.base import Correction, CorrectionContext
from kronfac.optim.options import CALLABLE, CaptureOptions, check_positive_int, check_range, resolve
from kronfac.optim.types import GroupStep

__all__ = ["GroupStep", "KronOptimizer", "WeightDecay"]


class WeightDecay(str, Enum):
    """Where a method's weight decay ``η`` enters: ``gradient`` (L2, ``∇ + η θ`` before the direction: K-FAC,
    CG-FAC, AdaFisher), ``direction`` (``direction + η θ``: SINGD, as in its paper) or ``decoupled``
    (``θ <- (1 - α η) θ`` before the update: AdaFisherW, as AdamW)."""

    GRADIENT = "gradient"
    DIRECTION = "direction"
    DECOUPLED = "decoupled"


#: The range of every hyperparameter that may be a schedule of the step, checked each time it is evaluated.
SCHEDULE_RANGES: dict[str, dict[str, Any]] = {
    "lr": {"low": 0.0},
    "damping": {"low": 0.0, "low_open": True},
    "lr_cov": {"low": 0.0},
}


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def _close(capture: Capture, sync: CurvatureSync | None, correction: Correction | None) -> None:
    capture.close()
    if sync is not None:
        sync.close()
    if correction is not None:
        correction.close()


def _keep(tensors: list[Tensor]) -> None:
    """One process: the local batch is the global one."""


def _local(tensor: Tensor) -> Tensor:
    """A DTensor's local shard (FSDP2), or the tensor."""
    return tensor.to_local() if sharded.is_sharded(tensor) else tensor  # type: ignore[attr-defined]


@dataclass(eq=False)
class _Candidate:
    """A supported, selected, optimised layer before blocks are made."""

    name: str
    module: nn.Module
    helper: LayerHelper
    params: list[nn.Parameter]
    group: int


def _sharing(candidates: list[_Candidate]) -> list[list[_Candidate]]:
    """The candidates grouped by shared parameters (connected components; singletons for most layers), in
    model order."""
    owner: dict[int, int] = {}
    parent = list(range(len(candidates)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, candidate in enumerate(candidates):
        for p in candidate.params:
            j = owner.setdefault(id(p), i)
            parent[root(i)] = root(j)
    components: dict[int, list[_Candidate]] = {}
    for i, candidate in enumerate(candidates):
        components.setdefault(root(i), []).append(candidate)
    return list(components.values())


def _transposed(canonical: _Candidate, use: _Candidate) -> bool | None:
    """Whether ``use``'s ``d_o x d_i`` matrix is the transpose of ``canonical``'s (``None``: neither; views of one
    storage decide by their strides, copies by their values)."""
    if use is canonical:
        return False
    mine, theirs = canonical.helper.param_matrix(canonical.module), use.helper.param_matrix(use.module)
    if mine.ndim != 2 or theirs.ndim != 2:
        return None
    if mine.data_ptr() == theirs.data_ptr():
        if theirs.shape == mine.shape and theirs.stride() == mine.stride():
            return False
        if theirs.shape == mine.mT.shape and theirs.stride() == mine.mT.stride():
            return True
    if theirs.shape == mine.shape and torch.equal(theirs, mine):
        return False
    if theirs.shape == mine.mT.shape and torch.equal(theirs, mine.mT):
        return True
    return None


class KronOptimizer(Optimizer):
    """Shared machinery of Kronecker-factored optimizers (see the module docstring for the step).

    Args:
        model: the model whose supported layers get curvature blocks.
        defaults: per-group hyperparameters and their defaults.
        options: the shared capture options (:class:`~kronfac.optim.options.CaptureOptions`).
        factor_every: curvature statistics are captured and committed every this many steps.
        refresh_every: blocks refresh their derived state every this many steps.
        distributed: ``None``: average the curvature over the ranks whenever ``torch.distributed`` is
            initialised with more than one rank (so DDP replicas stay identical); a
            :class:`~kronfac.DistributedConfig` chooses the strategy; ``False`` keeps per-rank curvature.
        correction: a :class:`~kronfac.optim.corrections.Correction` composed into the step.
    """

    #: Where the group's ``weight_decay`` enters the step (a method may set it per instance).
    weight_decay_mode: WeightDecay = WeightDecay.GRADIENT
    #: Whether layers' gradients go through :meth:`direction` as matrices; ``False``: every parameter takes its
    #: own gradient and the kernel applies the curvature (AdaFisher divides its moment by ``F_D``).
    layer_directions: ClassVar[bool] = True
    #: The constructor's name for ``refresh_every`` (K-FAC: ``inverse_every``), as the ranks' agreement check says it.
    refresh_every_name: ClassVar[str] = "refresh_every"

    def __init__(
        self,
        model: nn.Module,
        defaults: dict[str, Any],
        options: CaptureOptions,
        *,
        factor_every: int,
        refresh_every: int = 1,
        distributed: DistributedConfig | bool | None = None,
        correction: Correction | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"kronfac optimizers take the model (an nn.Module), got {type(model).__name__}")
        factor_every = check_positive_int("factor_every", factor_every)
        refresh_every = check_positive_int("refresh_every", refresh_every)
        if not (distributed is None or isinstance(distributed, (bool, DistributedConfig))):
            raise ValueError(f"Invalid distributed: {distributed!r} (must be None, False or a DistributedConfig)")
        if correction is not None and not isinstance(correction, Correction):
            raise ValueError(f"Invalid correction: {correction!r} (must be a Correction such as KLDWRM())")
        model = unwrap(model)  # layer names (and checkpoint keys) are those of the plain model
        self.model, self.options = model, options
        self.factor_every, self.refresh_every = factor_every, refresh_every
        groups = options.param_groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
        super().__init__([dict(g) for g in groups], defaults)

        self.param_names = {p: n for n, p in model.named_parameters()}
        self.layers: dict[str, TrackedLayer] = {}
        self.layer_groups: list[list[TrackedLayer]] = [[] for _ in self.param_groups]
        self._discover_layers()
        tracked = {p for layer in self.layers.values() for p in layer.params}
        self.plain_params = [[p for p in g["params"] if p not in tracked] for g in self.param_groups]
        #: Whether some parameter is an FSDP2 shard (see ``kronfac.distributed.sharded`` and docs/distributed.md).
        self.sharded = any(sharded.is_sharded(p) for g in self.param_groups for p in g["params"])
        self._warn_untracked(tracked)

        scaler = options.grad_scaler
        scale_fn = scaler.get_scale if hasattr(scaler, "get_scale") else scaler
        self.capture = Capture(
            model,
            self._capture_layers(),
            fisher_type=options.fisher_type,
            loss=options.loss,
            loss_average=options.loss_average,
            mc_samples=options.mc_samples,
            seed=options.seed,
            grad_scale=scale_fn,
            output_fn=options.output_fn,
            accumulation_steps=options.accumulation_steps,
        )
        self.steps = 0
        self.num_skipped = 0
        self.consecutive_skipped = 0
        self._constructed = False
        self.sync = self._make_sync(distributed)
        self.correction = correction
        if correction is not None:
            correction.bind(self._correction_context())
        self.placement = self._make_placement()
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p].update(self.initial_state(p, group))
        if self.sync is not None:
            self.sync.check_agreement(self.agreement_fields())
        self._schedule_capture()
        # A discarded optimizer (Lightning's lr_find builds several) takes its hooks with it.
        weakref.finalize(self, _close, self.capture, self.sync, correction)
        self._constructed = True

    # -- what a method supplies -------------------------------------------------------------------------
    @abstractmethod
    def make_block(self, name: str, module: nn.Module, helper: LayerHelper, group: dict[str, Any]) -> CurvatureBlock:
        """The curvature block this method keeps for one layer (``group``: the layer's param group)."""

    def direction(self, layer: TrackedLayer, grad: Tensor, hyper: dict[str, Any]) -> Tensor:
        """The update direction of a layer from its ``d_o x d_i`` gradient matrix: the block's preconditioner."""
        block = layer.block
        assert isinstance(block, CurvatureBlock)
        return block.precondition(grad)

    @abstractmethod
    def update(self, step: GroupStep) -> None:
        """Apply one group's directions to its parameters (the method's kernel in ``optim/functional.py``)."""

    def initial_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """A parameter's optimizer state before the first step, created eagerly at construction, so that the
        state_dict of a fresh optimizer has the layout of a trained one (torch.distributed.checkpoint loads into
        it) and torch.distributed.checkpoint never runs its zero-gradient initialisation step on a kronfac
        optimizer (which would advance the curvature schedule)."""
        return {}

    def helper_for(self, module: nn.Module) -> LayerHelper | None:
        """The layer helper of a module this method gives a block to (``None``: first-order)."""
        return helper_for(module)

    # -- construction -----------------------------------------------------------------------------------
    def _discover_layers(self) -> None:
        group_of = {p: i for i, g in enumerate(self.param_groups) for p in g["params"]}
        self._deselected: set[nn.Parameter] = set()  # left first-order by include/exclude, not for lack of a helper
        #: Parameters used by several layers, by the name of the layer whose block preconditions them.
        self.shared: dict[str, SharedParameter] = {}
        self._use_layers: dict[str, list[TrackedLayer]] = {}
        supported, candidates = [], []
        for name, module in self.model.named_modules():
            helper = self.helper_for(module)
            if helper is None:
                continue
            supported.append(name)
            if not self.options.selects(name):
                self._deselected.update(helper.params(module))
                continue
            try:
                helper.check(module)
            except UnsupportedModuleError as exc:
                warn(f"kronfac: layer {name!r} falls back to first-order updates: {exc}")
                continue
            params = helper.params(module)
            groups = {group_of.get(p) for p in params}
            if None in groups or not all(p.requires_grad for p in params):
                continue  # frozen or not optimised by this optimizer
            if len(groups) > 1:
                raise ValueError(f"Invalid param_groups: the parameters of layer {name!r} are in different groups")
            candidates.append(_Candidate(name, module, helper, params, groups.pop()))  # type: ignore[arg-type]
        for uses in _sharing(candidates):
            if len(uses) == 1:
                self._track(uses[0])
            else:
                self._track_shared(uses)
        unmatched = self.options.unmatched_includes(supported)
        if unmatched:
            raise ValueError(f"Invalid include: {unmatched} match none of the supported layers {supported}")
        partly = {p for layer in self.layers.values() for p in layer.params} & self._deselected
        for p in partly:
            warn(
                f"kronfac: parameter {self.param_names.get(p, '?')!r} is also used by a layer that include/exclude "
                "leaves untracked; its curvature covers only the tracked layers' uses"
            )

    def _track(self, use: _Candidate, block: CurvatureBlock | None = None) -> TrackedLayer:
        group = self.param_groups[use.group]
        block = block if block is not None else self.make_block(use.name, use.module, use.helper, group)
        layer = TrackedLayer(use.name, use.module, use.helper, block, use.params)
        self.layers[use.name] = layer
        self.layer_groups[use.group].append(layer)
        return layer

    def _track_shared(self, uses: list[_Candidate]) -> None:
        """One block for a parameter several layers use (see :mod:`kronfac.curvature.shared`), or first-order
        updates with a warning when the uses cannot be fitted by one Kronecker product."""
        names = [use.name for use in uses]
        shared = [p for p in uses[0].params if all(any(p is q for q in use.params) for use in uses)]
        label = ", ".join(repr(self.param_names.get(p, "?")) for p in shared) or "a parameter"
        canonical = next((use for use in uses if not use.helper.diagonal_a), uses[0])
        reason = None
        if not all(use.helper.shareable for use in uses):
            reason = "one of them is a layer type whose parameters cannot be shared (a norm or attention)"
        elif any({id(p) for p in use.params} != {id(p) for p in canonical.params} for use in uses):
            reason = "they share some of their parameters but not all (a weight with separate biases)"
        transposed = {id(use): _transposed(canonical, use) for use in uses}
        if reason is None and None in transposed.values():
            reason = "their weight matrices are neither equal nor transposes of each other"
        if reason is not None:
            self._deselected.update(p for use in uses for p in use.params)
            warn(f"kronfac: {label} is shared by layers {names}; {reason}, so they take first-order updates")
            return
        block = self.make_block(canonical.name, canonical.module, canonical.helper, self.param_groups[canonical.group])
        layer = self._track(canonical, block)
        weight = canonical.params[0]
        group = SharedParameter(label, block)
        ordered = [canonical, *(use for use in uses if use is not canonical)]
        for use in ordered:
            d_in, d_out = use.helper.dims(use.module)
            statistics = UseStatistics(
                d_in,
                d_out,
                diagonal_a=use.helper.diagonal_a,
                approx=self.options.approx,
                dtype=self.options.statistics_dtype(weight),
                device=weight.device,
            )
            group.uses.append(SharedUse(use.name, statistics, bool(transposed[id(use)])))
        self.shared[layer.name] = group
        self._use_layers[layer.name] = [
            TrackedLayer(use.name, use.module, use.helper, shared_use.statistics, use.params)
            for use, shared_use in zip(ordered, group.uses)
        ]
        warn(
            f"kronfac: {label} is shared by layers {names}: it gets one update per step from one curvature block "
            f"(kept by {canonical.name!r}), the Kronecker product nearest to the sum of the layers' blocks "
            "(see docs/kfac.md, 'Shared parameters')"
        )

    def _capture_layers(self) -> list[TrackedLayer]:
        """What the hooks feed: every tracked layer, with a shared parameter's layer replaced by its uses."""
        out = []
        for name, layer in self.layers.items():
            out.extend(self._use_layers.get(name, [layer]))
        return out

    @property
    def first_order(self) -> list[str]:
        """Names of the optimised parameters that take their gradient as it is (no curvature block)."""
        tracked = {p for layer in self.layers.values() for p in layer.params}
        return [self.param_names.get(p, "?") for g in self.param_groups for p in g["params"] if p not in tracked]

    def summary(self) -> str:
        """One line: which layers are preconditioned and which parameters are first-order."""
        first = self.first_order
        shared = "".join(
            f"; {group.parameter} shared by {', '.join(use.name for use in group.uses)} (one block)"
            for group in self.shared.values()
        )
        return (
            f"{type(self).__name__}: {len(self.layers)} layers preconditioned ({', '.join(self.layers) or '-'}); "
            f"{len(first)} parameters first-order ({', '.join(first) or '-'}){shared}"
        )

    def _warn_untracked(self, tracked: set[nn.Parameter]) -> None:
        optimised = {p for g in self.param_groups for p in g["params"]}
        owners = sorted(
            {
                name.rsplit(".", 1)[0] if "." in name else "<root>"
                for p, name in self.param_names.items()
                if p in optimised and p not in tracked and p not in self._deselected
            }
        )
        if owners:
            warn(
                f"kronfac: {type(self).__name__} has no Kronecker layer helper for the parameters of {owners}; "
                "they get the first-order update"
            )

    def _make_sync(self, distributed: DistributedConfig | bool | None) -> CurvatureSync | None:
        if distributed is False or (distributed in (None, True) and not process_group_active()):
            if distributed is True:
                raise RuntimeError("kronfac: distributed=True needs an initialised process group (torchrun)")
            return None
        config = distributed if isinstance(distributed, DistributedConfig) else DistributedConfig()
        return CurvatureSync(list(self.layers.values()), self.capture, config)

    def _make_placement(self) -> LayerPlacement | None:
        if self.sync is None:
            return None
        choice = self.sync.config.shard_curvature
        eligible = (
            self.layer_directions
            and self.correction is None
            and all(hasattr(layer.block, "release") for layer in self.layers.values())
        )
        if choice and not eligible:
            raise ValueError(
                f"Invalid distributed: shard_curvature=True needs a method whose layer blocks can live on one rank "
                f"(KFAC, CGFAC) and no correction; {type(self).__name__} keeps its curvature on every rank"
            )
        if not (self.sharded and eligible if choice is None else choice):
            return None
        return LayerPlacement(list(self.layers.values()), self.sync.comm)

    def agreement_fields(self, hypers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """What must be equal on every rank, for the distributed agreement check: the step, the periods, the
        options that shape the statistics, the correction and each group's :meth:`hyper` at this step."""
        hypers = hypers if hypers is not None else [self.hyper(group) for group in self.param_groups]
        fields: dict[str, Any] = {"step": self.steps, "factor_every": self.factor_every}
        fields[self.refresh_every_name] = self.refresh_every
        agreed = ("fisher_type", "loss", "loss_average", "approx", "mc_samples", "on_nonfinite", "max_skipped")
        fields.update({f"options.{name}": getattr(self.options, name) for name in agreed})
        fields["correction"] = self.correction
        fields.update({f"param_groups[{i}].{key}": v for i, hyper in enumerate(hypers) for key, v in hyper.items()})
        return fields

    def _correction_context(self) -> CorrectionContext:
        return CorrectionContext(
            model=self.model,
            layers=self.layers,
            param_names=self.param_names,
            loss=self.options.loss,
            loss_average=self.options.loss_average,
            output_fn=self.options.output_fn,
            paused_capture=self.paused_capture,
            average=self.sync.average_ if self.sync is not None else _keep,
        )

    # -- schedule ---------------------------------------------------------------------------------------
    def curvature_due(self, step: int | None = None) -> bool:
        return (self.steps if step is None else step) % self.factor_every == 0

    def _schedule_capture(self) -> None:
        if self.curvature_due():
            self.capture.install()
        else:
            self.capture.remove()

    @contextmanager
    def paused_capture(self) -> Iterator[None]:
        """Forward and backward passes inside do not feed the curvature statistics."""
        installed = self.capture.installed
        self.capture.remove()
        try:
            yield
        finally:
            if installed:
                self.capture.install()

    def close(self) -> None:
        """Remove every hook this optimizer (and its correction) installed (also done when it is collected)."""
        _close(self.capture, self.sync, self.correction)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refused after construction: the layers, their blocks and hooks are fixed when the optimizer is built
        (torch.optim calls this for the initial groups, which pass)."""
        if getattr(self, "_constructed", False):
            raise ValueError(
                f"{type(self).__name__}.add_param_group: kronfac optimizers fix their layers at construction; "
                "build the optimizer with param_groups=[...] covering every group instead"
            )
        super().add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch.optim's ``zero_grad``; statistics of a full forward and backward pass that no ``step()`` took
        (a step a GradScaler skipped for inf gradients) are dropped too, so they never fold into the next step."""
        pending = any(layer.block.has_pending() for layer in self.layers.values())
        if pending or any(shared.has_pending() for shared in self.shared.values()):
            if self.sync is not None:
                self.sync.statistics_dropped()
            self._discard_pending()
        super().zero_grad(set_to_none=set_to_none)

    def _discard_pending(self) -> None:
        for layer in self.layers.values():
            layer.block.discard_pending()
        for shared in self.shared.values():
            shared.discard_pending()

    def hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        """A group's hyperparameters at the current step; schedules are called and their values checked (a
        schedule that leaves its range raises ``ValueError`` naming the argument and the step)."""
        hyper = {k: resolve(v, self.steps) for k, v in group.items() if k != "params"}
        for key, value in group.items():
            if callable(value) and key in SCHEDULE_RANGES:
                hyper[key] = check_range(f"{key} at step {self.steps}", hyper[key], **SCHEDULE_RANGES[key])
        return hyper

    @property
    def timings(self) -> dict[str, float]:
        """Seconds of the last step by phase (``forward_backward``, ``factor``, ``comm_wait``, ``inversion``,
        ``precondition``, ``step``); measured for distributed runs only, else empty."""
        return dict(self.sync.timings) if self.sync is not None else {}

    # -- the step ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step of the method (the algorithm in the class docstring).

        Args:
            closure: re-evaluates the model and returns the loss (it runs under ``torch.enable_grad``).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.sync is not None:
            self.sync.begin_step()
        ok = self._gradients_finite()
        hypers = [self.hyper(group) for group in self.param_groups]  # the step counter is fixed within a step
        if self.sync is not None and self.sync.check_due():
            self.sync.check_agreement(self.agreement_fields(hypers))
        if ok and self.curvature_due():
            ok = self.commit_curvature(hypers)
        if ok:
            if self.steps % self.refresh_every == 0:
                self.scheduled_refresh(hypers)
            steps = [self._group_step(i, hyper) for i, hyper in enumerate(hypers)]
            if self.correction is not None:
                steps = self.correction.refine(steps)
            for group_step in steps:
                self._apply(group_step)
        self._finish(skipped=not ok)
        return loss

    def _gradients_finite(self) -> bool:
        grads = [_local(p.grad) for g in self.param_groups for p in g["params"] if p.grad is not None]
        finite = not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum()))
        if self.sharded and grads:  # each rank holds other shards: all must agree to skip
            finite = not sharded.any_nonfinite_anywhere(not finite, grads[0].device)
        if finite:
            return True
        bad = next(
            (
                p
                for g in self.param_groups
                for p in g["params"]
                if p.grad is not None and not _local(p.grad).isfinite().all()
            ),
            None,
        )
        if bad is None and not self.sharded:
            return True  # every entry is finite; only the norm overflowed (huge but finite gradients)
        if bad is None:
            return self._nonfinite("non-finite gradient in another rank's shard")
        owner = next((n for n, layer in self.layers.items() if any(q is bad for q in layer.params)), None)
        where = f"layer {owner!r}" if owner is not None else f"parameter {self.param_names.get(bad, '?')!r}"
        return self._nonfinite(f"non-finite gradient in {where}")

    def _nonfinite(self, message: str) -> bool:
        if self.options.on_nonfinite == "raise":
            raise FloatingPointError(f"kronfac: {message} (pass on_nonfinite='skip' to skip such steps)")
        if self.consecutive_skipped + 1 >= self.options.max_skipped:
            raise FloatingPointError(
                f"kronfac: {self.consecutive_skipped + 1} consecutive steps skipped for non-finite values, the last "
                f"for {message}: the run has diverged (lower the learning rate or raise the damping; max_skipped "
                "sets how many skips in a row are tolerated)"
            )
        warn(f"kronfac: {message}; skipping the step", KronfacRuntimeWarning)
        return False

    def commit_curvature(self, hypers: list[dict[str, Any]] | None = None) -> bool:
        """Fold the captured statistics into the blocks now (``step`` does it on curvature steps): reduce them over
        the ranks when distributed, let the correction see the batch, commit. Returns False if a value was bad.

        Args:
            hypers: each group's :meth:`hyper` at this step (computed when not given).
        """
        hypers = hypers if hypers is not None else [self.hyper(group) for group in self.param_groups]
        for shared in self.shared.values():
            shared.combine()  # each rank fits its own uses; the ranks then average the fits like any statistics
        if self.sync is not None:
            self.sync.reduce_statistics()
        if self.correction is not None:
            self.correction.before_commit()
        ok = True
        for hyper, layers in zip(hypers, self.layer_groups):
            for layer in layers:
                block = layer.block
                if self.placement is not None and not self.placement.owns(layer.name):
                    block.discard_pending()  # its owner folds the reduced statistics in
                    continue
                if not block.has_pending():
                    block.discard_pending()
                    continue
                bad = block.pending_nonfinite()
                if bad is not None:
                    block.discard_pending()
                    ok = ok and self._nonfinite(f"non-finite values in the {bad} statistics of layer {layer.name!r}")
                    continue
                failed = block.commit(**{key: hyper[key] for key in block.commit_keys})
                if failed is not None:
                    message = f"non-finite {failed} in the {type(self).__name__} update of layer {layer.name!r}"
                    ok = ok and self._nonfinite(message)
        return ok

    def refresh(self, hypers: list[dict[str, Any]] | None = None) -> None:
        """Refresh every block's derived state (inverses, damped diagonals) now; refresh steps do it by themselves.
        With a process group every rank must call it.

        Args:
            hypers: each group's :meth:`hyper` at this step (computed when not given).
        """
        hypers = hypers if hypers is not None else [self.hyper(group) for group in self.param_groups]
        work = [(layer, float(h["damping"])) for h, layers in zip(hypers, self.layer_groups) for layer in layers]
        if self.placement is not None:
            for layer, damping in work:
                if self.placement.owns(layer.name):
                    layer.block.refresh(damping)
        elif self.sync is not None:
            self.sync.refresh(work)
        else:
            refresh_blocks([(layer.block, damping) for layer, damping in work])  # equal shapes may batch
        if self.correction is not None:
            self.correction.after_refresh(
                [(layer, h) for h, layers in zip(hypers, self.layer_groups) for layer in layers]
            )

    def scheduled_refresh(self, hypers: list[dict[str, Any]]) -> None:
        """The refresh of a refresh step (every ``refresh_every``): :meth:`refresh`, unless the method defers it
        (K-FAC's ``async_refresh``)."""
        self.refresh(hypers)

    def _group_step(self, index: int, hyper: dict[str, Any]) -> GroupStep:
        group = self.param_groups[index]
        step = GroupStep(index, hyper)
        hyper, correction = step.hyper, self.correction
        weight_decay = float(hyper.get("weight_decay", 0.0))
        mode = self.weight_decay_mode if weight_decay else None
        layers = self.layer_groups[index] if self.layer_directions else []
        plain = self.plain_params[index] if self.layer_directions else list(group["params"])
        pairs: list[tuple[TrackedLayer, Tensor, Tensor]] = []
        for layer in layers:
            if any(p.grad is None for p in layer.params):
                continue
            with self._full_view(layer, values=mode in (WeightDecay.GRADIENT, WeightDecay.DIRECTION)):
                grad = layer.helper.grad_matrix(layer.module)
                if correction is not None:
                    grad = correction.transform(layer.name, grad, hyper)
                if mode is WeightDecay.GRADIENT:
                    grad = grad + weight_decay * layer.helper.param_matrix(layer.module)
                direction = correction.precondition(layer, grad) if correction is not None else None
                if self.placement is not None and not self.placement.owns(layer.name):
                    pairs.append((layer, grad, grad))  # a placeholder: the owner's direction replaces it below
                    continue
                if direction is None:
                    direction = self.direction(layer, grad, hyper)
                if mode is WeightDecay.DIRECTION:
                    decay = layer.helper.param_matrix(layer.module).to(direction.dtype)
                    direction = direction + weight_decay * decay
            pairs.append((layer, grad, direction))
        if self.placement is not None and pairs:
            mine = {layer.name: u for layer, _, u in pairs if self.placement.owns(layer.name)}
            every = self.placement.broadcast_directions(mine, {layer.name: g for layer, g, _ in pairs})  # type: ignore[arg-type]
            pairs = [(layer, g, every[layer.name]) for layer, g, _ in pairs]
        if hyper.get("kl_clip") is not None and pairs:
            pairs = self._kl_clip(pairs, hyper)
        for layer, _, direction in pairs:
            if correction is not None:
                with self._full_view(layer, values=True, grads=False):
                    correction.observe(layer.name, direction, hyper)
            step.params.extend(layer.params)
            pieces = layer.helper.split(layer.module, direction)
            step.directions.extend(sharded.shard_like(u.to(p.dtype), p) for u, p in zip(pieces, layer.params))
        for p in plain:
            if p.grad is None:
                continue
            grad = p.grad
            if correction is not None:
                grad = correction.transform(self.param_names.get(p, "?"), grad, hyper)
            if mode in (WeightDecay.GRADIENT, WeightDecay.DIRECTION):
                grad = grad.add(p, alpha=weight_decay)
            step.params.append(p)
            step.directions.append(grad)
        return step

    @contextmanager
    def _full_view(self, layer: TrackedLayer, *, values: bool, grads: bool = True) -> Iterator[None]:
        """The layer's helper reads full gradients (and values) of sharded parameters: one all-gather each."""
        if not self.sharded or not sharded.shards_any(layer.params):
            yield
            return
        tensors = {
            id(p): (sharded.full(p.detach()) if values else None, sharded.full(p.grad) if grads else p.grad)
            for p in layer.params
            if p.grad is not None
        }
        with full_tensors(tensors):
            yield

    @staticmethod
    def _kl_clip(
        pairs: list[tuple[TrackedLayer, Tensor, Tensor]], hyper: dict[str, Any]
    ) -> list[tuple[TrackedLayer, Tensor, Tensor]]:
        """``ν = min(1, sqrt(κ / (α² Σ <U, ∇W>)))`` over the group's layers; the directions are scaled by ν."""
        lr, kl_clip = float(hyper["lr"]), float(hyper["kl_clip"])
        vg = torch.stack([torch.vdot(u.reshape(-1), g.reshape(-1)) for _, g, u in pairs]).sum() * lr**2
        scale: Tensor | float
        if vg.device.type == "cpu":  # a host value costs nothing here: ν in Python, one scalar multiply per layer
            value = float(vg)
            # A non-positive vg (lr = 0 or round-off) gives ν = 1: the step is left alone.
            scale = min(1.0, math.sqrt(kl_clip / value)) if value > 0 else 1.0
            if scale == 1.0:
                return pairs
        else:  # no host sync on an accelerator
            scale = (kl_clip / vg.clamp_min(1e-30)).sqrt_().clamp_max_(1.0).masked_fill_(vg <= 0, 1.0)
        # In place unless the preconditioner handed the gradient back (no inverse yet).
        return [(layer, g, u * scale if u is g else u.mul_(scale)) for layer, g, u in pairs]

    def _apply(self, step: GroupStep) -> None:
        if not step.params:
            return
        parts = [step]
        if self.sharded:  # the foreach kernels take DTensors or plain tensors, not both in one list
            kinds = [sharded.is_sharded(p) for p in step.params]
            parts = [
                GroupStep(
                    step.index,
                    step.hyper,
                    [p for p, k in zip(step.params, kinds) if k is kind],
                    [u for u, k in zip(step.directions, kinds) if k is kind],
                )
                for kind in (True, False)
                if kind in kinds
            ]
        weight_decay = float(step.hyper.get("weight_decay", 0.0))
        for part in parts:
            if weight_decay and self.weight_decay_mode is WeightDecay.DECOUPLED:
                torch._foreach_mul_(part.params, 1.0 - float(part.hyper["lr"]) * weight_decay)
            self.update(part)

    def _finish(self, *, skipped: bool) -> None:
        self.consecutive_skipped = self.consecutive_skipped + 1 if skipped else 0
        if skipped:
            self.num_skipped += 1
            if self.sync is not None:
                self.sync.discard()
            self._discard_pending()
        self.steps += 1
        self._schedule_capture()
        if self.sync is not None:
            self.sync.end_step()

    # -- checkpointing ----------------------------------------------------------------------------------
    def _anchor(self) -> Tensor | None:
        """The parameter whose state carries the curvature blob (the first optimised one)."""
        return next((p for group in self.param_groups for p in group["params"]), None)

    def _signatures(self) -> dict[str, str]:
        out = {}
        for name, layer in self.layers.items():
            d_in, d_out = layer.helper.dims(layer.module)
            out[name] = f"{type(layer.block).__name__} {d_in} x {d_out}"
        return out

    def _layer_states(self) -> dict[str, Any]:
        states = {name: layer.block.state_dict() for name, layer in self.layers.items()}
        return states if self.placement is None else self.placement.gather_states(states)

    def curvature_state_dict(self) -> dict[str, Any]:
        """Everything of the state beyond torch.optim's per-parameter state: counters, the capture's sampler,
        every layer's block, the correction (what :meth:`state_dict` carries as one blob)."""
        return {
            "optimizer": type(self).__name__,
            "signatures": self._signatures(),
            "steps": self.steps,
            "num_skipped": self.num_skipped,
            "consecutive_skipped": self.consecutive_skipped,
            "capture": self.capture.state_dict(),
            "layers": self._layer_states(),
            "correction": self.correction.state_dict() if self.correction is not None else {},
        }

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state_dict; the curvature state rides in the first parameter's state (see
        ``kronfac.optim.checkpoint``), so ``torch.save`` and torch.distributed.checkpoint both keep it."""
        state = super().state_dict()
        for group in state["param_groups"]:
            for key, value in group.items():
                if callable(value):
                    group[key] = CALLABLE
        if self._anchor() is not None:
            # torch.optim numbers the parameters in group order from 0, so the anchor is index 0
            state["state"][0] = {
                **state["state"].get(0, {}),
                checkpoint.KEY: checkpoint.encode(self.curvature_state_dict()),
            }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop(checkpoint.KEY, None)  # the layout of earlier kronfac versions
        if extra is None:
            for index, entry in state_dict.get("state", {}).items():
                if isinstance(entry, dict) and checkpoint.KEY in entry:
                    entry = dict(entry)
                    extra = entry.pop(checkpoint.KEY)
                    state_dict["state"] = {**state_dict["state"], index: entry}
                    break
        if extra is None:
            raise ValueError("state_dict has no kronfac curvature state: it was not saved by a kronfac optimizer")
        extra = checkpoint.decode(extra)
        checkpoint.check_compatible(extra, type(self).__name__, self._signatures())
        live = [dict(g) for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, old in zip(self.param_groups, live):
            for key, value in group.items():
                if isinstance(value, str) and value == CALLABLE:
                    group[key] = old[key]
        for name, layer in self.layers.items():  # each layer's curvature on its parameters' device
            layer.block.load_state_dict(checkpoint.to_device(extra["layers"][name], layer.params[0].device))
            if self.placement is not None and not self.placement.owns(name):
                layer.block.release()  # type: ignore[attr-defined]
        self.steps, self.num_skipped = int(extra["steps"]), int(extra["num_skipped"])
        self.consecutive_skipped = int(extra.get("consecutive_skipped", 0))
        self.capture.load_state_dict(extra["capture"])  # the sampler's state is a CPU tensor by torch's API
        if self.correction is not None:
            anchor = self._anchor()
            correction = extra.get("correction", {})
            if anchor is not None:
                correction = checkpoint.to_device(correction, anchor.device)
            self.correction.load_state_dict(correction)
        self.load_curvature_extra(extra)
        self._schedule_capture()

    def load_curvature_extra(self, extra: dict[str, Any]) -> None:
        """Restore what a method adds to :meth:`curvature_state_dict` (``extra``: the decoded blob, tensors on the
        CPU); called at the end of ``load_state_dict``."""
