"""Curvature placed by layer: each layer's factors and inverse live on one owner rank (FSDP2's memory scaling).

Under FSDP2 the parameters, gradients and optimizer moments are sharded 1/ranks, but replicated Kronecker
factors and inverses (``d_i² + d_o²`` per layer, two to three times a layer's parameter count for square layers)
would dominate the per-rank memory. With placement, every layer has one owner, chosen so that the owners' shares of
curvature memory are as even as the layer sizes allow (largest first to the least loaded rank):

1. the statistics are reduced over the ranks as without placement (a transient buffer of one step); ranks that do
   not own a layer then drop its statistics, and only the owner folds them into its factors;
2. only the owner refreshes the layer's inverse;
3. every rank all-gathers the layer's gradient (FSDP2 keeps shards), the owner computes the direction, and the
   owners broadcast their layers' directions (one message per owner); every rank then keeps its shard.

Checkpoints gather every layer's state from its owner into the blob, so the blob is the same on every rank (as
without placement) and resumes on any number of ranks; each rank keeps only its own layers after loading.
Communication added per step: the directions' broadcast, ``P`` elements for ``P`` parameters of preconditioned
layers (against ``2P`` for a DDP all-reduce of the gradient).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from kronfac.curvature.capture import TrackedLayer
from kronfac.distributed.communicator import Communicator

__all__ = ["LayerPlacement"]


class LayerPlacement:
    """Owners of the layers' curvature and the broadcast of their directions.

    Args:
        layers: the tracked layers (same order on every rank).
        comm: the communicator of the optimizer's sync (its group, timeouts and error messages).
    """

    def __init__(self, layers: list[TrackedLayer], comm: Communicator) -> None:
        self.comm, self.rank, self.world_size = comm, comm.rank, comm.world_size
        load = [0] * self.world_size
        self.owner: dict[str, int] = {}
        sizes = {layer.name: sum(d * d for d in layer.helper.dims(layer.module)) for layer in layers}
        for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
            rank = min(range(self.world_size), key=lambda r: (load[r], r))
            self.owner[name] = rank
            load[rank] += sizes[name]

    def owns(self, name: str) -> bool:
        return self.owner.get(name, self.rank) == self.rank

    def broadcast_directions(self, directions: dict[str, Tensor | None], like: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every layer's direction on every rank: ``directions`` holds this rank's own (``None`` for the others),
        ``like`` a tensor of each layer's direction shape and dtype (its gradient matrix)."""
        handles, buffers = [], []
        for src in range(self.world_size):
            names = [n for n in like if self.owner[n] == src]
            if not names:
                continue
            if src == self.rank:
                flat = torch.cat([directions[n].reshape(-1).to(like[n].dtype) for n in names])  # type: ignore[union-attr]
            else:
                flat = torch.empty(
                    sum(like[n].numel() for n in names), dtype=like[names[0]].dtype, device=like[names[0]].device
                )
            buffers.append((names, flat))
            handles.append(self.comm.broadcast(flat, src, f"the directions of the layers owned by rank {src}"))
        for handle in handles:
            self.comm.wait(handle)
        out: dict[str, Tensor] = {}
        for names, flat in buffers:
            for name, piece in zip(names, flat.split([like[n].numel() for n in names])):
                out[name] = piece.reshape(like[name].shape)
        return out

    def gather_states(self, states: dict[str, Any]) -> dict[str, Any]:
        """Every layer's state from its owner (``states``: this rank's, owned layers only), on every rank."""
        every: list[Any] = [None] * self.world_size
        dist.all_gather_object(every, {n: s for n, s in states.items() if self.owns(n)}, group=self.comm.group)
        merged: dict[str, Any] = {}
        for part in every:
            merged.update(part)
        return merged
