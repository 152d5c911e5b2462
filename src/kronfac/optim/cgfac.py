"""CG-FAC: matrix-free K-FAC by conjugate gradient on the batch matrices (Chen 2021).

Chen, "An iterative K-FAC algorithm for Deep Learning", arXiv:2101.00218, 2021. K-FAC's step with the
factor inversion replaced by a few warm-started CG iterations on ``G U A + λ U = ∇W`` applied through the
stored batch rows (:class:`~kronfac.curvature.cg_block.CGBlock`); everything else (schedule, KL clip, momentum,
weight decay, checkpointing) is :class:`~kronfac.KFAC`'s.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from kronfac.curvature.block import CurvatureBlock
from kronfac.curvature.cg_block import CGBlock
from kronfac.optim.base import Schedule, check_positive_int, check_range
from kronfac.optim.kfac import KFAC

__all__ = ["CGFAC"]


class CGFAC(KFAC):
    r"""CG-FAC as a ``torch.optim.Optimizer``.

    Per layer with ``a`` (``N x d_i``) and ``g`` (``N x d_o``) the rows of the last curvature batch
    (``A = a^T a / N``, ``G = g^T g / N`` as in K-FAC, never formed), one step is:

    1. every ``factor_every`` steps: store the batch rows (the last ``history`` batches are kept);
    2. solve ``(G ⊗ A + λI) vec(U) = vec(∇W + η W)`` by CG, ``G U A = g^T (g U) a^T a / N^2`` costing
       ``O(N d_i d_o)`` per iteration, from zero (or the previous ``U`` with ``warm_start``), stopping after
       ``max_iters`` iterations or at relative residual ``tol``;
    3. KL clip, heavy-ball momentum and the learning rate as in :class:`~kronfac.KFAC`.

    Memory per layer is ``O(history N (d_i + d_o))`` plus ``U``; K-FAC needs ``O(d_i^2 + d_o^2)``.

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
        **kwargs: curvature options of :class:`~kronfac.optim.base.KronOptimizer` (``fisher_type``, ``loss``,
            ``approx``, ``on_nonfinite``, ``factor_dtype``, ``param_groups``, ...).

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
        lr: Schedule = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        damping: Schedule = 1e-3,
        max_iters: int = 20,
        tol: float = 1e-4,
        factor_decay: float = 0.95,
        factor_every: int = 1,
        kl_clip: float | None = 1e-3,
        *,
        history: int = 1,
        warm_start: bool = False,
        **kwargs: Any,
    ) -> None:
        check_positive_int("max_iters", max_iters)
        check_range("tol", tol, 0.0)
        check_positive_int("history", history)
        for key in ("inverse", "inverse_every", "correction", "distributed"):
            if kwargs.get(key) is not None:
                raise ValueError(f"Invalid {key}: CGFAC solves by CG on the batch rows and takes no {key}")
            kwargs.pop(key, None)
        self.max_iters, self.tol, self.history, self.warm_start = max_iters, float(tol), history, warm_start
        super().__init__(
            model,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            damping=damping,
            factor_decay=factor_decay,
            factor_every=factor_every,
            inverse_every=1,
            kl_clip=kl_clip,
            **kwargs,
        )

    def make_block(self, name: str, module: nn.Module, d_in: int, d_out: int, diagonal_a: bool) -> CurvatureBlock:
        return CGBlock(
            d_in,
            d_out,
            max_iters=self.max_iters,
            tol=self.tol,
            history=self.history,
            warm_start=self.warm_start,
            diagonal_a=diagonal_a,
            approx=self.approx,
            dtype=self.factor_dtype,
        )

    def refresh_inverses(self) -> None:
        """Hand each block the current damping (called every step; there is nothing to invert)."""
        for group, layers in zip(self.param_groups, self.layer_groups):
            damping = self.group_value(group, "damping")
            for layer in layers:
                layer.block.refresh(damping=damping)  # type: ignore[attr-defined]

    def state_bytes(self) -> int:
        """Bytes of curvature state held between steps, over all layers (rows plus warm-start solutions)."""
        return sum(layer.block.state_bytes() for layer in self.layers.values())  # type: ignore[attr-defined]
