"""Parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): DTensors seen through full matrices.

Under FSDP2 a layer's parameters and gradients are DTensors, each rank holding a shard (``Shard(0)``) of the
gradient averaged over the ranks (reduce-scatter). The curvature needs none of that: the capture hooks see the
layer's full inputs and output gradients of the rank's own batch, as under DDP, and the ranks average the
statistics as they do under DDP. The update needs the full gradient matrix, so for a sharded layer the step
all-gathers the gradient shards (and the parameters, when weight decay enters before preconditioning), computes
the direction from the full matrix, identical on every rank, and keeps each rank's own shard of it.

Communication per step against DDP: DDP all-reduces each gradient (about ``2 P`` elements moved per rank for
``P`` parameters); FSDP2 reduce-scatters it (``P``) and all-gathers the parameters for the forward and the
backward (``2 P``); kronfac adds one all-gather of each preconditioned layer's gradient (``P``) plus, with
gradient-coupled weight decay, one of its parameters (``P``). First-order parameters stay sharded throughout.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["any_nonfinite_anywhere", "full", "is_sharded", "shard_like", "shards_any"]


@functools.cache  # asked for every parameter of every step: import once
def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without the public DTensor API (< 2.4): nothing can be sharded
        return None
    return DTensor


def is_sharded(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor (an FSDP2 parameter or gradient)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def shards_any(params: Sequence[Tensor]) -> bool:
    return any(is_sharded(p) for p in params)


def full(tensor: Tensor) -> Tensor:
    """The full tensor of a DTensor (one all-gather), or the tensor itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor  # type: ignore[attr-defined]


def shard_like(value: Tensor, param: Tensor) -> Tensor:
    """``value`` (a full tensor of ``param``'s shape) laid out like ``param``: this rank's shard as a DTensor when
    ``param`` is one (no communication: every rank holds the same full value), else ``value``."""
    if not is_sharded(param):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(
        value.detach(),
        param.device_mesh,  # type: ignore[attr-defined]
        param.placements,  # type: ignore[attr-defined]
        src_data_rank=None,
    )


def any_nonfinite_anywhere(local_bad: bool, device: torch.device) -> bool:
    """Whether some rank saw a non-finite gradient shard (shards differ by rank, so every rank must agree)."""
    import torch.distributed as dist

    flag = torch.tensor([1.0 if local_bad else 0.0], device=device)
    dist.all_reduce(flag)
    return bool(flag.item() > 0)
