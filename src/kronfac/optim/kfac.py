"""K-FAC (Martens & Grosse, ICML 2015; Grosse & Martens, ICML 2016 for convolutions).

For each supported layer with gradient matrix ``∇W`` (``d_o x d_i``, bias as the last column) K-FAC keeps
EMA factors ``A ≈ E[a a^T]`` and ``G ≈ E[g g^T]`` and steps along ``U = (G ⊗ A + λI)^{-1} vec(∇W)``, computed
from the factors' inverses without forming the Kronecker product.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kronfac.curvature.block import CurvatureBlock
from kronfac.curvature.kfac_block import KFACBlock
from kronfac.distributed.config import DistributedConfig
from kronfac.layers import LayerHelper
from kronfac.linalg.base import InverseConfig
from kronfac.linalg.cholesky import CholeskyConfig
from kronfac.optim.async_refresh import AsyncRefresher
from kronfac.optim.base import KronOptimizer
from kronfac.optim.corrections.base import Correction
from kronfac.optim.functional import momentum_state, momentum_update_
from kronfac.optim.options import CaptureOptions, Schedule, check_positive_int, check_range
from kronfac.optim.types import GroupStep
from kronfac.validation import check_bool

__all__ = ["KFAC", "KFAC_DEFAULTS"]

#: K-FAC's defaults and their source: damping 1e-3, factor decay 0.95 and KL clip 1e-3 as in Martens & Grosse
#: (2015) and Ba et al. (2017); inverses every 10 steps (the cheap end of the paper's 10-100); lr 0.05 and
#: momentum 0.9, the values our benchmark sweeps pick most often (benchmarks/bench).
KFAC_DEFAULTS: dict[str, Any] = {
    "lr": 0.05,
    "momentum": 0.9,
    "weight_decay": 0.0,
    "damping": 1e-3,
    "factor_decay": 0.95,
    "factor_every": 1,
    "inverse_every": 10,
    "kl_clip": 1e-3,
}


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
        inverse: backend config: :class:`~kronfac.CholeskyConfig` (factored damping with the π correction,
            the default: two products per step, measured as good as exact damping on the bench tasks and about
            twice as fast, see ``benchmarks/speed``), :class:`~kronfac.EighConfig` (exact eigen-damping),
            :class:`~kronfac.ThermodynamicConfig` (simulated analog solver) or another
            :class:`~kronfac.InverseConfig`.
        correction: a correction composed into the step, e.g. :class:`~kronfac.KLDWRM`.
        distributed: ``None`` (average the curvature over the ranks when a process group with more than one
            rank is initialised), a :class:`~kronfac.DistributedConfig` (the strategy), or ``False``.
        param_groups, fisher_type, loss, loss_average, approx, mc_samples, seed, grad_scaler, output_fn, on_nonfinite,
            max_skipped, accumulation_steps, include, exclude, factor_dtype: the shared capture options
            (:class:`~kronfac.optim.options.CaptureOptions`).
        async_refresh: build the inverses of a refresh step in a background thread (a side CUDA stream on a
            GPU) and install them at the next refresh step: the inverses are one refresh interval stale, the
            refresh leaves the step's critical path (``kronfac.optim.async_refresh``). One process only, no
            correction. Deterministic and exactly resumable; off by default (the synchronous step, bit for bit).

    Example:
        >>> import torch, kronfac
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> opt = kronfac.KFAC(model, lr=0.1, damping=1e-2)
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> torch.nn.functional.cross_entropy(model(x), y).backward()
        >>> opt.step(); opt.zero_grad()
    """

    refresh_every_name = "inverse_every"

    def __init__(
        self,
        model: nn.Module,
        lr: Schedule = KFAC_DEFAULTS["lr"],
        momentum: float = KFAC_DEFAULTS["momentum"],
        weight_decay: float = KFAC_DEFAULTS["weight_decay"],
        damping: Schedule = KFAC_DEFAULTS["damping"],
        factor_decay: float = KFAC_DEFAULTS["factor_decay"],
        factor_every: int = KFAC_DEFAULTS["factor_every"],
        inverse_every: int = KFAC_DEFAULTS["inverse_every"],
        kl_clip: float | None = KFAC_DEFAULTS["kl_clip"],
        *,
        inverse: InverseConfig | None = None,
        correction: Correction | None = None,
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
        async_refresh: bool = False,
    ) -> None:
        options = CaptureOptions.pick(locals())
        async_refresh = check_bool("async_refresh", async_refresh)
        lr = check_range("lr", lr, 0.0)
        momentum = check_range("momentum", momentum, 0.0, 1.0)
        weight_decay = check_range("weight_decay", weight_decay, 0.0)
        damping = check_range("damping", damping, 0.0, low_open=True)
        factor_decay = check_range("factor_decay", factor_decay, 0.0, 1.0)
        if kl_clip is not None:
            kl_clip = check_range("kl_clip", kl_clip, 0.0, low_open=True)
        inverse_every = check_positive_int("inverse_every", inverse_every)
        inverse = CholeskyConfig() if inverse is None else inverse
        if not isinstance(inverse, InverseConfig):
            raise ValueError(f"Invalid inverse: {inverse!r} (must be an InverseConfig such as CholeskyConfig())")
        self.inverse_config, self.inverse_every = inverse, inverse_every
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "damping": damping,
            "factor_decay": factor_decay,
            "kl_clip": kl_clip,
        }
        super().__init__(
            model,
            defaults,
            options,
            factor_every=factor_every,
            refresh_every=inverse_every,
            distributed=distributed,
            correction=correction,
        )
        self.refresher: AsyncRefresher | None = None
        if async_refresh:
            if self.sync is not None or self.placement is not None:
                self.close()
                raise ValueError(
                    "async_refresh=True runs on one process: distributed K-FAC already spreads the refresh over "
                    "the ranks (pass async_refresh=False, or distributed=False to precondition each rank alone)"
                )
            if correction is not None:
                self.close()
                raise ValueError(
                    f"async_refresh=True cannot be combined with a correction ({type(correction).__name__} reads "
                    "the inverses of the refresh step itself)"
                )
            self.refresher = AsyncRefresher(
                {name: layer.block for name, layer in self.layers.items()}  # type: ignore[misc]
            )

    def scheduled_refresh(self, hypers: list[dict[str, Any]]) -> None:
        if self.refresher is None:
            super().scheduled_refresh(hypers)
            return
        dampings = {layer.name: float(h["damping"]) for h, layers in zip(hypers, self.layer_groups) for layer in layers}
        self.refresher.refresh(dampings)

    def curvature_state_dict(self) -> dict[str, Any]:
        state = super().curvature_state_dict()
        if self.refresher is not None:
            state["pending_inverses"] = self.refresher.state_dict()
        return state

    def load_curvature_extra(self, extra: dict[str, Any]) -> None:
        if self.refresher is not None:
            devices = {name: layer.params[0].device for name, layer in self.layers.items()}
            self.refresher.load_state_dict(extra.get("pending_inverses", {}), devices.__getitem__)

    def close(self) -> None:
        refresher = getattr(self, "refresher", None)
        if refresher is not None:
            refresher.close()
        super().close()

    def make_block(self, name: str, module: nn.Module, helper: LayerHelper, group: dict[str, Any]) -> CurvatureBlock:
        d_in, d_out = helper.dims(module)
        weight = helper.params(module)[0]
        return KFACBlock(
            d_in,
            d_out,
            name=name,
            inverse=self.inverse_config,
            diagonal_a=helper.diagonal_a,
            approx=self.options.approx,
            dtype=self.options.statistics_dtype(weight),
            device=weight.device,
        )

    def initial_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        return momentum_state(param, float(group["momentum"]))

    def update(self, step: GroupStep) -> None:
        momentum_update_(
            step.params,
            step.directions,
            self.state,
            lr=float(step.hyper["lr"]),
            momentum=float(step.hyper["momentum"]),
        )
