"""AdaFisher and AdaFisherW (Gomes, Zhang, Belilovsky, Wolf & Hosseini, ICLR 2025, "AdaFisher: Adaptive Second
Order Optimization via Fisher Information", arXiv:2405.16397).

AdaFisher is Adam with its second-moment denominator replaced by a diagonal Kronecker-factored Fisher ``F_D``:
the diagonals of K-FAC's factors, min-max normalised and averaged (:mod:`kronfac.curvature.diagonal_fisher`), and no
square root. AdaFisherW is the same method with decoupled weight decay; here it is AdaFisher with a different
weight-decay mode, not a second copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from kronfac.curvature.block import CurvatureBlock
from kronfac.curvature.diagonal_fisher import DiagonalFactors, DiagonalKroneckerBlock, FactorAveraging, ScaleShiftBlock
from kronfac.distributed import sharded
from kronfac.distributed.config import DistributedConfig
from kronfac.layers import LayerHelper
from kronfac.layers.normalization import ScaleShiftHelper, norm_helper_for
from kronfac.optim.base import KronOptimizer, WeightDecay
from kronfac.optim.functional import adafisher_state, adafisher_update_
from kronfac.optim.options import CaptureOptions, Schedule, check_bool, check_choice, check_range
from kronfac.optim.types import GroupStep

__all__ = ["ADAFISHER_DEFAULTS", "AdaFisher", "AdaFisherW", "WeightDecayMode"]

#: AdaFisher's defaults; the class docstring gives their sources.
ADAFISHER_DEFAULTS: dict[str, Any] = {
    "lr": 1e-2,
    "betas": (0.9, 0.8),
    "weight_decay": 0.0,
    "damping": 1e-3,
    "factor_every": 10,
}


class WeightDecayMode(str, Enum):
    """``coupled``: ``η θ`` is added to the gradient (AdaFisher); ``decoupled``: ``θ`` shrinks by ``lr η θ``
    outside the preconditioned step (AdaFisherW, as AdamW)."""

    COUPLED = "coupled"
    DECOUPLED = "decoupled"


class AdaFisher(KronOptimizer):
    r"""AdaFisher as a ``torch.optim.Optimizer``.

    Every ``factor_every`` steps (``T_cov`` in the paper), for each supported layer: ``Ĥ`` = per-batch mean of
    ``a ⊙ a``, ``Ŝ`` = per-batch mean of ``g ⊙ g`` (diagonals of K-FAC's ``A`` and ``G``), each min-max
    normalised to ``[0, 1]`` and averaged into ``H``, ``S`` (EMA with decay ``γ``). Every step, per parameter:

    1. ``F_D = diag(S) diag(H)^T + λ`` shaped like ``W`` (bias last column); normalisation layers: the scale gets
       ``H ⊙ S + λ``, the shift ``S + λ`` (``H`` from the normalised input ``x̂``); any other parameter ``F = 1``;
    2. ``m <- β m + (1-β) g``, ``m̂ = m / (1 - β^t)``;
    3. ``θ <- θ - α m̂ / F_D`` (weight decay coupled into ``g`` here, decoupled in :class:`AdaFisherW`).

    Supported modules: Linear, Conv2d, Embedding (through the shared helpers), LayerNorm and BatchNorm1d/2d/3d
    (through ``kronfac.layers.normalization``). Parameters are paired with their modules by identity.

    Defaults and their source (:data:`ADAFISHER_DEFAULTS`): ``betas = (0.9, 0.8)``, ``damping = 1e-3`` (paper and
    reference code; the reference's ``gamma = 0.8`` is used here as the decay of a proper EMA); ``lr = 1e-2`` and
    ``factor_every = 10`` from our benchmark sweeps (the paper's ``lr = 1e-3`` and ``T_cov = 100`` leave a small
    MLP at 0.61 test accuracy after 300 steps, where AdamW's defaults reach 0.975); ``averaging="reference"``
    reproduces the reference's ``0.08 H + 0.008 Ĥ`` update started from ones, whose coefficients do not sum to 1
    (``kronfac.curvature.diagonal_fisher``).

    Args:
        model: the model.
        lr: learning rate α (float or a callable of the step).
        betas: ``(β, γ)``: the first-moment decay β and the EMA decay γ of ``H`` and ``S`` (ignored with
            ``averaging="reference"``); torch's schedulers that cycle ``betas[0]`` (OneCycleLR) cycle β.
        weight_decay: weight-decay coefficient η.
        damping: λ added to ``F_D`` (float or a callable of the step).
        factor_every: ``T_cov``: capture statistics and update ``H``, ``S`` every this many steps.
        averaging: ``"ema"`` or ``"reference"``.
        weight_decay_mode: ``"coupled"`` (default here) or ``"decoupled"`` (the default of :class:`AdaFisherW`).
        norm_layers: give LayerNorm/BatchNorm their scale/shift blocks (the paper); ``False`` gives their
            parameters ``F = 1`` like any other parameter without a block (more stable on our char transformer,
            see ``benchmarks/adafisher/ablation_norms.md``).
        distributed: as for :class:`~kronfac.KFAC` (``H`` and ``S`` statistics are summed over the ranks).
        param_groups, fisher_type, loss, loss_average, approx, mc_samples, seed, grad_scaler, output_fn, on_nonfinite,
            max_skipped, accumulation_steps, include, exclude, factor_dtype: the shared capture options
            (:class:`~kronfac.optim.options.CaptureOptions`).

    Example:
        >>> import torch, kronfac
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
        >>> opt = kronfac.AdaFisher(model, lr=1e-3, factor_every=10)
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> torch.nn.functional.cross_entropy(model(x), y).backward()
        >>> opt.step(); opt.zero_grad()
    """

    default_weight_decay_mode = WeightDecayMode.COUPLED
    layer_directions = False

    def __init__(
        self,
        model: nn.Module,
        lr: Schedule = ADAFISHER_DEFAULTS["lr"],
        betas: tuple[float, float] = ADAFISHER_DEFAULTS["betas"],
        weight_decay: float = ADAFISHER_DEFAULTS["weight_decay"],
        damping: Schedule = ADAFISHER_DEFAULTS["damping"],
        factor_every: int = ADAFISHER_DEFAULTS["factor_every"],
        *,
        averaging: str = "ema",
        weight_decay_mode: str | None = None,
        norm_layers: bool = True,
        distributed: DistributedConfig | bool | None = None,
        param_groups: Iterable[dict[str, Any]] | None = None,
        fisher_type: str = "empirical",
        loss: str = "cross_entropy",
        loss_average: str | None = "batch",
        approx: str = "expand",
        mc_samples: int = 1,
        seed: int = 0,
        grad_scaler: Any = None,
        output_fn: Callable[[Any], Tensor] | None = None,
        on_nonfinite: str = "raise",
        max_skipped: int = 10,
        accumulation_steps: int = 1,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        factor_dtype: torch.dtype | None = None,
    ) -> None:
        options = CaptureOptions.pick(locals())
        lr = check_range("lr", lr, 0.0)
        betas = _check_betas(betas)
        weight_decay = check_range("weight_decay", weight_decay, 0.0)
        damping = check_range("damping", damping, 0.0, low_open=True)
        self.averaging = check_choice(FactorAveraging, "averaging", averaging)
        self.norm_layers = check_bool("norm_layers", norm_layers)
        mode = self.default_weight_decay_mode if weight_decay_mode is None else weight_decay_mode
        decay = check_choice(WeightDecayMode, "weight_decay_mode", mode)
        self.weight_decay_mode = WeightDecay.DECOUPLED if decay is WeightDecayMode.DECOUPLED else WeightDecay.GRADIENT
        defaults = {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay, "damping": damping}
        super().__init__(model, defaults, options, factor_every=factor_every, distributed=distributed)

    def helper_for(self, module: nn.Module) -> LayerHelper | None:
        helper = super().helper_for(module)
        if helper is None and self.norm_layers and getattr(module, "weight", None) is not None:
            return norm_helper_for(module)  # affine LayerNorm / BatchNorm: the scale/shift blocks of the paper
        return helper

    def make_block(self, name: str, module: nn.Module, helper: LayerHelper, group: dict[str, Any]) -> CurvatureBlock:
        weight = helper.params(module)[0]
        kw: dict[str, Any] = {
            "approx": self.options.approx,
            "averaging": self.averaging,
            "dtype": self.options.statistics_dtype(weight),
            "device": weight.device,
        }
        if isinstance(helper, ScaleShiftHelper):
            return ScaleShiftBlock(helper.channels(module), shift=helper.has_bias(module), **kw)
        d_in, d_out = helper.dims(module)
        return DiagonalKroneckerBlock(d_in, d_out, diagonal_a=helper.diagonal_a, **kw)

    def hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        """The group's values with ``betas`` unpacked: ``beta`` (first moment), ``factor_decay`` (γ)."""
        hyper = super().hyper(group)
        hyper["beta"], hyper["factor_decay"] = (float(b) for b in hyper["betas"])
        return hyper

    def fisher_diagonals(self, index: int, damping: float) -> dict[Tensor, Tensor]:
        """Parameter -> its ``F_D`` piece with damping ``λ``, for the layers of param group ``index`` that have
        statistics."""
        pieces: dict[Tensor, Tensor] = {}
        for layer in self.layer_groups[index]:
            block = layer.block
            assert isinstance(block, DiagonalFactors)
            fisher = block.fisher(damping)
            if fisher is not None:
                split = layer.helper.split(layer.module, fisher)
                pieces.update((p, sharded.shard_like(f, p)) for p, f in zip(layer.params, split))
        return pieces

    def initial_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        return adafisher_state(param)

    def update(self, step: GroupStep) -> None:
        fishers = self.fisher_diagonals(step.index, float(step.hyper["damping"]))
        adafisher_update_(
            step.params,
            step.directions,
            [fishers.get(p) for p in step.params],
            self.state,
            lr=float(step.hyper["lr"]),
            beta=float(step.hyper["beta"]),
        )


def _check_betas(betas: Any) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (must be a pair (beta, gamma))")
    return check_range("betas[0]", betas[0], 0.0, 1.0, high_open=True), check_range("betas[1]", betas[1], 0.0, 1.0)


class AdaFisherW(AdaFisher):
    """AdaFisher with decoupled weight decay: ``θ <- θ - α (m̂ / F_D + η θ)`` (see :class:`AdaFisher`)."""

    default_weight_decay_mode = WeightDecayMode.DECOUPLED
