"""Functional kernels shared by the optimizers (the stateful classes call these)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["adafisher_state", "adafisher_update_", "momentum_state", "momentum_update_"]


def momentum_state(param: Tensor, momentum: float) -> dict[str, Any]:
    """The state :func:`momentum_update_` starts from: a zero buffer (``b <- μ·0 + u = u`` exactly, SGD's first
    step), or ``None`` without momentum (as torch's SGD keeps it)."""
    return {"momentum_buffer": torch.zeros_like(param, memory_format=torch.preserve_format) if momentum else None}


def adafisher_state(param: Tensor) -> dict[str, Any]:
    """The state :func:`adafisher_update_` starts from: a zero first moment and step 0."""
    return {"exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format), "step": 0}


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


def adafisher_update_(
    params: list[Tensor],
    grads: list[Tensor],
    fishers: list[Tensor | None],
    state: dict[Any, dict[str, Any]],
    *,
    lr: float,
    beta: float,
) -> None:
    """One AdaFisher step for a list of parameters (``fishers[i] is None`` means ``F = 1``).

    ``m <- β m + (1-β) g``, ``m̂ = m / (1 - β^t)`` with ``t`` the parameter's own step count,
    ``θ <- θ - lr m̂ / F``. Weight decay is the caller's (coupled into ``g``, or decoupled before this call).
    """
    for p, g, f in zip(params, grads, fishers):
        pstate = state[p]
        if "exp_avg" not in pstate:
            pstate["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            pstate["step"] = 0
        pstate["step"] += 1
        exp_avg = pstate["exp_avg"]
        exp_avg.mul_(beta).add_(g, alpha=1.0 - beta)
        step_size = lr / (1.0 - beta ** pstate["step"])
        if step_size > torch.finfo(p.dtype).max:
            # the bias-corrected step leaves the dtype's range (an absurd lr): the parameters overflow to inf as
            # they would in float64 arithmetic, and the next step's gradient check names the layer
            p.sub_((exp_avg if f is None else exp_avg / f.to(p.dtype)) * step_size)
        elif f is None:
            p.add_(exp_avg, alpha=-step_size)
        else:
            p.addcdiv_(exp_avg, f.to(p.dtype), value=-step_size)
