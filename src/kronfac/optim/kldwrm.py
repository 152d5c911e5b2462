"""KLD-WRM: K-FAC regularised toward the wake of past iterates (Puiu 2022), as a correction rule for K-FAC.

Puiu, "Rethinking Exponential Averaging of the Fisher", ECML PKDD 2022 (arXiv:2204.04718).

EMA K-FAC steps to ``argmin_s g_k^T s + (λ_k/2) Σ_j w_kj s^T F_j s``: every past curvature is centred at the
*current* iterate. KLD-WRM instead penalises the distance to the past *networks*,

    θ_{k+1} = argmin_θ  L_k(θ) + λ_k Σ_{j<=k} w_kj KL(p_{θ_j} || p_θ),     λ_k = 1 / lr_k,

with the EMA weights ``w_kj`` of decay ρ (``w_kj = (1-ρ) ρ^{k-j}``, the oldest term taking the rest, so
``w_kj = ρ w_{k-1,j}``). The three practical variants of the paper, here as rules :class:`~kronfac.KFAC` composes
into its step (``KFAC(model, correction=KLDWRM(...))``), not as copies of K-FAC:

* ``"so"`` (second-order KL, linear loss): with ``KL_j ≈ ½ (θ-θ_j)^T (F_j + δI) (θ-θ_j)`` the optimality
  conditions of steps ``k`` and ``k-1`` telescope: ``ĝ_k = g_k - ρ (λ_k/λ_{k-1}) g_{k-1}`` and
  ``s_k = -lr_k (F̄_k + δI)^{-1} ĝ_k``: EMA K-FAC applied to the corrected gradient.
* ``"q"`` (plus a quadratic loss model ``½ s^T F_k s``): the recursion carries
  ``c_{k-1} = g_{k-1} - ĝ_{k-1} + (F̄_{k-1} + δI) u_{k-1}`` (``u`` the preconditioned direction) and
  ``ĝ_k = g_k - ρ (λ_k/λ_{k-1}) c_{k-1}``; the system matrix ``F̄ + F_k/λ`` is approximated by the augmented
  factors ``(Ḡ + lr G_k) ⊗ (Ā + lr A_k)`` (``A_k``, ``G_k`` the batch factors), inverted with K-FAC's backend.
* ``"qe"``: the Q step refined by ``inner_steps`` steps (preconditioned by the augmented K-FAC inverse, monotone
  in the objective, then KL-clipped in the Fisher norm) on the *exact* wake objective
  ``g_k^T s + ½ s^T F_k s + λ_k Σ_j w_j [KL(p_{θ_j}(x) || p_θ(x)) + (δ/2) ||θ - θ_j||²]`` on the current batch
  ``x``, against the last ``networks`` stored parameter snapshots (KL of the softmax for cross-entropy, squared
  distance of the outputs for MSE). The batch is the positional input of the model's last forward pass.

``ρ`` defaults to the group's ``factor_decay`` (the paper ties the two; its MNIST runs use 0.33 for SO). With
``rho == factor_decay``, exact factors and no momentum or KL clip, the SO step *is* the minimiser of the wake
objective with quadratic KL terms (tested densely). Parameters without a Kronecker block get the SO correction
with identity curvature. Under :class:`~kronfac.KFACPreconditioner` the ratio ``λ_k/λ_{k-1}`` uses its nominal lr.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from kronfac.curvature.capture import TrackedLayer, _first_tensor
from kronfac.curvature.fisher import LossAverage, LossType
from kronfac.linalg.base import KroneckerInverse, build_inverse, inverse_from_state, inverse_to_state
from kronfac.optim.base import check_positive_int

if TYPE_CHECKING:
    from kronfac.optim.kfac import KFAC

__all__ = ["KLDWRM", "GradientCorrection", "KLDWRMVariant"]

Updates = list[tuple[list[Tensor], list[Tensor]]]


class GradientCorrection:
    """A rule that :class:`~kronfac.KFAC` composes into its step. The default methods leave K-FAC unchanged.

    Call order in one step: :meth:`before_commit` (batch statistics still pending), the factor commit,
    :meth:`after_refresh` (on inverse steps), then per layer :meth:`correct` -> weight decay ->
    :meth:`precondition` -> KL clip -> :meth:`record`, :meth:`correct` for parameters without a block, and
    :meth:`finish` on the per-group updates.
    """

    def bind(self, optimizer: KFAC) -> None:
        """Attach to the optimizer once its layers exist."""

    def before_commit(self, optimizer: KFAC) -> None:
        """Read what is needed from the pending batch statistics."""

    def after_refresh(self, optimizer: KFAC) -> None:
        """Rebuild derived state when K-FAC refreshes its inverses."""

    def correct(self, optimizer: KFAC, group: dict[str, Any], key: str, grad: Tensor) -> Tensor:
        """The gradient to precondition in place of ``grad`` (``key``: layer or parameter name)."""
        return grad

    def precondition(self, optimizer: KFAC, group: dict[str, Any], layer: TrackedLayer, grad: Tensor) -> Tensor:
        return layer.block.precondition(grad)  # type: ignore[attr-defined]

    def record(self, optimizer: KFAC, group: dict[str, Any], key: str, update: Tensor) -> None:
        """See the final (clipped) update direction of a layer."""

    def finish(self, optimizer: KFAC, per_group: Updates) -> Updates:
        return per_group

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


class KLDWRMVariant(str, Enum):
    SO = "so"
    Q = "q"
    QE = "qe"


def _as_matrix(layer: TrackedLayer, tensors: list[Tensor]) -> Tensor:
    """Per-parameter tensors of a layer (weight, bias) as its ``d_o x d_i`` matrix, like ``grad_matrix``."""
    if layer.helper.diagonal_a:
        return tensors[0].T
    return torch.cat([tensors[0].reshape(tensors[0].shape[0], -1)] + [t.unsqueeze(1) for t in tensors[1:]], dim=1)


def _clone(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


class KLDWRM(GradientCorrection):
    """KL-divergence wake-regularised models on the K-FAC platform (see the module docstring).

    Args:
        variant: ``"so"``, ``"q"`` or ``"qe"``.
        rho: wake decay ρ in [0, 1); ``None`` uses each group's ``factor_decay``.
        inner_steps: QE: gradient steps on the exact wake objective.
        inner_lr: QE: inner step size as a fraction of the group's lr (the paper's ``inner_lr_factor``).
        networks: QE: parameter snapshots kept (the current one included).
        inner_preconditioned: QE: precondition the inner gradient with the (augmented) K-FAC inverse, a
            Newton-like step on the wake objective; ``False`` takes the paper's plain gradient steps, which
            diverge unless ``inner_lr`` is below ``1 / λ_max(F)``.

    Raises:
        ValueError: naming the argument that is out of range.
    """

    def __init__(
        self,
        variant: str = "so",
        rho: float | None = None,
        *,
        inner_steps: int = 5,
        inner_lr: float = 1.0,
        networks: int = 3,
        inner_preconditioned: bool = True,
    ) -> None:
        try:
            self.variant = KLDWRMVariant(variant)
        except ValueError:
            raise ValueError(f"Invalid variant: {variant!r} (must be one of 'so', 'q', 'qe')") from None
        if rho is not None and not (isinstance(rho, (int, float)) and 0.0 <= rho < 1.0):
            raise ValueError(f"Invalid rho: {rho!r} (must be in [0, 1) or None)")
        if not isinstance(inner_steps, int) or inner_steps < 0:
            raise ValueError(f"Invalid inner_steps: {inner_steps!r} (must be an integer >= 0)")
        if not (isinstance(inner_lr, (int, float)) and inner_lr > 0):
            raise ValueError(f"Invalid inner_lr: {inner_lr!r} (must be > 0)")
        check_positive_int("networks", networks)
        self.rho, self.inner_steps, self.inner_lr, self.networks = rho, inner_steps, float(inner_lr), networks
        self.inner_preconditioned = inner_preconditioned
        self._bound = False
        self.carry: dict[str, tuple[Tensor, float]] = {}  # key -> (c_{k-1}, lr_{k-1})
        self.batch: dict[str, tuple[Tensor, Tensor]] = {}  # layer -> (A_k, G_k) batch factors (Q, QE)
        self.inverses: dict[str, KroneckerInverse] = {}  # layer -> augmented inverse (Q, QE)
        self.refreshed: dict[str, tuple[Tensor, Tensor]] = {}  # layer -> (Ā, Ḡ) at the last refresh (Q, QE)
        self.snapshots: list[dict[str, Tensor]] = []  # QE: newest first
        self._pending: dict[str, tuple[Tensor, Tensor]] = {}
        self._inputs: tuple[Any, ...] | None = None
        self._handle: Any = None
        self._inner = False

    def __repr__(self) -> str:
        return f"KLDWRM(variant={self.variant.value!r}, rho={self.rho})"

    # -- wiring ------------------------------------------------------------------------------------------
    def bind(self, optimizer: KFAC) -> None:
        if self._bound:
            raise ValueError("Invalid correction: this KLDWRM is already bound to an optimizer (make a new one)")
        self._bound = True
        if self.variant is KLDWRMVariant.QE:
            self._handle = optimizer.model.register_forward_pre_hook(self._save_inputs)

    def close(self) -> None:
        """Remove the QE input hook."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _save_inputs(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if torch.is_grad_enabled() and not self._inner:
            self._inputs = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)

    def _rho(self, optimizer: KFAC, group: dict[str, Any]) -> float:
        return self.rho if self.rho is not None else optimizer.group_value(group, "factor_decay")

    # -- the SO / Q recursion ----------------------------------------------------------------------------
    def correct(self, optimizer: KFAC, group: dict[str, Any], key: str, grad: Tensor) -> Tensor:
        lr = optimizer.group_value(group, "lr")
        corrected = grad
        if key in self.carry:
            carry, lr_prev = self.carry[key]
            ratio = lr_prev / lr if lr > 0 else 0.0  # λ_k / λ_{k-1}; lr = 0 takes no step anyway
            corrected = grad - (self._rho(optimizer, group) * ratio) * carry.to(grad.dtype)
        self.carry[key] = (grad.detach().clone(), lr)  # SO's c = g; Q overwrites it in record()
        if self.variant is not KLDWRMVariant.SO:
            self._pending[key] = (grad.detach(), corrected.detach())
        return corrected

    def record(self, optimizer: KFAC, group: dict[str, Any], key: str, update: Tensor) -> None:
        if self.variant is KLDWRMVariant.SO or key not in self._pending:
            return
        grad, corrected = self._pending.pop(key)
        if key not in self.refreshed:
            return
        # the factors the augmented inverse was built from: then (F̄ + δI) H_aug^{-1} has eigenvalues in (0, 1]
        # and the recursion cannot amplify (the current EMA factors may have moved since the last refresh)
        a_factor, g_factor = self.refreshed[key]
        u = update.detach().to(g_factor.dtype)
        hu = g_factor @ u
        hu = hu * a_factor if a_factor.ndim == 1 else hu @ a_factor
        hu = hu + optimizer.group_value(group, "damping") * u
        layer = optimizer.layers[key]
        # u preconditions ĝ + ηW (weight decay), so (F̄ + δI) u ≈ ĝ + ηW: take ηW out of the carried term
        decay = optimizer.group_value(group, "weight_decay") * layer.helper.param_matrix(layer.module)
        carry = grad - corrected - decay.to(grad.dtype) + hu.to(grad.dtype)
        self.carry[key] = (carry.clone(), optimizer.group_value(group, "lr"))

    # -- augmented factors (Q, QE) ---------------------------------------------------------------------------
    def before_commit(self, optimizer: KFAC) -> None:
        if self.variant is KLDWRMVariant.SO or not optimizer.curvature_due():
            return
        for name, layer in optimizer.layers.items():
            block: Any = layer.block
            if block.has_pending() and block.pending_nonfinite() is None:
                a_batch, g_batch = block.batch_factors()
                self.batch[name] = (a_batch.clone(), g_batch.clone())

    def after_refresh(self, optimizer: KFAC) -> None:
        if self.variant is KLDWRMVariant.SO:
            return
        for group, layers in zip(optimizer.param_groups, optimizer.layer_groups):
            lr = optimizer.group_value(group, "lr")
            damping = optimizer.group_value(group, "damping")
            for layer in layers:
                block: Any = layer.block
                if block.a_factor is None or layer.name not in self.batch:
                    continue
                a_batch, g_batch = self.batch[layer.name]
                inverse = build_inverse(
                    optimizer.inverse_config,
                    block.a_factor + lr * a_batch,
                    block.g_factor + lr * g_batch,
                    damping,
                    previous=self.inverses.get(layer.name),
                    layer=layer.name,
                )
                if inverse is not None:
                    self.inverses[layer.name] = inverse
                    self.refreshed[layer.name] = (block.a_factor.clone(), block.g_factor.clone())

    def precondition(self, optimizer: KFAC, group: dict[str, Any], layer: TrackedLayer, grad: Tensor) -> Tensor:
        inverse = self.inverses.get(layer.name)
        if inverse is None:
            return layer.block.precondition(grad)  # type: ignore[attr-defined]
        return inverse.precondition(grad)

    # -- QE: inner steps on the exact wake objective ---------------------------------------------------------
    def finish(self, optimizer: KFAC, per_group: Updates) -> Updates:
        if self.variant is not KLDWRMVariant.QE:
            return per_group
        names = optimizer._param_names
        current = {n: p.detach().clone() for n, p in optimizer.model.named_parameters()}
        self.snapshots.insert(0, current)
        del self.snapshots[self.networks :]
        if self._inputs is None or self.inner_steps == 0:
            return per_group
        optimizer.capture.remove()  # our forward passes must not feed the curvature statistics
        self._inner = True
        try:
            with torch.enable_grad():
                return self._refine(optimizer, per_group, names)
        finally:
            self._inner = False

    def _kl(self, optimizer: KFAC, target: Tensor, out: Tensor) -> Tensor:
        classes = out.shape[-1]
        rows = out.reshape(-1, classes)
        ref = target.reshape(-1, classes).to(rows.dtype)
        if optimizer.loss is LossType.MSE:
            total = (rows - ref).square().sum()
        else:
            log_p = torch.log_softmax(ref, dim=-1)
            total = (log_p.exp() * (log_p - torch.log_softmax(rows, dim=-1))).sum()
        if optimizer.loss_average is LossAverage.BATCH:
            return total / out.shape[0]
        if optimizer.loss_average is LossAverage.BATCH_SEQUENCE:
            return total / rows.shape[0]
        return total

    def _output(self, optimizer: KFAC, params: dict[str, Tensor]) -> Tensor:
        model = optimizer.model
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        out = functional_call(model, {**params, **buffers}, self._inputs)
        fn: Callable[[Any], Tensor] | None = optimizer.capture.output_fn
        return fn(out) if fn is not None else _first_tensor(out)

    def _refine(self, optimizer: KFAC, per_group: Updates, names: dict[Any, str]) -> Updates:
        current = self.snapshots[0]
        rho = [self._rho(optimizer, g) for g in optimizer.param_groups]
        m = len(self.snapshots)
        with torch.no_grad():
            targets = [self._output(optimizer, snap) for snap in self.snapshots]
        theta: dict[str, Tensor] = {}
        meta = []  # (name, group index, lr, g_k)
        for gi, ((params, updates), group) in enumerate(zip(per_group, optimizer.param_groups)):
            lr = optimizer.group_value(group, "lr")
            if lr <= 0:
                continue
            for p, u in zip(params, updates):
                name = names[p]
                theta[name] = (current[name] - lr * u.detach()).requires_grad_(True)
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                wd = optimizer.group_value(group, "weight_decay")
                meta.append((name, gi, lr, grad.detach() + wd * current[name]))
        if not theta:
            return per_group
        groups = sorted({gi for _, gi, _, _ in meta})
        weights = {gi: [(1 - rho[gi]) * rho[gi] ** j for j in range(m - 1)] + [rho[gi] ** (m - 1)] for gi in groups}
        anchors = {
            name: sum(wj * snap[name] for wj, snap in zip(weights[gi], self.snapshots)) for name, gi, _, _ in meta
        }
        # Monotone inner descent: every iterate is evaluated; a step that raises the wake objective J is undone
        # and retried at half the size, so the result is never worse (in J) than the Q step it starts from.
        scale, best_value = self.inner_lr, math.inf
        group_lr = {gi: lr for _, gi, lr, _ in meta}
        best: dict[str, Tensor] = {}
        direction: dict[str, Tensor] = {}
        for iteration in range(self.inner_steps + 1):
            frozen = {n: t for n, t in current.items() if n not in theta}
            out = self._output(optimizer, {**frozen, **theta})
            kl_grads: dict[str, Tensor] = {}
            value = 0.0
            for gi in groups:
                kl = torch.stack([wj * self._kl(optimizer, t, out) for wj, t in zip(weights[gi], targets)]).sum()
                own = [n for n, g2, _, _ in meta if g2 == gi]
                kl_grads.update(zip(own, torch.autograd.grad(kl, [theta[n] for n in own], retain_graph=True)))
                value += float(kl.detach()) / group_lr[gi]
            with torch.no_grad():
                model_terms = self._model_terms(optimizer, theta, current, meta)
                gradients = {}
                for name, gi, lr, g_k in meta:
                    damping = optimizer.group_value(optimizer.param_groups[gi], "damping")
                    s = theta[name] - current[name]
                    value += float((g_k * s).sum() + 0.5 * (model_terms[name] * s).sum())
                    value += 0.5 * damping / lr * float((theta[name] - anchors[name]).square().sum())
                    wake = kl_grads[name] + damping * (theta[name] - anchors[name])
                    gradients[name] = g_k + model_terms[name] + wake / lr
                if not best and not math.isfinite(value):
                    best = {n: t.detach().clone() for n, t in theta.items()}
                    break  # the objective overflowed at the Q step: keep the Q step, no refinement
                if value <= best_value:
                    best_value = value
                    best = {n: t.detach().clone() for n, t in theta.items()}
                    direction = self._precondition_all(optimizer, gradients) if self.inner_preconditioned else gradients
                else:
                    scale *= 0.5
                if iteration == self.inner_steps:
                    break
                for name, _, lr, _ in meta:
                    theta[name].copy_(best[name] - scale * lr * direction[name])
        theta = best
        result: Updates = []
        for (params, updates), group in zip(per_group, optimizer.param_groups):
            lr = optimizer.group_value(group, "lr")
            new = [
                (current[names[p]] - theta[names[p]].detach()) / lr if names[p] in theta else u
                for p, u in zip(params, updates)
            ]
            if group["kl_clip"] is not None and any(names[p] in theta for p in params):
                new = self._kl_clip(optimizer, group, params, new)
            result.append((params, new))
        return result

    def _kl_clip(
        self, optimizer: KFAC, group: dict[str, Any], params: list[Tensor], updates: list[Tensor]
    ) -> list[Tensor]:
        """KL clip of the refined step in the Fisher norm, ``ν = min(1, sqrt(κ / (lr² uᵀ(F̄ + δI)u)))`` over the
        group (K-FAC's ``<u, g>`` equals it for ``u = (F̄ + δI)^{-1} g``; the refined step is not of that form)."""
        names: dict[Any, str] = optimizer._param_names
        lr, kl_clip = optimizer.group_value(group, "lr"), optimizer.group_value(group, "kl_clip")
        damping = optimizer.group_value(group, "damping")
        by_name = {names[p]: u for p, u in zip(params, updates)}
        seen: set[str] = set()
        quad = 0.0
        for layer in optimizer.layers.values():
            pnames = [names[p] for p in layer.params]
            block: Any = layer.block
            if any(n not in by_name for n in pnames) or block.a_factor is None:
                continue
            u = _as_matrix(layer, [by_name[n] for n in pnames]).to(block.g_factor.dtype)
            fu = block.g_factor @ u
            fu = fu * block.a_factor if block.a_factor.ndim == 1 else fu @ block.a_factor
            quad += float((u * (fu + damping * u)).sum())
            seen.update(pnames)
        quad += sum(float(u.square().sum()) for n, u in by_name.items() if n not in seen)
        vg = quad * lr**2
        nu = min(1.0, (kl_clip / vg) ** 0.5) if vg > 0 else 1.0
        return [u * nu for u in updates]

    def _model_terms(
        self,
        optimizer: KFAC,
        theta: dict[str, Tensor],
        current: dict[str, Tensor],
        meta: list[tuple[str, int, float, Tensor]],
    ) -> dict[str, Tensor]:
        """``F_k s`` per parameter with the batch factors ``G_k S A_k`` (zero for parameters without a block)."""
        names = optimizer._param_names
        out = {name: torch.zeros_like(theta[name]) for name, _, _, _ in meta}
        for layer in optimizer.layers.values():
            pnames = [names[p] for p in layer.params]
            if layer.name not in self.batch or any(n not in theta for n in pnames):
                continue
            s = _as_matrix(layer, [theta[n].detach() - current[n] for n in pnames])
            a_batch, g_batch = self.batch[layer.name]
            fs = g_batch.to(s.dtype) @ s
            fs = fs * a_batch.to(s.dtype) if a_batch.ndim == 1 else fs @ a_batch.to(s.dtype)
            for n, part in zip(pnames, layer.helper.split(layer.module, fs)):
                out[n] = part.reshape(theta[n].shape)
        return out

    def _precondition_all(self, optimizer: KFAC, gradients: dict[str, Tensor]) -> dict[str, Tensor]:
        """The inner gradient of every layer through the (augmented) K-FAC inverse; other parameters as they are."""
        names = optimizer._param_names
        out = dict(gradients)
        for group, layers in zip(optimizer.param_groups, optimizer.layer_groups):
            for layer in layers:
                pnames = [names[p] for p in layer.params]
                if any(n not in gradients for n in pnames):
                    continue
                matrix = self.precondition(optimizer, group, layer, _as_matrix(layer, [gradients[n] for n in pnames]))
                for n, part in zip(pnames, layer.helper.split(layer.module, matrix)):
                    out[n] = part.reshape(gradients[n].shape)
        return out

    # -- checkpointing ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "carry": _clone(self.carry),
            "batch": _clone(self.batch),
            "inverses": {k: inverse_to_state(v) for k, v in self.inverses.items()},
            "refreshed": _clone(self.refreshed),
            "snapshots": _clone(self.snapshots),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.carry = {k: (v[0].clone(), float(v[1])) for k, v in state.get("carry", {}).items()}
        self.batch = _clone(state.get("batch", {}))
        self.inverses = {k: inverse_from_state(v) for k, v in state.get("inverses", {}).items()}
        self.refreshed = _clone(state.get("refreshed", {}))
        self.snapshots = _clone(state.get("snapshots", []))
        self._pending.clear()
