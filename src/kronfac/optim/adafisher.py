"""AdaFisher and AdaFisherW (Gomes, Zhang, Belilovsky, Wolf & Hosseini, ICLR 2025, "AdaFisher: Adaptive Second
Order Optimization via Fisher Information", arXiv:2405.16397).

AdaFisher is Adam with its second-moment denominator replaced by a diagonal Kronecker-factored Fisher ``F_D``:
the diagonals of K-FAC's factors, min-max normalised and averaged (:mod:`kronfac.curvature.diagonal`), and no
square root. AdaFisherW is the same method with decoupled weight decay; here it is AdaFisher with a different
weight-decay mode, not a second copy.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from kronfac.curvature.block import CurvatureBlock
from kronfac.curvature.capture import TrackedLayer
from kronfac.curvature.diagonal import DiagonalFactors, DiagonalKroneckerBlock, FactorAveraging, ScaleShiftBlock
from kronfac.layers.base import UnsupportedModuleError
from kronfac.layers.normalization import norm_helper_for
from kronfac.optim.base import KronOptimizer, Schedule, _enum, check_positive_int, check_range

__all__ = ["AdaFisher", "AdaFisherW", "WeightDecayMode", "adafisher_update_"]


class WeightDecayMode(str, Enum):
    """``coupled``: ``η θ`` is added to the gradient (AdaFisher); ``decoupled``: ``θ`` shrinks by ``lr η θ``
    outside the preconditioned step (AdaFisherW, as AdamW)."""

    COUPLED = "coupled"
    DECOUPLED = "decoupled"


def adafisher_update_(
    params: list[Tensor],
    grads: list[Tensor],
    fishers: list[Tensor | None],
    state: dict[Any, dict[str, Any]],
    *,
    lr: float,
    beta: float,
    weight_decay: float,
    mode: WeightDecayMode,
) -> None:
    """One AdaFisher step for a list of parameters (``fishers[i] is None`` means ``F = 1``).

    ``m <- β m + (1-β) g`` (``g`` includes ``η θ`` in coupled mode), ``m̂ = m / (1 - β^t)`` with ``t`` the
    parameter's own step count, ``θ <- θ - lr m̂ / F`` (decoupled mode first ``θ <- (1 - lr η) θ``).
    """
    for p, g, f in zip(params, grads, fishers):
        pstate = state[p]
        if "exp_avg" not in pstate:
            pstate["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            pstate["step"] = 0
        pstate["step"] += 1
        if weight_decay and mode is WeightDecayMode.COUPLED:
            g = g.add(p, alpha=weight_decay)
        exp_avg = pstate["exp_avg"]
        exp_avg.mul_(beta).add_(g, alpha=1.0 - beta)
        step_size = lr / (1.0 - beta ** pstate["step"])
        if weight_decay and mode is WeightDecayMode.DECOUPLED:
            p.mul_(1.0 - lr * weight_decay)
        if f is None:
            p.add_(exp_avg, alpha=-step_size)
        else:
            p.addcdiv_(exp_avg, f.to(p.dtype), value=-step_size)


class AdaFisher(KronOptimizer):
    r"""AdaFisher as a ``torch.optim.Optimizer``.

    Every ``update_every`` steps (``T_cov`` in the paper), for each supported layer: ``Ĥ`` = per-batch mean of
    ``a ⊙ a``, ``Ŝ`` = per-batch mean of ``g ⊙ g`` (diagonals of K-FAC's ``A`` and ``G``), each min-max
    normalised to ``[0, 1]`` and averaged into ``H``, ``S`` (EMA with decay ``γ``). Every step, per parameter:

    1. ``F_D = diag(S) diag(H)^T + λ`` shaped like ``W`` (bias last column); normalisation layers: the scale gets
       ``H ⊙ S + λ``, the shift ``S + λ`` (``H`` from the normalised input ``x̂``); any other parameter ``F = 1``;
    2. ``m <- β m + (1-β) g``, ``m̂ = m / (1 - β^t)``;
    3. ``θ <- θ - α m̂ / F_D`` (weight decay coupled into ``g`` here, decoupled in :class:`AdaFisherW`).

    Supported modules: Linear, Conv2d, Embedding (through the shared helpers), LayerNorm and BatchNorm1d/2d/3d
    (through :mod:`kronfac.layers.normalization`). Parameters are paired with their modules by identity.

    Defaults and their source: ``lr = 1e-3``, ``beta = 0.9``, ``damping = 1e-3`` (paper and reference code);
    ``update_every = 100`` (reference ``TCov``); ``factor_decay = 0.8`` (reference ``gamma``, used here as the decay
    of a proper EMA); ``averaging="reference"`` reproduces the reference's ``0.08 H + 0.008 Ĥ`` update started from
    ones, whose coefficients do not sum to 1 (:mod:`kronfac.curvature.diagonal`).

    Args:
        model: the model.
        lr: learning rate α (float or a callable of the step).
        beta: first-moment decay β.
        weight_decay: weight-decay coefficient η.
        damping: λ added to ``F_D`` (float or a callable of the step).
        factor_decay: EMA decay γ of ``H`` and ``S`` (ignored with ``averaging="reference"``).
        update_every: ``T_cov``: capture statistics and update ``H``, ``S`` every this many steps.
        averaging: ``"ema"`` or ``"reference"``.
        weight_decay_mode: ``"coupled"`` (default here) or ``"decoupled"`` (the default of :class:`AdaFisherW`).
        norm_layers: give LayerNorm/BatchNorm their scale/shift blocks (the paper); ``False`` gives their
            parameters ``F = 1`` like any other parameter without a block (more stable on our char transformer,
            see ``benchmarks/adafisher/ablation_norms.md``).
        **kwargs: curvature options of :class:`~kronfac.optim.base.KronOptimizer` (``fisher_type``, ``loss``,
            ``loss_average``, ``approx``, ``mc_samples``, ``seed``, ``grad_scaler``, ``output_fn``,
            ``on_nonfinite``, ``factor_dtype``, ``param_groups``).

    Example:
        >>> import torch, kronfac
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
        >>> opt = kronfac.AdaFisher(model, lr=1e-3, update_every=10)
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> torch.nn.functional.cross_entropy(model(x), y).backward()
        >>> opt.step(); opt.zero_grad()
    """

    default_weight_decay_mode = WeightDecayMode.COUPLED

    def __init__(
        self,
        model: nn.Module,
        lr: Schedule = 1e-3,
        beta: float = 0.9,
        weight_decay: float = 0.0,
        damping: Schedule = 1e-3,
        factor_decay: float = 0.8,
        update_every: int = 100,
        *,
        averaging: str = "ema",
        weight_decay_mode: str | None = None,
        norm_layers: bool = True,
        **kwargs: Any,
    ) -> None:
        check_range("lr", lr, 0.0)
        check_range("beta", beta, 0.0, 1.0)
        if beta == 1.0:
            raise ValueError(f"Invalid beta: {beta!r} (must be in [0.0, 1.0))")
        check_range("weight_decay", weight_decay, 0.0)
        check_range("damping", damping, 0.0, low_open=True)
        check_range("factor_decay", factor_decay, 0.0, 1.0)
        check_positive_int("update_every", update_every)
        if "factor_every" in kwargs:
            raise TypeError("AdaFisher takes update_every (T_cov), not factor_every")
        self.averaging = _enum(FactorAveraging, "averaging", averaging)
        self.norm_layers = bool(norm_layers)
        mode = self.default_weight_decay_mode if weight_decay_mode is None else weight_decay_mode
        self.weight_decay_mode = _enum(WeightDecayMode, "weight_decay_mode", mode)
        defaults = {
            "lr": lr,
            "beta": beta,
            "weight_decay": weight_decay,
            "damping": damping,
            "factor_decay": factor_decay,
        }
        super().__init__(model, defaults, factor_every=update_every, **kwargs)

    @property
    def update_every(self) -> int:
        return self.factor_every

    # -- blocks -----------------------------------------------------------------------------------------
    def _block_options(self, module: nn.Module) -> dict[str, Any]:
        return {
            "approx": self.approx,
            "averaging": self.averaging,
            "dtype": self.factor_dtype,
            "device": module.weight.device,
        }

    def make_block(self, name: str, module: nn.Module, d_in: int, d_out: int, diagonal_a: bool) -> CurvatureBlock:
        return DiagonalKroneckerBlock(d_in, d_out, diagonal_a=diagonal_a, **self._block_options(module))

    def _discover_layers(self, group_of: dict[nn.Parameter, int]) -> None:
        super()._discover_layers(group_of)
        if not self.norm_layers:
            return
        for name, module in self.model.named_modules():
            helper = norm_helper_for(module)
            if helper is None:
                continue
            try:
                helper.check(module)
            except UnsupportedModuleError:
                continue  # no affine parameters: nothing to optimise
            params = helper.params(module)
            groups = {group_of.get(p) for p in params}
            if None in groups or not all(p.requires_grad for p in params):
                continue
            if len(groups) > 1:
                raise ValueError(f"Invalid param_groups: the parameters of layer {name!r} are in different groups")
            options = self._block_options(module)
            block = ScaleShiftBlock(helper.channels(module), shift=helper.has_bias(module), **options)
            layer = TrackedLayer(name, module, helper, block, params)
            self.layers[name] = layer
            self.layer_groups[groups.pop()].append(layer)  # type: ignore[index]

    # -- step -------------------------------------------------------------------------------------------
    def fisher_diagonals(self, group_index: int) -> list[tuple[list[nn.Parameter], list[Tensor | None]]]:
        """Per layer of a param group: its parameters and their current ``F_D`` (``None`` before statistics)."""
        damping = self.group_value(self.param_groups[group_index], "damping")
        out = []
        for layer in self.layer_groups[group_index]:
            block = layer.block
            assert isinstance(block, DiagonalFactors)
            fisher = block.fisher(damping)
            pieces: list[Tensor | None] = (
                [None] * len(layer.params) if fisher is None else list(layer.helper.split(layer.module, fisher))
            )
            out.append((layer.params, pieces))
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One AdaFisher step (the algorithm in the class docstring).

        Args:
            closure: re-evaluates the model and returns the loss (it runs under ``torch.enable_grad``).
        """
        loss = self.run_closure(closure)
        if not self.grads_finite():
            self.finish_step(skipped=True)
            return loss
        self.commit_curvature()
        for index, (group, plain) in enumerate(zip(self.param_groups, self._plain_params)):
            params: list[Tensor] = []
            grads: list[Tensor] = []
            fishers: list[Tensor | None] = []
            for layer_params, pieces in self.fisher_diagonals(index):
                if any(p.grad is None for p in layer_params):
                    continue
                params.extend(layer_params)
                grads.extend(p.grad for p in layer_params)  # type: ignore[misc]
                fishers.extend(pieces)
            for p in plain:
                if p.grad is not None:
                    params.append(p)
                    grads.append(p.grad)
                    fishers.append(None)
            adafisher_update_(
                params,
                grads,
                fishers,
                self.state,
                lr=self.group_value(group, "lr"),
                beta=self.group_value(group, "beta"),
                weight_decay=self.group_value(group, "weight_decay"),
                mode=self.weight_decay_mode,
            )
        self.finish_step()
        return loss


class AdaFisherW(AdaFisher):
    """AdaFisher with decoupled weight decay: ``θ <- θ - α (m̂ / F_D + η θ)`` (see :class:`AdaFisher`)."""

    default_weight_decay_mode = WeightDecayMode.DECOUPLED
