"""``KFACPreconditioner``: K-FAC's curvature in front of any torch optimizer.

``pre.step()`` replaces each parameter's ``.grad`` by its K-FAC direction (with KL clipping when ``kl_clip``
is set); the wrapped optimizer (SGD, Adam, ...) then applies its own update rule to it. It is :class:`KFAC` with
an update kernel that writes the directions into ``.grad`` instead of moving the parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kronfac.distributed.config import DistributedConfig
from kronfac.linalg.base import InverseConfig
from kronfac.optim.corrections.base import Correction
from kronfac.optim.kfac import KFAC, KFAC_DEFAULTS
from kronfac.optim.options import CaptureOptions, Schedule
from kronfac.optim.types import GroupStep

__all__ = ["KFACPreconditioner"]


class KFACPreconditioner(KFAC):
    """Precondition ``.grad`` in place with K-FAC (no momentum, no weight decay: those are the wrapped optimizer's).

    Args:
        model: the model whose layers are preconditioned.
        damping, factor_decay, factor_every, inverse_every, kl_clip, inverse, correction, distributed: as for
            :class:`~kronfac.KFAC` (``kl_clip`` is off by default here).
        lr: learning rate assumed by the KL clip (ignored when ``kl_clip`` is None).
        param_groups, fisher_type, loss, loss_average, approx, mc_samples, seed, grad_scaler, output_fn, on_nonfinite,
            max_skipped, accumulation_steps, include, exclude, factor_dtype: the shared capture options
            (:class:`~kronfac.optim.options.CaptureOptions`).

    Example:
        >>> import torch, kronfac
        >>> model = torch.nn.Linear(4, 2)
        >>> pre = kronfac.KFACPreconditioner(model, damping=1e-2)
        >>> sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> pre.step(); sgd.step()
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        damping: Schedule = KFAC_DEFAULTS["damping"],
        factor_decay: float = KFAC_DEFAULTS["factor_decay"],
        factor_every: int = KFAC_DEFAULTS["factor_every"],
        inverse_every: int = KFAC_DEFAULTS["inverse_every"],
        kl_clip: float | None = None,
        lr: Schedule = 1.0,
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
    ) -> None:
        super().__init__(
            model,
            lr,
            0.0,
            0.0,
            damping,
            factor_decay,
            factor_every,
            inverse_every,
            kl_clip,
            inverse=inverse,
            correction=correction,
            distributed=distributed,
            **CaptureOptions.keywords(locals()),
        )

    def update(self, step: GroupStep) -> None:
        """Write the directions into ``.grad`` (the wrapped optimizer applies them)."""
        for p, direction in zip(step.params, step.directions):
            if p.grad is not direction:
                p.grad.copy_(direction)  # type: ignore[union-attr]
