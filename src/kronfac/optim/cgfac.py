"""CG-FAC: matrix-free K-FAC by conjugate gradient on the batch matrices (Chen 2021).

Chen, "An iterative K-FAC algorithm for Deep Learning", arXiv:2101.00218, 2021. K-FAC's step with the
factor inversion replaced by a few warm-started CG iterations on ``G U A + λ U = ∇W`` applied through the
stored batch rows (:class:`~kronfac.curvature.cg_block.CGBlock`); everything else (schedule, KL clip, momentum,
weight decay, checkpointing) is :class:`~kronfac.KFAC`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kronfac.curvature.block import CurvatureBlock
from kronfac.curvature.cg_block import CGBlock, CGOperator
from kronfac.distributed.config import DistributedConfig
from kronfac.layers import LayerHelper
from kronfac.optim.kfac import KFAC, KFAC_DEFAULTS
from kronfac.optim.options import CaptureOptions, Schedule, check_bool, check_positive_int, check_range
from kronfac.validation import check_choice

__all__ = ["CGFAC", "CGFAC_DEFAULTS"]

#: CG-FAC's own defaults (the rest are K-FAC's): at most 20 iterations to relative residual 1e-4, on the rows of
#: the last curvature batch only (``history=1``, Chen 2021's form), cold-started (``warm_start``: see the class).
#: ``operator="auto"`` applies ``G U A`` from the rows or from formed factors, whichever costs less.
CGFAC_DEFAULTS: dict[str, Any] = {"max_iters": 20, "tol": 1e-4, "history": 1, "warm_start": False, "operator": "auto"}


class CGFAC(KFAC):
    r"""CG-FAC as a ``torch.optim.Optimizer``.

    Per layer with ``a`` (``N x d_i``) and ``g`` (``N x d_o``) the rows of the last curvature batch
    (``A = a^T a / N``, ``G = g^T g / N`` as in K-FAC, never formed), one step is:

    1. every ``factor_every`` steps: store the batch rows (the last ``history`` batches are kept);
    2. solve ``(G ⊗ A + λI) vec(U) = vec(∇W + η W)`` by CG, ``G U A = g^T (g U) a^T a / N^2`` costing
       ``O(N d_i d_o)`` per iteration, from zero (or the previous ``U`` with ``warm_start``), stopping after
       ``max_iters`` iterations or at relative residual ``tol``;
    3. KL clip, heavy-ball momentum and the learning rate as in :class:`~kronfac.KFAC`.

    Memory per layer is ``O(history N (d_i + d_o))`` plus ``U``; K-FAC needs ``O(d_i^2 + d_o^2)``. When the rows
    outnumber the widths (sequence models: N is batch x positions) forming ``A`` and ``G`` once per curvature
    batch makes each iteration ``O(d_o d_i (d_o + d_i))`` instead; ``operator="auto"`` picks the cheaper per layer.

    Args:
        model: the model; its Linear (any leading dims), Conv2d and Embedding layers are preconditioned.
        lr: learning rate α.
        momentum: heavy-ball momentum μ.
        weight_decay: L2 coefficient η, added to the gradient before the solve.
        damping: Tikhonov damping λ (exact: added to the Kronecker product).
        max_iters: CG iterations per step at most.
        tol: relative residual ``||r|| / ||∇W||`` at which CG stops.
        factor_decay: ρ, the weight ratio between consecutive stored batches when ``history > 1``.
        factor_every: capture batch rows every this many steps.
        kl_clip: KL-clip bound κ; ``None`` disables it.
        history: number of curvature batches whose rows are kept (1: Chen's form).
        warm_start: start each solve from the previous step's solution. Off by default: the previous solution
            has large components (up to ``1/λ`` times the gradient) outside the span of the current batch's rows,
            where the residual is only ``λ U`` and CG hardly corrects them; on the digits MLP benchmark task
            (λ = 1e-3) warm-started CG-FAC diverged while cold-started CG-FAC trained well.
        operator: how CG applies ``G U A``: ``"rows"`` (from the stored rows, ``2 d_o d_i (N_a + N_g)`` per
            iteration), ``"factors"`` (from ``A`` and ``G`` formed once per curvature batch, ``d_o d_i (d_o + d_i)``
            per iteration) or ``"auto"`` (the default: the cheaper by a multiply-add count, per layer and batch).
            The same map either way: the solves agree to round-off.
        distributed: as for :class:`~kronfac.KFAC` (the rows of every rank are gathered).
        param_groups, fisher_type, loss, loss_average, approx, mc_samples, seed, grad_scaler, output_fn, on_nonfinite,
            max_skipped, accumulation_steps, include, exclude, factor_dtype: the shared capture options
            (:class:`~kronfac.optim.options.CaptureOptions`).

    Example:
        >>> import torch, kronfac
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 3))
        >>> opt = kronfac.CGFAC(model, lr=0.1, damping=1e-2, max_iters=10)
        >>> x, y = torch.randn(8, 64), torch.randint(0, 3, (8,))
        >>> torch.nn.functional.cross_entropy(model(x), y).backward()
        >>> opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        model: nn.Module,
        lr: Schedule = KFAC_DEFAULTS["lr"],
        momentum: float = KFAC_DEFAULTS["momentum"],
        weight_decay: float = KFAC_DEFAULTS["weight_decay"],
        damping: Schedule = KFAC_DEFAULTS["damping"],
        max_iters: int = CGFAC_DEFAULTS["max_iters"],
        tol: float = CGFAC_DEFAULTS["tol"],
        factor_decay: float = KFAC_DEFAULTS["factor_decay"],
        factor_every: int = KFAC_DEFAULTS["factor_every"],
        kl_clip: float | None = KFAC_DEFAULTS["kl_clip"],
        *,
        history: int = CGFAC_DEFAULTS["history"],
        warm_start: bool = CGFAC_DEFAULTS["warm_start"],
        operator: str = CGFAC_DEFAULTS["operator"],
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
        max_iters = check_positive_int("max_iters", max_iters)
        tol = check_range("tol", tol, 0.0)
        history = check_positive_int("history", history)
        self.max_iters, self.tol, self.history = max_iters, tol, history
        self.warm_start = check_bool("warm_start", warm_start)
        self.operator = check_choice(CGOperator, "operator", operator)
        super().__init__(
            model,
            lr,
            momentum,
            weight_decay,
            damping,
            factor_decay,
            factor_every,
            1,  # the solve takes the current damping every step; there is nothing to invert
            kl_clip,
            distributed=distributed,
            **CaptureOptions.keywords(locals()),
        )

    def make_block(self, name: str, module: nn.Module, helper: LayerHelper, group: dict[str, Any]) -> CurvatureBlock:
        d_in, d_out = helper.dims(module)
        return CGBlock(
            d_in,
            d_out,
            max_iters=self.max_iters,
            tol=self.tol,
            history=self.history,
            warm_start=self.warm_start,
            diagonal_a=helper.diagonal_a,
            approx=self.options.approx,
            dtype=self.options.statistics_dtype(helper.params(module)[0]),
            operator=self.operator,
            steps_per_batch=self.factor_every,
        )

    def state_bytes(self) -> int:
        """Bytes of curvature state held between steps, over all layers (rows plus warm-start solutions)."""
        return sum(layer.block.state_bytes() for layer in self.layers.values())  # type: ignore[attr-defined]
