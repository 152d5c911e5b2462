"""The ranks' agreement check: what must be equal on every rank is compared at construction and every
``DistributedConfig.check_every`` step() calls, and a difference raises :class:`RankMismatchError` on every rank.

Data-parallel replicas stay identical only if every rank runs the same optimizer: the same layers, periods,
options and hyperparameters (schedules resolved at the current step), at the same step. A per-rank damping
lets the replicas drift apart without any error, and a per-rank ``factor_every`` or ``inverse_every`` makes the
ranks issue different collectives. The optimizer hands its fields to :meth:`AgreementCheck.check` as a
``{name: value}`` dict; the check adds the sync's own fields (layers, distributed config, backward passes).

The check is cheap: each rank hashes its fields into 8 bytes and the ranks all-gather the hashes (one 8-byte
message per rank); only when they differ are the fields themselves gathered, to name every differing field
with its value on each rank. It travels on a control group of its own (gloo, same ranks), so that a check
always meets the other ranks' check of the same step() call, even when the ranks disagree on the collectives
in between.

The step count alone cannot show a skipped step() call: the collectives of every rank's ``k``-th step() call
meet, and every rank has the same step count then. What differs is how many backward passes the rank ran by
then, so the check also compares the count of backward passes that reached the tracked parameters.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from kronfac.distributed.communicator import Communicator

__all__ = ["BACKWARD_PASSES", "AgreementCheck", "BackwardCounter", "RankMismatchError", "canonical"]

#: Field of the check that counts backward passes (see :class:`BackwardCounter`).
BACKWARD_PASSES = "backward passes"
#: What a difference in these fields usually means.
HINTS = {
    BACKWARD_PASSES: "a rank ran a backward pass without calling step() after it",
    "step": "the ranks resumed from different checkpoints or called step() a different number of times",
}
#: Differing fields named in the message (all of them are in :attr:`RankMismatchError.fields`).
MAX_LISTED = 6
_ADDRESS = re.compile(r" (object )?at 0x[0-9a-fA-F]+")


class RankMismatchError(ValueError):
    """The ranks hold different values of something that must be equal on every rank (a layer, a period, an
    option, a hyperparameter, the step, the number of backward passes). Raised on every rank alike.

    Attributes:
        fields: each differing field with its value on each rank (as text, in rank order).
        where: ``"at construction"``, ``"at step N"`` or, where the steps differ, ``"at step() call N since
            construction"``.
    """

    def __init__(self, message: str, fields: dict[str, list[str]], where: str) -> None:
        super().__init__(message)
        self.fields, self.where = fields, where


def canonical(value: Any) -> str:
    """A value as text that is equal on two ranks exactly when the values are (tensors by their numbers, floats
    to the last bit, enums by value, memory addresses dropped)."""
    if isinstance(value, Tensor):
        value = value.detach().cpu().tolist()
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(canonical(v) for v in value) + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {canonical(v)}" for k, v in value.items()) + "}"
    return _ADDRESS.sub("", repr(value))


def _fingerprint(fields: Mapping[str, str]) -> int:
    text = "\n".join(f"{name}={value}" for name, value in fields.items())
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def _ranks(ranks: list[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    runs: list[list[int]] = []
    for rank in ranks:
        if runs and rank == runs[-1][-1] + 1:
            runs[-1].append(rank)
        else:
            runs.append([rank])
    return "ranks " + ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs)


def _per_rank(values: list[str]) -> str:
    """``rank 0: 0.01, rank 1: 0.02``; ranks that hold the same value share one entry."""
    holders: dict[str, list[int]] = {}
    for rank, value in enumerate(values):
        holders.setdefault(value, []).append(rank)
    return ", ".join(f"{_ranks(ranks)}: {value}" for value, ranks in holders.items())


def mismatch(every: Sequence[Mapping[str, str]], calls: int) -> RankMismatchError:
    """The error that names every field on which the ranks' fields (``every[rank]``) differ, found at step()
    call ``calls`` (0: at construction)."""
    steps = {fields.get("step") for fields in every}
    if calls == 0:
        where = "at construction"
    elif len(steps) == 1:
        where = f"at step {steps.pop()}"
    else:
        where = f"at step() call {calls} since construction"
    names = list(dict.fromkeys(name for fields in every for name in fields))
    differing = {}
    for name in names:
        values = [fields.get(name, "<absent>") for fields in every]
        if len(set(values)) > 1:
            differing[name] = values
    parts = []
    for name, values in list(differing.items())[:MAX_LISTED]:
        hint = f" ({HINTS[name]})" if name in HINTS else ""
        parts.append(f"{name}: {_per_rank(values)}{hint}")
    if len(differing) > MAX_LISTED:
        parts.append(f"and {len(differing) - MAX_LISTED} more fields")
    message = (
        f"kronfac: the ranks hold different models, hyperparameters or settings (found {where}; every rank must "
        "build the same optimizer on the same model and call step() for every batch): " + "; ".join(parts)
    )
    return RankMismatchError(message, differing, where)


class BackwardCounter:
    """Counts the backward passes that reach the tracked parameters (a ``post_accumulate_grad`` hook on the
    first parameter of each layer; the count is the largest, so a layer that some backward passes skip does
    not lower it). ``autograd.grad`` passes (sampled Fisher labels) accumulate no ``.grad`` and do not count.

    Args:
        params: one parameter per tracked layer.
    """

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        self.counts = [0] * len(params)
        self.handles = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(params)]

    def _hook(self, index: int) -> Any:
        def hook(param: Tensor) -> None:
            self.counts[index] += 1

        return hook

    @property
    def passes(self) -> int:
        return max(self.counts, default=0)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class AgreementCheck:
    """Compares ``fields`` over the ranks (see the module docstring).

    Args:
        comm: the communicator (its control group carries the check).
        static: fields fixed for the optimizer's life (layers, the distributed config), as text.
        every: check every this many step() calls (the first step() call checks too); 0: at construction only.
        counter: counts the backward passes compared at each check.
    """

    def __init__(self, comm: Communicator, static: Mapping[str, str], every: int, counter: BackwardCounter) -> None:
        self.comm, self.static, self.every, self.counter = comm, dict(static), every, counter

    def due(self, calls: int) -> bool:
        """Whether step() call number ``calls`` (1 for the first) checks."""
        return self.every > 0 and (calls - 1) % self.every == 0

    def check(self, fields: Mapping[str, Any], calls: int) -> float:
        """Raise :class:`RankMismatchError` on every rank unless every rank holds the same fields; returns the
        seconds spent waiting for the other ranks.

        Args:
            fields: the optimizer's ``{name: value}``.
            calls: step() calls since construction (0: at construction), the same on every rank.
        """
        where = "at construction" if calls == 0 else f"in step() call {calls}"
        mine = {name: canonical(value) for name, value in fields.items()}
        mine[BACKWARD_PASSES] = str(self.counter.passes)
        mine.update(self.static)
        digest = torch.tensor([_fingerprint(mine)], dtype=torch.int64)
        gathered, waited = self.comm.all_gather_control(digest, f"the agreement check {where}")
        if all(torch.equal(g, gathered[0]) for g in gathered):
            return waited
        every = self.comm.all_gather_object(mine, f"the fields of the failed agreement check {where}")
        raise mismatch(every, calls)
