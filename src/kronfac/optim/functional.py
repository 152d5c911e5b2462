"""Functional kernels shared by the optimizers (the stateful classes call these)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["momentum_update_"]


def momentum_update_(
    params: list[Tensor],
    updates: list[Tensor],
    state: dict[Any, dict[str, Any]],
    *,
    lr: float,
    momentum: float,
) -> None:
    """Heavy-ball momentum ``b <- μ b + u``, ``θ <- θ - lr b`` (SGD's convention; ``b`` starts at ``u``)."""
    if not params:
        return
    if momentum == 0.0:
        torch._foreach_add_(params, updates, alpha=-lr)
        return
    bufs = []
    for p, u in zip(params, updates):
        pstate = state[p]
        buf = pstate.get("momentum_buffer")
        if buf is None:
            buf = pstate["momentum_buffer"] = u.detach().clone()
        else:
            buf.mul_(momentum).add_(u)
        bufs.append(buf)
    torch._foreach_add_(params, bufs, alpha=-lr)
