"""Hooks that feed layer inputs and output gradients to each layer's curvature statistics.

Hooks exist only while a curvature update is due (:meth:`Capture.install` / :meth:`Capture.remove`), so steps
without one pay nothing. Output gradients are read by a tensor hook registered on the layer's output in the
forward hook; a tensor hook registered before an in-place op (``ReLU(inplace=True)``) receives the gradient
w.r.t. the value at registration time, so in-place ops after the layer are safe.

Layers whose output gradients lie inside their module's forward (a :class:`~kronfac.layers.base.CallHelper`:
``nn.MultiheadAttention``) are captured per call instead: a forward pre-hook and forward hook record the call,
and the tensor hook on the module's output hands the output gradient to the helper, which recomputes the call
locally and returns the rows of the layer and of the submodules its call feeds (``out_proj``).

For the ``mc`` and ``type2`` Fisher types a forward hook on the model samples output gradients right after the
forward pass and back-propagates them with ``torch.autograd.grad`` (no ``.grad`` is touched); the user's own
backward pass then leaves the statistics alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from kronfac.curvature.block import CurvatureBlock
from kronfac.curvature.fisher import FisherType, LossAverage, LossType, sampled_output_grads
from kronfac.errors import warn
from kronfac.layers.base import CallHelper, LayerHelper, RecordedCall, helper_for

__all__ = ["Capture", "CaptureListener", "TrackedLayer"]


@dataclass(eq=False)
class TrackedLayer:
    """A module with a helper and the curvature statistics it feeds."""

    name: str
    module: nn.Module
    helper: LayerHelper
    block: CurvatureBlock
    params: list[nn.Parameter] = field(default_factory=list)


class CaptureListener(Protocol):
    """Told when a layer's batch statistics of the current step are complete (used by distributed K-FAC to
    start communicating them while the backward pass continues)."""

    def statistics_complete(self, layer: TrackedLayer) -> None: ...


def first_tensor(output: Any) -> Tensor:
    """The logits of a model output: the tensor itself, a ``.logits`` attribute (Hugging Face ``ModelOutput``),
    or the first tensor of a dict, list or tuple."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        for item in output:
            if isinstance(item, Tensor):
                return item
    raise TypeError(
        f"kronfac: cannot find the model output tensor in a {type(output).__name__}; pass output_fn= to pick it"
    )


def _full_precision(rows: Tensor) -> Any:
    """Statistics are outer products of rows: computed outside any autocast region (a bf16 matmul would round
    ``A`` and ``G`` to 8 bits of mantissa), in the block's own dtype."""
    device = rows.device.type
    if not torch.is_autocast_enabled(device):
        return contextlib.nullcontext()  # entering a disabled autocast costs ~20 µs a call, per layer and batch
    return torch.autocast(device, enabled=False)


class Capture:
    """Installs and removes the curvature hooks of a set of tracked layers.

    Args:
        model: the root module (its forward hook drives MC / type2 sampling).
        layers: tracked layers.
        fisher_type: which Fisher the output gradients estimate.
        loss: loss of the model output (needed for ``mc`` and ``type2``).
        loss_average: rows the loss is averaged over (sets the scale of G).
        mc_samples: number of sampled labels per input for ``mc``.
        seed: seed of the generator that samples labels (its state is part of the optimizer state).
        grad_scale: callable returning the current loss scale of a GradScaler (empirical Fisher only).
        output_fn: picks the logits from the model's output when it is not a tensor.
        accumulation_steps: backward passes per optimizer step whose losses are each divided by this number
            (the frameworks' gradient-accumulation convention); their output gradients are scaled back.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: list[TrackedLayer],
        *,
        fisher_type: FisherType,
        loss: LossType,
        loss_average: LossAverage,
        mc_samples: int = 1,
        seed: int = 0,
        grad_scale: Callable[[], float] | None = None,
        output_fn: Callable[[Any], Tensor] | None = None,
        accumulation_steps: int = 1,
    ) -> None:
        self.model, self.layers = model, layers
        self.fisher_type, self.loss, self.loss_average = fisher_type, loss, loss_average
        self.mc_samples, self.seed = mc_samples, seed
        self.grad_scale, self.output_fn = grad_scale, output_fn
        self.accumulation_steps = accumulation_steps
        self._handles: list[RemovableHandle] = []
        self._sampling = False
        self._count = 1
        self._generator: torch.Generator | None = None
        self._generator_state: Tensor | None = None
        #: Optional listener; only when one is set are completions tracked and hook time measured.
        self.listener: CaptureListener | None = None
        #: Seconds spent in the hooks since the last :meth:`reset_completion` (measured with a listener only).
        self.factor_seconds = 0.0
        self._open: dict[str, int] = {}
        self._by_module = {layer.module: layer for layer in layers}
        self._before: dict[str, Any] = {}
        self._warned: set[str] = set()
        self._shape_checked = False
        #: Leading dimension of the model's first tensor argument in the current forward (the batch size).
        self._batch = 1
        self._warn_unfed()

    def _warn_unfed(self) -> None:
        """A tracked submodule fed only by its parent's calls (``out_proj``) gets no statistics when the parent is
        not tracked (excluded, frozen): say so rather than keep a block that never fills."""
        for name, module in self.model.named_modules():
            helper = helper_for(module)
            if not isinstance(helper, CallHelper) or module in self._by_module:
                continue
            for path in helper.fed_submodules:
                sub = self._by_module.get(module.get_submodule(path))
                if sub is not None:
                    warn(
                        f"kronfac: layer {sub.name!r} gets no curvature statistics (first-order updates): its "
                        f"statistics come from the calls of {name!r}, which is not tracked; track both or neither"
                    )

    def reset_completion(self) -> None:
        """Forget forward passes still waiting for their backward and zero :attr:`factor_seconds`."""
        self._open.clear()
        self.factor_seconds = 0.0

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def install(self) -> None:
        if self.installed:
            return
        for layer in self.layers:
            if isinstance(layer.helper, CallHelper):
                self._handles.append(layer.module.register_forward_pre_hook(self._pre_call_hook(layer)))
                self._handles.append(layer.module.register_forward_hook(self._call_hook(layer), with_kwargs=True))
            else:
                self._handles.append(layer.module.register_forward_hook(self._forward_hook(layer)))
        self._handles.append(self.model.register_forward_pre_hook(self._batch_hook, with_kwargs=True))
        if self.fisher_type is not FisherType.EMPIRICAL:
            self._handles.append(self.model.register_forward_hook(self._sample_hook))
        elif not self._shape_checked:
            self._handles.append(self.model.register_forward_hook(self._shape_hook))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    close = remove

    # -- generator state (for bit-identical resumption of MC runs) ------------------------------------------
    def generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            if self._generator_state is not None:
                self._generator.set_state(self._generator_state)
            else:
                self._generator.manual_seed(self.seed)
        return self._generator

    def state_dict(self) -> dict[str, Any]:
        state = self._generator.get_state() if self._generator is not None else self._generator_state
        return {"generator": state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._generator, self._generator_state = None, state.get("generator")

    # -- hooks ------------------------------------------------------------------------------------------
    def _batch_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        tensor = next((t for t in (*args, *kwargs.values()) if isinstance(t, Tensor) and t.ndim > 0), None)
        self._batch = tensor.shape[0] if tensor is not None else 1

    def _row_count(self, rows: Tensor) -> int:
        """``M``, the rows the loss is averaged over, as seen by this layer. A layer whose input has a leading
        dimension of 1 in a batch of ``N`` is broadcast over the batch (Hugging Face's position embeddings look
        up ``(1, T)`` positions): its output gradient arrives summed over the samples, and ``M = N`` makes
        ``G = M Σ grad gradᵀ`` the per-sample estimate (exact when one sample carries the gradient, unbiased for
        uncorrelated per-sample gradients); with ``M = 1`` it was ``N`` times too small."""
        samples = self._batch if rows.shape[0] == 1 else rows.shape[0]
        if self.loss_average is LossAverage.BATCH:
            return samples
        if self.loss_average is LossAverage.BATCH_SEQUENCE:
            return samples * rows.shape[1]
        return 1

    def _forward_hook(self, layer: TrackedLayer) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            if not torch.is_grad_enabled() or not isinstance(output, Tensor) or not output.requires_grad:
                return
            if not module.training or args[0].numel() == 0:
                return  # an eval-mode forward (metrics, generation) or an empty batch is not curvature data
            start = perf_counter() if self.listener is not None else 0.0
            rows = self._add_inputs(layer, args[0].detach())
            count = self._row_count(rows)
            output.register_hook(lambda grad: self._grad_hook(layer, count, grad))
            if self.listener is not None:
                self._open[layer.name] = self._open.get(layer.name, 0) + 1
                self.factor_seconds += perf_counter() - start

        return hook

    def _add_inputs(self, layer: TrackedLayer, x: Tensor) -> Tensor:
        """Feed the layer's input ``x`` (in the layout of its module's input) to its block; return the rows."""
        rows = layer.helper.input_rows(layer.module, x)
        with _full_precision(rows):
            layer.block.add_inputs(rows)
        return rows

    def _grad_hook(self, layer: TrackedLayer, row_count: int, grad: Tensor) -> None:
        if self._ignores_backward():
            return
        start = perf_counter() if self.listener is not None else 0.0
        self._add_output_grads(layer, row_count, layer.helper.output_grad_rows(layer.module, grad.detach()), start)

    def _ignores_backward(self) -> bool:
        """MC/type2 statistics come from our own backward pass, not the user's."""
        return (self.fisher_type is not FisherType.EMPIRICAL) != self._sampling

    def _add_output_grads(self, layer: TrackedLayer, row_count: int, rows: Tensor, start: float) -> None:
        sampled = self.fisher_type is not FisherType.EMPIRICAL
        if sampled:
            # Sampled gradients are those of the summed loss: G = (1/M) Σ g g^T.
            with _full_precision(rows):
                layer.block.add_output_grads(rows, 1.0 / row_count, self._count)
            if self.listener is not None:
                self.factor_seconds += perf_counter() - start
            return
        scale = (self.grad_scale() if self.grad_scale is not None else 1.0) / self.accumulation_steps
        if scale != 1.0:
            rows = rows / scale
        if self.grad_scale is not None and not bool(torch.isfinite(rows).all()):
            return  # GradScaler will skip this step; keep the statistics clean
        # The user's loss is averaged over M rows, grad = g / M: G = M Σ grad grad^T.
        with _full_precision(rows):
            layer.block.add_output_grads(rows, float(row_count), 1)
        if self.listener is not None:
            # Complete once every forward call of the layer in this step has had its backward.
            self._open[layer.name] = left = self._open.get(layer.name, 1) - 1
            self.factor_seconds += perf_counter() - start
            if left <= 0:
                self.listener.statistics_complete(layer)

    # -- layers captured per call (CallHelper) ----------------------------------------------------------
    def _target(self, layer: TrackedLayer, path: str) -> TrackedLayer | None:
        """The tracked layer a call's rows belong to: the layer itself or a submodule it feeds."""
        return layer if not path else self._by_module.get(layer.module.get_submodule(path))

    def _pre_call_hook(self, layer: TrackedLayer) -> Callable[..., None]:
        helper = layer.helper
        assert isinstance(helper, CallHelper)

        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if torch.is_grad_enabled():
                self._before[layer.name] = helper.before_call(module)

        return hook

    def _call_hook(self, layer: TrackedLayer) -> Callable[..., None]:
        helper = layer.helper
        assert isinstance(helper, CallHelper)

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            before = self._before.pop(layer.name, None)
            out = output if isinstance(output, Tensor) else first_tensor(output)
            if not torch.is_grad_enabled() or not out.requires_grad or not module.training or out.numel() == 0:
                return  # as for every layer: eval-mode forwards and empty batches are not curvature data
            start = perf_counter() if self.listener is not None else 0.0
            call = helper.record_call(module, args, kwargs, before)
            if call.skipped is not None and layer.name not in self._warned:
                self._warned.add(layer.name)
                warn(f"kronfac: layer {layer.name!r}: {call.skipped}")
            # A skipped call still feeds the submodules (cross-attention: out_proj), not the layer itself.
            paths = ("", *helper.fed_submodules) if call.skipped is None else helper.fed_submodules
            targets = [(path, self._target(layer, path)) for path in paths]
            fed = [(path, target) for path, target in targets if target is not None]
            for path, target in fed:
                if path in call.inputs:
                    self._add_inputs(target, call.inputs[path])
            pending_inputs = [(path, target) for path, target in fed if path not in call.inputs]
            out.register_hook(lambda grad: self._call_grad_hook(layer, call, fed, pending_inputs, grad))
            if self.listener is not None:
                for _, target in fed:
                    self._open[target.name] = self._open.get(target.name, 0) + 1
                self.factor_seconds += perf_counter() - start

        return hook

    def _call_grad_hook(
        self,
        layer: TrackedLayer,
        call: RecordedCall,
        fed: list[tuple[str, TrackedLayer]],
        pending_inputs: list[tuple[str, TrackedLayer]],
        grad: Tensor,
    ) -> None:
        if self._ignores_backward() or not fed:
            return
        start = perf_counter() if self.listener is not None else 0.0
        helper = layer.helper
        assert isinstance(helper, CallHelper)
        with _full_precision(grad):
            rows = helper.call_rows(layer.module, call, grad.detach(), keep_graph=self._sampling)
        # Inputs found in the backward pass are added once per call (a sampled Fisher runs several backwards).
        while pending_inputs:
            path, target = pending_inputs.pop()
            self._add_inputs(target, rows.inputs[path])
        for path, target in fed:
            grad_rows = target.helper.output_grad_rows(target.module, rows.output_grads[path])
            self._add_output_grads(target, self._row_count(grad_rows), grad_rows, start)
            start = perf_counter() if self.listener is not None else 0.0

    def _check_sequence_average(self, logits: Tensor) -> None:
        """Once: sequence logits with ``loss_average="batch"`` usually mean a token-mean LM loss, whose ``G`` is
        then too small by the sequence length."""
        if self._shape_checked:
            return
        self._shape_checked = True
        if logits.ndim >= 3 and self.loss_average is LossAverage.BATCH:
            warn(
                f"kronfac: the model's output has shape {tuple(logits.shape)} (sequences) and loss_average is "
                "'batch'; if the loss is a mean over every token (Hugging Face language models, "
                "cross_entropy on flattened logits), pass loss_average='batch+sequence'"
            )

    def _shape_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._shape_checked or not torch.is_grad_enabled():
            return
        try:
            logits = self.output_fn(output) if self.output_fn is not None else first_tensor(output)
        except TypeError:
            self._shape_checked = True  # no tensor to look at
            return
        self._check_sequence_average(logits)

    def _sample_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not torch.is_grad_enabled():
            return
        logits = self.output_fn(output) if self.output_fn is not None else first_tensor(output)
        self._check_sequence_average(logits)
        if logits.ndim == 0:
            raise ValueError(
                "kronfac: fisher_type='mc'/'type2' needs the model's logits, but its output is a 0-d tensor (a loss?); "
                "pass output_fn= to pick the logits from the output"
            )
        if not self.model.training or logits.numel() == 0:
            return
        if not logits.requires_grad or not bool(torch.isfinite(logits).all()):
            return  # non-finite outputs: the optimizer's gradient check reports them
        # One entry per parameter: the uses of a shared weight are several layers of one tensor.
        weights = list({id(layer.params[0]): layer.params[0] for layer in self.layers}.values())
        grads = sampled_output_grads(
            logits, self.fisher_type, self.loss, self.mc_samples, self.generator(logits.device)
        )
        self._sampling = True
        try:
            for i, grad in enumerate(grads):
                # type2 columns sum into one sample; MC samples each count once.
                self._count = 1 if (self.fisher_type is FisherType.MC or i == 0) else 0
                torch.autograd.grad(
                    logits, weights, grad_outputs=grad.to(logits.dtype), retain_graph=True, allow_unused=True
                )
        finally:
            self._sampling = False
        if self.listener is not None:
            # Sampled statistics are complete once the sampling passes are done (in reverse layer order,
            # the order a backward pass would complete them).
            for layer in reversed(self.layers):
                if self._open.pop(layer.name, 0):
                    self.listener.statistics_complete(layer)
