"""Collectives of distributed K-FAC: dedicated process groups, waits with a timeout, fused pipelined all-reduce.

Dynamic tensor fusion follows SPD-KFAC (Shi, Zhang and Li, ICDCS 2021): every layer's statistics get a fixed
segment of one flat buffer, the buffer is cut into buckets of at most ``bucket_bytes``, and a bucket's
all-reduce starts (non-blocking) as soon as every segment it covers has been written, i.e. while the backward
pass is still producing the statistics of earlier layers. Buckets launch strictly in buffer order, so every
rank issues the same sequence of collectives whatever order its layers complete in.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from time import perf_counter
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Communicator", "DistributedTimeoutError", "FusionPlan", "PipelinedAllReduce"]


class DistributedTimeoutError(RuntimeError):
    """A kronfac collective failed or timed out: another rank died, hung, or called ``step`` a different number
    of times."""


class Communicator:
    """kronfac's own process groups (same ranks as the default group) plus waits that raise after ``timeout``.

    Two groups: ``group`` (the configured backend) carries the curvature; ``control_group`` (gloo where
    available) carries small control messages, the agreement check, so that they never meet a curvature
    collective. Creating them waits for every rank to build its optimizer, at most ``timeout`` seconds.

    Within a step (between :meth:`begin_step` and :meth:`end_step`) the waits share one budget of ``timeout``
    seconds, so the step as a whole waits at most that long for the other ranks; outside a step each wait may
    take ``timeout``.

    Args:
        timeout: seconds before :class:`DistributedTimeoutError`.
        backend: backend of ``group``; ``None`` takes the default group's.
    """

    def __init__(self, *, timeout: float, backend: str | None = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "kronfac: distributed K-FAC needs an initialised process group: launch with torchrun and call "
                "torch.distributed.init_process_group() before building the optimizer"
            )
        self.timeout = timeout
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self._budget: float | None = None
        span, what = timedelta(seconds=timeout), "the other ranks to build their kronfac optimizer"
        self.group: Any = self._guard(lambda: dist.new_group(backend=backend, timeout=span), what)
        control = "gloo" if dist.is_gloo_available() else backend
        self.control_group: Any = self._guard(lambda: dist.new_group(backend=control, timeout=span), what)

    def begin_step(self) -> None:
        """Open a step: its waits share ``timeout`` seconds until :meth:`end_step`."""
        self._budget = self.timeout

    def end_step(self) -> None:
        self._budget = None

    def all_reduce(self, tensor: Tensor, what: str) -> tuple[Any, str]:
        """Start a sum all-reduce of ``tensor`` in place; returns a handle for :meth:`wait`."""
        return self._guard(lambda: dist.all_reduce(tensor, group=self.group, async_op=True), what), what

    def broadcast(self, tensor: Tensor, src: int, what: str) -> tuple[Any, str]:
        """Start a broadcast of ``tensor`` from global rank ``src``; returns a handle for :meth:`wait`."""
        return self._guard(lambda: dist.broadcast(tensor, src, group=self.group, async_op=True), what), what

    def all_gather(self, tensor: Tensor, what: str) -> list[Tensor]:
        """Blocking all-gather (with the timeout)."""
        return self._all_gather(tensor, what, self.group)[0]

    def all_gather_control(self, tensor: Tensor, what: str) -> tuple[list[Tensor], float]:
        """Blocking all-gather of a CPU tensor on the control group; returns the parts and the seconds waited."""
        return self._all_gather(tensor, what, self.control_group)

    def all_gather_object(self, obj: Any, what: str) -> list[Any]:
        """Every rank's ``obj`` (pickled, on the control group; bounded by the group's timeout)."""
        out: list[Any] = [None] * self.world_size
        self._guard(lambda: dist.all_gather_object(out, obj, group=self.control_group), what)
        return out

    def _all_gather(self, tensor: Tensor, what: str, group: Any) -> tuple[list[Tensor], float]:
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        handle = self._guard(lambda: dist.all_gather(out, tensor, group=group, async_op=True), what), what
        return out, self.wait(handle)

    def wait(self, handle: tuple[Any, str]) -> float:
        """Block until the collective is done (at most what is left of the step's budget, or ``timeout``
        outside a step); return the seconds spent waiting."""
        work, what = handle
        left = self.timeout if self._budget is None else self._budget
        if left <= 0:
            raise DistributedTimeoutError(self._message(what, "this step() has already waited its whole timeout"))
        start = perf_counter()
        try:
            self._guard(lambda: work.wait(timeout=timedelta(seconds=left)), what)
        finally:
            waited = perf_counter() - start
            if self._budget is not None:
                self._budget -= waited
        return waited

    def _message(self, what: str, cause: str) -> str:
        bound = f"timeout {self.timeout:g}s" + (" for all the waits of one step()" if self._budget is not None else "")
        return (
            f"kronfac: rank {self.rank} failed waiting for {what} ({bound}): another rank died, hung, or is "
            f"elsewhere in its program (every rank must build the optimizer and call step() for every batch). {cause}"
        )

    def _guard(self, call: Any, what: str) -> Any:
        try:
            return call()
        except RuntimeError as exc:  # gloo/NCCL timeouts and closed connections (DistBackendError included)
            raise DistributedTimeoutError(self._message(what, f"Backend error: {exc}")) from exc


class FusionPlan:
    """Segments of a flat buffer (one per named payload, in order) cut into buckets of ``bucket_elems``.

    A payload larger than a bucket spans several buckets, so every message respects the bound.

    Args:
        segments: ``(name, numel)`` in buffer order.
        bucket_elems: maximum elements per bucket (>= 1).
    """

    def __init__(self, segments: Sequence[tuple[str, int]], bucket_elems: int) -> None:
        if bucket_elems < 1:
            raise ValueError(f"Invalid bucket_elems: {bucket_elems} (must be >= 1)")
        self.order = [name for name, _ in segments]
        self.position = {name: i for i, name in enumerate(self.order)}
        self.offsets: list[int] = []
        total = 0
        for _, numel in segments:
            self.offsets.append(total)
            total += numel
        self.sizes = [numel for _, numel in segments]
        self.total = total
        self.buckets = [(start, min(start + bucket_elems, total)) for start in range(0, total, bucket_elems)]
        # First and last segment position each bucket overlaps (segments of size 0 never block a bucket).
        self.members: list[tuple[int, int]] = []
        seg = 0
        for start, end in self.buckets:
            while self.offsets[seg] + self.sizes[seg] <= start:
                seg += 1
            last = seg
            while last + 1 < len(self.offsets) and self.offsets[last + 1] < end:
                last += 1
            self.members.append((seg, last))

    def span(self, name: str) -> tuple[int, int]:
        """``(offset, numel)`` of a segment."""
        i = self.position[name]
        return self.offsets[i], self.sizes[i]


class PipelinedAllReduce:
    """One round of fused, non-blocking all-reduces over a :class:`FusionPlan` (see the module docstring)."""

    def __init__(self, plan: FusionPlan, comm: Communicator, *, dtype: torch.dtype, device: torch.device) -> None:
        self.plan, self.comm = plan, comm
        self.buffer = torch.zeros(plan.total, dtype=dtype, device=device)
        self.ready = [False] * len(plan.order)
        self.next_bucket = 0
        self.handles: list[tuple[Any, str]] = []

    def segment(self, name: str) -> Tensor:
        offset, numel = self.plan.span(name)
        return self.buffer[offset : offset + numel]

    def launched(self, name: str) -> bool:
        """Whether a bucket covering ``name`` has already been sent (its segment can no longer change)."""
        pos = self.plan.position[name]
        return any(first <= pos <= last for first, last in self.plan.members[: self.next_bucket])

    def mark_ready(self, name: str) -> None:
        self.ready[self.plan.position[name]] = True
        self._launch()

    def flush(self) -> None:
        """Send every remaining bucket (segments never written stay zero)."""
        self.ready = [True] * len(self.ready)
        self._launch()

    def wait(self) -> float:
        waited = sum(self.comm.wait(handle) for handle in self.handles)
        self.handles.clear()
        return waited

    def _launch(self) -> None:
        plan = self.plan
        while self.next_bucket < len(plan.buckets):
            first, last = plan.members[self.next_bucket]
            if not all(self.ready[first : last + 1]):
                return
            start, end = plan.buckets[self.next_bucket]
            self.handles.append(self.comm.all_reduce(self.buffer[start:end], f"K-FAC factor bucket {self.next_bucket}"))
            self.next_bucket += 1
