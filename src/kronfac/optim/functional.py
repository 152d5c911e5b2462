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
    bufs, fresh = [], []
    for p, u in zip(params, updates):
        pstate = state[p]
        buf = pstate.get("momentum_buffer")
        if buf is None:
            pstate["momentum_buffer"] = u.detach().clone()
            fresh.append(pstate["momentum_buffer"])
        else:
            bufs.append((buf, u))
    if bufs:
        old, new = [b for b, _ in bufs], [u for _, u in bufs]
        torch._foreach_mul_(old, momentum)
        torch._foreach_add_(old, new)
    torch._foreach_add_(params, [state[p]["momentum_buffer"] for p in params], alpha=-lr)
