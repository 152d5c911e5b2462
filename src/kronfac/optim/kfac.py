"""K-FAC (Martens & Grosse, ICML 2015; Grosse & Martens, ICML 2016 for convolutions).

For each supported layer with gradient matrix ``∇W`` (``d_o x d_i``, bias as the last column) K-FAC keeps
EMA factors ``A ≈ E[a a^T]`` and ``G ≈ E[g g^T]`` and steps along ``U = (G ⊗ A + λI)^{-1} vec(∇W)``, computed
from the factors' inverses without forming the Kronecker product.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from kronfac.curvature.block import CurvatureBlock
from kronfac.curvature.kfac_block import KFACBlock
from kronfac.distributed.config import DistributedConfig
from kronfac.linalg.base import InverseConfig
from kronfac.linalg.eigh import EighConfig
from kronfac.optim.base import KronOptimizer, Schedule, check_positive_int, check_range
from kronfac.optim.functional import momentum_update_
from kronfac.optim.kldwrm import GradientCorrection

__all__ = ["KFAC"]


class KFAC(KronOptimizer):
    r"""K-FAC as a ``torch.optim.Optimizer``.

    One step, per param group (symbols of Martens & Grosse 2015):

    1. every ``factor_every`` steps: ``A <- ρ A + (1-ρ) A_batch``, ``G <- ρ G + (1-ρ) G_batch``;
    2. every ``inverse_every`` steps: refresh the damped inverses with the ``inverse`` backend;
    3. ``U = (G ⊗ A + λ I)^{-1} (∇W + η W)`` per layer (other parameters: ``∇θ + η θ``);
    4. KL clip: ``U <- ν U`` with ``ν = min(1, sqrt(κ / (α² Σ <U, ∇W>)))``;
    5. ``b <- μ b + U``, ``θ <- θ - α b``.

    Args:
        model: the model; its Linear, Conv2d and Embedding layers are preconditioned.
        lr: learning rate α (float or a callable of the step).
        momentum: heavy-ball momentum μ.
        weight_decay: L2 coefficient η, added to the gradient before preconditioning.
        damping: Tikhonov damping λ (float or a callable of the step).
        factor_decay: EMA decay ρ of the factors.
        factor_every: capture statistics and update the factors every this many steps.
        inverse_every: refresh the inverses every this many steps.
        kl_clip: KL-clip bound κ; ``None`` disables it.
        inverse: backend config: :class:`~kronfac.EighConfig` (exact eigen-damping, the default) or
            :class:`~kronfac.CholeskyConfig` (factored damping), or another :class:`~kronfac.InverseConfig`.
        correction: a gradient-correction rule composed into the step, e.g. :class:`~kronfac.KLDWRM`.
        distributed: a :class:`~kronfac.DistributedConfig` to share the curvature work across the ranks of an
            initialised process group (DDP under torchrun); ``None`` for a single process.
        **kwargs: curvature options of :class:`~kronfac.optim.base.KronOptimizer` (``fisher_type``, ``loss``,
            ``loss_average``, ``approx``, ``mc_samples``, ``seed``, ``grad_scaler``, ``output_fn``,
            ``on_nonfinite``, ``factor_dtype``, ``param_groups``).

    Example:
        >>> import torch, kronfac
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> opt = kronfac.KFAC(model, lr=0.1, damping=1e-2)
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> torch.nn.functional.cross_entropy(model(x), y).backward()
        >>> opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        model: nn.Module,
        lr: Schedule = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        damping: Schedule = 1e-3,
        factor_decay: float = 0.95,
        factor_every: int = 1,
        inverse_every: int = 10,
        kl_clip: float | None = 1e-3,
        *,
        inverse: InverseConfig | None = None,
        correction: GradientCorrection | None = None,
        distributed: DistributedConfig | None = None,
        **kwargs: Any,
    ) -> None:
        check_range("lr", lr, 0.0)
        check_range("momentum", momentum, 0.0, 1.0)
        check_range("weight_decay", weight_decay, 0.0)
        check_range("damping", damping, 0.0, low_open=True)
        check_range("factor_decay", factor_decay, 0.0, 1.0)
        if kl_clip is not None:
            check_range("kl_clip", kl_clip, 0.0, low_open=True)
        check_positive_int("inverse_every", inverse_every)
        inverse = EighConfig() if inverse is None else inverse
        if not isinstance(inverse, InverseConfig):
            raise ValueError(f"Invalid inverse: {inverse!r} (must be an InverseConfig such as EighConfig())")
        self.inverse_config, self.inverse_every = inverse, inverse_every
        if correction is not None and not isinstance(correction, GradientCorrection):
            raise ValueError(f"Invalid correction: {correction!r} (must be a GradientCorrection such as KLDWRM())")
        self.correction = correction
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "damping": damping,
            "factor_decay": factor_decay,
            "kl_clip": kl_clip,
        }
        super().__init__(model, defaults, factor_every=factor_every, **kwargs)
        if correction is not None:
            correction.bind(self)
        if distributed is not None:
            if not isinstance(distributed, DistributedConfig):
                raise ValueError(f"Invalid distributed: {distributed!r} (must be a DistributedConfig or None)")
            from kronfac.distributed.engine import DistributedKFAC

            self._distributed = DistributedKFAC(self, distributed)

    def make_block(self, name: str, module: nn.Module, d_in: int, d_out: int, diagonal_a: bool) -> CurvatureBlock:
        device = module.weight.device
        return KFACBlock(
            d_in,
            d_out,
            name=name,
            inverse=self.inverse_config,
            diagonal_a=diagonal_a,
            approx=self.approx,
            dtype=self.factor_dtype,
            device=device,
        )

    def refresh_inverses(self) -> None:
        """Recompute every layer's inverse now (done automatically every ``inverse_every`` steps; with
        ``distributed=`` every rank must call it)."""
        if self._distributed is not None:
            self._distributed.refresh_inverses()
            return
        for group, layers in zip(self.param_groups, self.layer_groups):
            damping = self.group_value(group, "damping")
            for layer in layers:
                layer.block.refresh(damping=damping)  # type: ignore[attr-defined]

    def preconditioned_updates(self) -> list[tuple[list[Tensor], list[Tensor]]]:
        """Run the curvature schedule and return, per param group, the parameters and their update directions
        (steps 1-4 of the algorithm). Returns ``[]`` when the step is skipped for non-finite gradients."""
        if self._distributed is not None:
            self._distributed.begin_step()
        if not self.grads_finite():
            self.finish_step(skipped=True)
            return []
        if self._distributed is not None and self.curvature_due():
            self._distributed.synchronize_statistics()  # the correction reads the global batch statistics
        if self.correction is not None:
            self.correction.before_commit(self)
        self.commit_curvature()
        if self.steps % self.inverse_every == 0:
            self.refresh_inverses()
            if self.correction is not None:
                self.correction.after_refresh(self)
        per_group = [
            self._group_updates(group, layers, plain)
            for group, layers, plain in zip(self.param_groups, self.layer_groups, self._plain_params)
        ]
        return per_group if self.correction is None else self.correction.finish(self, per_group)

    def _group_updates(
        self, group: dict[str, Any], layers: list, plain: list[nn.Parameter]
    ) -> tuple[list[Tensor], list[Tensor]]:
        weight_decay = self.group_value(group, "weight_decay")
        correction = self.correction
        params: list[Tensor] = []
        updates: list[Tensor] = []
        directions: list[tuple[Any, Tensor, Tensor]] = []
        for layer in layers:
            if any(p.grad is None for p in layer.params):
                continue
            grad = layer.helper.grad_matrix(layer.module)
            if correction is not None:
                grad = correction.correct(self, group, layer.name, grad)
            if weight_decay:
                grad = grad + weight_decay * layer.helper.param_matrix(layer.module)
            if correction is None:
                directions.append((layer, grad, layer.block.precondition(grad)))
            else:
                directions.append((layer, grad, correction.precondition(self, group, layer, grad)))
        nu = self._kl_clip_factor(directions, group) if group["kl_clip"] is not None and directions else None
        for layer, grad, update in directions:
            if nu is not None:
                # In place unless the preconditioner handed the gradient back (no inverse yet).
                update = update * nu.to(update.dtype) if update is grad else update.mul_(nu.to(update.dtype))
            if correction is not None:
                correction.record(self, group, layer.name, update)
            params.extend(layer.params)
            updates.extend(layer.helper.split(layer.module, update))
        for p in plain:
            if p.grad is None:
                continue
            params.append(p)
            grad = p.grad if correction is None else correction.correct(self, group, self._name(p), p.grad)
            updates.append(grad if not weight_decay else grad.add(p, alpha=weight_decay))
        return params, updates

    def _kl_clip_factor(self, directions: list[tuple[Any, Tensor, Tensor]], group: dict[str, Any]) -> Tensor:
        lr = self.group_value(group, "lr")
        kl_clip = self.group_value(group, "kl_clip")
        vg = torch.stack([torch.vdot(u.reshape(-1), g.reshape(-1)) for _, g, u in directions]).sum() * lr**2
        # ν = min(1, sqrt(κ / vg)); a non-positive vg (lr = 0 or round-off) gives ν = 1: the step is left alone.
        return (kl_clip / vg.clamp_min(1e-30)).sqrt_().clamp_max_(1.0).masked_fill_(vg <= 0, 1.0)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.correction is not None:
            state["kronfac"]["correction"] = self.correction.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self.correction is not None:
            self.correction.load_state_dict(state_dict["kronfac"].get("correction", {}))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One K-FAC step (the algorithm in the class docstring).

        Args:
            closure: re-evaluates the model and returns the loss (it runs under ``torch.enable_grad``).
        """
        loss = self.run_closure(closure)
        per_group = self.preconditioned_updates()
        if not per_group:
            return loss
        for group, (params, updates) in zip(self.param_groups, per_group):
            momentum_update_(
                params,
                updates,
                self.state,
                lr=self.group_value(group, "lr"),
                momentum=self.group_value(group, "momentum"),
            )
        self.finish_step()
        return loss
