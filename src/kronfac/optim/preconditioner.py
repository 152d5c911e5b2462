"""``KFACPreconditioner``: K-FAC's curvature in front of any torch optimizer.

``pre.step()`` replaces each parameter's ``.grad`` by its K-FAC direction (with KL clipping when ``kl_clip``
is set); the wrapped optimizer (SGD, Adam, ...) then applies its own update rule to it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kronfac.optim.base import Schedule
from kronfac.optim.kfac import KFAC

__all__ = ["KFACPreconditioner"]


class KFACPreconditioner:
    """Precondition ``.grad`` in place with K-FAC.

    Args:
        model: the model whose layers are preconditioned.
        damping, factor_decay, factor_every, inverse_every, kl_clip: as for :class:`~kronfac.KFAC`.
        lr: learning rate assumed by the KL clip (ignored when ``kl_clip`` is None).
        **kwargs: further options of :class:`~kronfac.KFAC` (``inverse``, ``fisher_type``, ...).

    Example:
        >>> import torch, kronfac
        >>> model = torch.nn.Linear(4, 2)
        >>> pre = kronfac.KFACPreconditioner(model, damping=1e-2, kl_clip=None)
        >>> sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> pre.step(); sgd.step()
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        damping: Schedule = 1e-3,
        factor_decay: float = 0.95,
        factor_every: int = 1,
        inverse_every: int = 10,
        kl_clip: float | None = None,
        lr: Schedule = 1.0,
        **kwargs: Any,
    ) -> None:
        self._kfac = KFAC(
            model,
            lr=lr,
            momentum=0.0,
            weight_decay=0.0,
            damping=damping,
            factor_decay=factor_decay,
            factor_every=factor_every,
            inverse_every=inverse_every,
            kl_clip=kl_clip,
            **kwargs,
        )

    @property
    def layers(self) -> dict[str, Any]:
        return self._kfac.layers

    @property
    def steps(self) -> int:
        return self._kfac.steps

    @torch.no_grad()
    def step(self) -> bool:
        """Precondition the gradients in place. Returns False when the step was skipped (non-finite grads)."""
        per_group = self._kfac.preconditioned_updates()
        if not per_group:
            return False
        for params, updates in per_group:
            for p, u in zip(params, updates):
                if p.grad is not u:
                    p.grad.copy_(u)  # type: ignore[union-attr]
        self._kfac.finish_step()
        return True

    def state_dict(self) -> dict[str, Any]:
        return self._kfac.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._kfac.load_state_dict(state_dict)

    def close(self) -> None:
        self._kfac.close()
