"""K-FAC's inverse refresh off the critical path: ``KFAC(async_refresh=True)``.

On a refresh step the factors are copied and their inverses are built in a background thread (on a GPU, on a side
CUDA stream of that thread) while training goes on with the current inverses; the result is installed at the next
refresh step, before that step's preconditioning. So the inverses used in steps ``[k + I, k + 2I)`` (``I`` =
``inverse_every``) are those of the factors of step ``k``: **one refresh interval stale**, where the synchronous
refresh uses the factors of step ``k + I``. The first refresh (and any layer without an inverse yet) is built
synchronously, so the first steps precondition exactly as the synchronous run does.

The schedule is fixed by the step counter, never by how fast the thread finishes (the main thread waits for the
job at the next refresh step when it is not done), so a run is deterministic and resumes exactly:
``state_dict`` waits for a pending job and stores its inverses, ``load_state_dict`` restores them as pending.
With ``async_refresh=False`` (the default) none of this exists and the step is the synchronous one, bit for bit.

What it buys: the refresh's time leaves the step when a core (CPU) or the GPU has idle capacity beside the main
thread's work; on a CPU run with every core busy in the main thread it only moves the time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from kronfac.curvature.kfac_block import KFACBlock
from kronfac.linalg.base import (
    InverseConfig,
    InverseRequest,
    KroneckerInverse,
    build_inverses,
    inverse_from_state,
    inverse_to_state,
)
from kronfac.optim import checkpoint

__all__ = ["AsyncRefresher"]


@dataclass
class _Job:
    """A submitted refresh: the blocks it refreshes (by layer name) and its result."""

    names: list[str]
    future: Future[list[KroneckerInverse | None]]
    done: Any = None  # the CUDA event recorded after the job's kernels, or None on a CPU


class AsyncRefresher:
    """Builds K-FAC inverses in one background thread; :meth:`refresh` is called on every refresh step.

    Args:
        blocks: layer name -> K-FAC block, in model order.
    """

    def __init__(self, blocks: dict[str, KFACBlock]) -> None:
        self.blocks = blocks
        self.executor: ThreadPoolExecutor | None = None
        self.job: _Job | None = None
        self.pending: dict[str, KroneckerInverse | None] = {}  # restored from a checkpoint, not yet installed
        self.stream: Any = None

    # -- the step ----------------------------------------------------------------------------------------
    def refresh(self, dampings: dict[str, float]) -> None:
        """One refresh step: install the previous job's inverses, then submit this step's factors (the blocks
        that have factors but no inverse yet are built now, synchronously)."""
        self.install()
        now = [name for name in dampings if self._ready(name) and self.blocks[name].inverse is None]
        if now:
            KFACBlock.refresh_many([(self.blocks[name], dampings[name]) for name in now])
        later = [name for name in dampings if self._ready(name) and name not in now]
        if later:
            self._submit(later, dampings)

    def _ready(self, name: str) -> bool:
        block = self.blocks[name]
        return block.a_factor is not None and block.g_factor is not None

    def install(self) -> None:
        """Wait for the submitted job (if any) and give each block its new inverse."""
        results = self.pending
        if self.job is not None:
            job, self.job = self.job, None
            inverses = job.future.result()  # re-raises what the job raised
            if job.done is not None:
                current = torch.cuda.current_stream()
                current.wait_event(job.done)
                for inverse in inverses:
                    if inverse is not None:
                        for tensor in inverse.tensors().values():
                            tensor.record_stream(current)
            results = dict(zip(job.names, inverses))
        self.pending = {}
        for name, inverse in results.items():
            if inverse is not None:
                self.blocks[name].inverse = inverse

    def _submit(self, names: list[str], dampings: dict[str, float]) -> None:
        blocks = [self.blocks[name] for name in names]
        # Copies: the factors move on (EMA in place) while the job reads them.
        requests = [
            InverseRequest(b.a_factor.clone(), b.g_factor.clone(), dampings[n], b.inverse, n)  # type: ignore[union-attr]
            for n, b in zip(names, blocks)
        ]
        cuda = requests[0].g_factor.is_cuda
        ready = done = None
        if cuda:
            if self.stream is None:
                self.stream = torch.cuda.Stream(device=requests[0].g_factor.device)
            ready = torch.cuda.Event()
            ready.record()  # after the copies, on the main stream
            done = torch.cuda.Event()
            for r in requests:  # the side stream reads the copies: keep their memory until its kernels ran
                r.a_factor.record_stream(self.stream)
                r.g_factor.record_stream(self.stream)
        if self.executor is None:
            self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kronfac-refresh")
        configs = {id(b.inverse_config): b.inverse_config for b in blocks}
        work = _build(list(configs.values()), blocks, requests, self.stream, ready, done)
        self.job = _Job(names, self.executor.submit(work), done)

    # -- checkpoints -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The inverses not yet installed (the pending job's, waited for), by layer name."""
        if self.job is not None:
            job, self.job = self.job, None
            self.pending = {**self.pending, **dict(zip(job.names, job.future.result()))}
            if job.done is not None:
                job.done.synchronize()
        return {name: None if inv is None else inverse_to_state(inv) for name, inv in self.pending.items()}

    def load_state_dict(self, state: dict[str, Any], device: Callable[[str], torch.device]) -> None:
        if self.job is not None:  # a job of the run being replaced: its result no longer applies
            self.job.future.result()
            self.job = None
        self.pending = {
            name: None if entry is None else inverse_from_state(checkpoint.to_device(entry, device(name)))
            for name, entry in state.items()
        }

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True)
            self.executor = None


def _build(
    configs: list[InverseConfig],
    blocks: list[KFACBlock],
    requests: list[InverseRequest],
    stream: Any,
    ready: Any,
    done: Any,
) -> Callable[[], list[KroneckerInverse | None]]:
    """The job: each config's requests through ``build_inverses`` (batched where the backend can), in order."""

    def run() -> list[KroneckerInverse | None]:
        context = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with context:
            if ready is not None:
                stream.wait_event(ready)
            out: list[KroneckerInverse | None] = [None] * len(requests)
            for config in configs:
                members = [i for i, b in enumerate(blocks) if b.inverse_config is config]
                built = build_inverses(config, [requests[i] for i in members])
                for i, inverse in zip(members, built):
                    out[i] = inverse
            if done is not None:
                done.record(stream)
        return out

    return run
