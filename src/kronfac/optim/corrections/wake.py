"""QE-KLD-WRM's refinement stage: a few inner steps on the exact KL wake objective (Puiu 2022, section on QE).

Starting from the Q step, the parameters take ``steps`` monotone steps on
``J(θ) = g_k^T s + ½ s^T F_k s + λ_k Σ_j w_j [KL(p_{θ_j}(x) || p_θ(x)) + (δ/2) ||θ - θ_j||²]`` (``s = θ - θ_k``,
``F_k s`` from the batch factors ``G_k S A_k``) on the current batch ``x`` against the last ``networks`` stored
snapshots; a step that raises ``J`` is undone and retried at half the size. The refined step is then KL-clipped
in the Fisher norm. See :mod:`kronfac.optim.corrections.kldwrm` for the variants.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from kronfac.curvature.capture import TrackedLayer, first_tensor
from kronfac.curvature.fisher import LossAverage, LossType
from kronfac.curvature.kfac_block import KFACBlock
from kronfac.distributed import sharded
from kronfac.optim.corrections.base import CorrectionContext
from kronfac.optim.types import GroupStep

__all__ = ["WakeRefinement", "clone_state"]


def clone_state(value: Any) -> Any:
    """A deep copy of nested dicts/lists/tuples of tensors (detached)."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: clone_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(clone_state(v) for v in value)
    return value


def as_matrix(layer: TrackedLayer, tensors: list[Tensor]) -> Tensor:
    """Per-parameter tensors of a layer (weight, bias) as its ``d_o x d_i`` matrix, like ``grad_matrix``."""
    if layer.helper.diagonal_a:
        return tensors[0].T
    return torch.cat([tensors[0].reshape(tensors[0].shape[0], -1)] + [t.unsqueeze(1) for t in tensors[1:]], dim=1)


class WakeRefinement:
    """The QE inner loop (see the module docstring).

    Args:
        steps: inner steps.
        lr: inner step size as a fraction of the group's lr.
        networks: snapshots kept (the current one included).
        preconditioned: precondition the inner gradient with ``precondition`` (else plain gradient steps).
        rho: the wake decay of a group from its hyperparameters.
        batch: layer -> ``(A_k, G_k)``, the batch factors of the step (shared with the Q recursion).
        precondition: the (augmented) K-FAC direction of a layer's gradient matrix.
    """

    def __init__(
        self,
        *,
        steps: int,
        lr: float,
        networks: int,
        preconditioned: bool,
        rho: Callable[[dict[str, Any]], float],
        batch: dict[str, tuple[Tensor, Tensor]],
        precondition: Callable[[TrackedLayer, Tensor], Tensor],
    ) -> None:
        self.steps, self.lr, self.networks, self.preconditioned = steps, lr, networks, preconditioned
        self.rho, self.batch, self.precondition = rho, batch, precondition
        self.snapshots: list[dict[str, Tensor]] = []  # newest first
        self._inputs: list[tuple[Any, ...]] = []  # the positional inputs of every training forward since the step
        self._handle: Any = None
        self._inner = False
        self._context: CorrectionContext | None = None

    def bind(self, context: CorrectionContext) -> None:
        if any(sharded.is_sharded(p) for p in context.model.parameters()):
            raise ValueError(
                "Invalid correction: KLD-WRM 'qe' re-evaluates the model with torch.func.functional_call, which "
                "FSDP2's sharded parameters do not support; use KLDWRM('q') or KLDWRM('so') with fully_shard"
            )
        self._context = context
        self._handle = context.model.register_forward_pre_hook(self._save_inputs)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def context(self) -> CorrectionContext:
        assert self._context is not None, "bind() first"
        return self._context

    def _save_inputs(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if torch.is_grad_enabled() and not self._inner and module.training:
            self._inputs.append(tuple(a.detach() if isinstance(a, Tensor) else a for a in args))

    def refine(self, steps: list[GroupStep]) -> list[GroupStep]:
        """Store the current parameters as the newest snapshot, then refine every group's directions."""
        current = {n: p.detach().clone() for n, p in self.context.model.named_parameters()}
        self.snapshots.insert(0, current)
        del self.snapshots[self.networks :]
        if not self._inputs or self.steps == 0:
            self._inputs.clear()
            return steps
        self._inner = True
        try:
            with self.context.paused_capture(), torch.enable_grad():
                self._refine(steps)
        finally:
            self._inner = False
            self._inputs.clear()
        return steps

    def _kl(self, targets: list[Tensor], outs: list[Tensor]) -> Tensor:
        """The KL (or squared distance) of the step's batch, averaged as the loss is, over its micro-batches
        (several when gradients are accumulated)."""
        total: Tensor | float = 0.0
        samples = positions = 0
        for target, out in zip(targets, outs):
            classes = out.shape[-1]
            rows = out.reshape(-1, classes)
            ref = target.reshape(-1, classes).to(rows.dtype)
            if self.context.loss is LossType.MSE:
                total = total + (rows - ref).square().sum()
            else:
                log_p = torch.log_softmax(ref, dim=-1)
                total = total + (log_p.exp() * (log_p - torch.log_softmax(rows, dim=-1))).sum()
            samples, positions = samples + out.shape[0], positions + rows.shape[0]
        assert isinstance(total, Tensor)
        if self.context.loss_average is LossAverage.BATCH:
            return total / samples
        if self.context.loss_average is LossAverage.BATCH_SEQUENCE:
            return total / positions
        return total

    def _output(self, params: dict[str, Tensor]) -> list[Tensor]:
        """The model's logits with ``params`` on every micro-batch of the step."""
        model = self.context.model
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        fn = self.context.output_fn or first_tensor
        return [fn(functional_call(model, {**params, **buffers}, inputs)) for inputs in self._inputs]

    def _refine(self, steps: list[GroupStep]) -> None:
        names = self.context.param_names
        current = self.snapshots[0]
        m = len(self.snapshots)
        with torch.no_grad():
            targets = [self._output(snap) for snap in self.snapshots]
        theta: dict[str, Tensor] = {}
        meta = []  # (name, group step, g_k)
        for step in steps:
            lr = float(step.hyper["lr"])
            if lr <= 0:
                continue
            wd = float(step.hyper.get("weight_decay", 0.0))
            for p, u in zip(step.params, step.directions):
                name = names[p]
                theta[name] = (current[name] - lr * u.detach()).requires_grad_(True)
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                meta.append((name, step, grad.detach() + wd * current[name]))
        if not theta:
            return
        active = {id(s): s for _, s, _ in meta}
        weights = {
            key: [(1 - self.rho(s.hyper)) * self.rho(s.hyper) ** j for j in range(m - 1)]
            + [self.rho(s.hyper) ** (m - 1)]
            for key, s in active.items()
        }
        anchors = {
            name: sum(wj * snap[name] for wj, snap in zip(weights[id(s)], self.snapshots)) for name, s, _ in meta
        }
        # Monotone inner descent: every iterate is evaluated; a step that raises the wake objective J is undone
        # and retried at half the size, so the result is never worse (in J) than the Q step it starts from.
        scale, best_value = self.lr, math.inf
        best: dict[str, Tensor] = {}
        direction: dict[str, Tensor] = {}
        for iteration in range(self.steps + 1):
            frozen = {n: t for n, t in current.items() if n not in theta}
            out = self._output({**frozen, **theta})
            kl_grads: dict[str, Tensor] = {}
            kl_values = []
            for key, s in active.items():
                kl = torch.stack([wj * self._kl(t, out) for wj, t in zip(weights[key], targets)]).sum()
                own = [n for n, s2, _ in meta if s2 is s]
                kl_grads.update(zip(own, torch.autograd.grad(kl, [theta[n] for n in own], retain_graph=True)))
                kl_values.append(kl.detach().reshape(1))
            # the KL terms are of the local batch: their means over the ranks are the global batch's
            self.context.average([*kl_values, *kl_grads.values()])
            value = sum(float(kl) / float(s.hyper["lr"]) for kl, s in zip(kl_values, active.values()))
            with torch.no_grad():
                model_terms = self._model_terms(theta, current)
                gradients = {}
                for name, s, g_k in meta:
                    lr, damping = float(s.hyper["lr"]), float(s.hyper["damping"])
                    diff = theta[name] - current[name]
                    value += float((g_k * diff).sum() + 0.5 * (model_terms[name] * diff).sum())
                    value += 0.5 * damping / lr * float((theta[name] - anchors[name]).square().sum())
                    wake = kl_grads[name] + damping * (theta[name] - anchors[name])
                    gradients[name] = g_k + model_terms[name] + wake / lr
                if not best and not math.isfinite(value):
                    best = {n: t.detach().clone() for n, t in theta.items()}
                    break  # the objective overflowed at the Q step: keep the Q step, no refinement
                if value <= best_value:
                    best_value = value
                    best = {n: t.detach().clone() for n, t in theta.items()}
                    direction = self._precondition_all(gradients) if self.preconditioned else gradients
                else:
                    scale *= 0.5
                if iteration == self.steps:
                    break
                for name, s, _ in meta:
                    theta[name].copy_(best[name] - scale * float(s.hyper["lr"]) * direction[name])
        for step in steps:
            lr = float(step.hyper["lr"])
            if not any(names[p] in best for p in step.params):
                continue
            new = [
                (current[names[p]] - best[names[p]]) / lr if names[p] in best else u
                for p, u in zip(step.params, step.directions)
            ]
            if step.hyper.get("kl_clip") is not None:
                new = self._kl_clip(step, new)
            step.directions = new

    def _kl_clip(self, step: GroupStep, updates: list[Tensor]) -> list[Tensor]:
        """KL clip of the refined step in the Fisher norm, ``ν = min(1, sqrt(κ / (lr² uᵀ(F̄ + δI)u)))`` over the
        group (K-FAC's ``<u, g>`` equals it for ``u = (F̄ + δI)^{-1} g``; the refined step is not of that form)."""
        names = self.context.param_names
        lr, kl_clip, damping = (float(step.hyper[k]) for k in ("lr", "kl_clip", "damping"))
        by_name = {names[p]: u for p, u in zip(step.params, updates)}
        seen: set[str] = set()
        quad = 0.0
        for layer in self.context.layers.values():
            pnames = [names[p] for p in layer.params]
            block = layer.block
            assert isinstance(block, KFACBlock)
            if any(n not in by_name for n in pnames) or block.a_factor is None or block.g_factor is None:
                continue
            u = as_matrix(layer, [by_name[n] for n in pnames]).to(block.g_factor.dtype)
            fu = block.g_factor @ u
            fu = fu * block.a_factor if block.a_factor.ndim == 1 else fu @ block.a_factor
            quad += float((u * (fu + damping * u)).sum())
            seen.update(pnames)
        quad += sum(float(u.square().sum()) for n, u in by_name.items() if n not in seen)
        vg = quad * lr**2
        nu = min(1.0, (kl_clip / vg) ** 0.5) if vg > 0 else 1.0
        return [u * nu for u in updates]

    def _model_terms(self, theta: dict[str, Tensor], current: dict[str, Tensor]) -> dict[str, Tensor]:
        """``F_k s`` per parameter with the batch factors ``G_k S A_k`` (zero for parameters without a block)."""
        names = self.context.param_names
        out = {name: torch.zeros_like(t) for name, t in theta.items()}
        for layer in self.context.layers.values():
            pnames = [names[p] for p in layer.params]
            if layer.name not in self.batch or any(n not in theta for n in pnames):
                continue
            s = as_matrix(layer, [theta[n].detach() - current[n] for n in pnames])
            a_batch, g_batch = self.batch[layer.name]
            fs = g_batch.to(s.dtype) @ s
            fs = fs * a_batch.to(s.dtype) if a_batch.ndim == 1 else fs @ a_batch.to(s.dtype)
            for n, part in zip(pnames, layer.helper.split(layer.module, fs)):
                out[n] = part.reshape(theta[n].shape)
        return out

    def _precondition_all(self, gradients: dict[str, Tensor]) -> dict[str, Tensor]:
        """The inner gradient of every layer through the (augmented) K-FAC inverse; other parameters as they are."""
        names = self.context.param_names
        out = dict(gradients)
        for layer in self.context.layers.values():
            pnames = [names[p] for p in layer.params]
            if any(n not in gradients for n in pnames):
                continue
            matrix = self.precondition(layer, as_matrix(layer, [gradients[n] for n in pnames]))
            for n, part in zip(pnames, layer.helper.split(layer.module, matrix)):
                out[n] = part.reshape(gradients[n].shape)
        return out
