"""Fault scenarios of distributed kronfac on 2 gloo ranks: what each rank raises, and how long it took.

Used by ``test_distributed_faults.py`` (which asserts on the records) and by
``benchmarks/reliability/distributed_faults.py`` (which writes them as the table of
``docs/reliability_distributed.md``). Every scenario returns, per rank, a record: the class of the error the rank
raised (``None``: none), its message, the iteration at which it was raised and the seconds the raising call
(the constructor, or the iteration's forward, backward and step) took.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from time import perf_counter
from typing import Any

import dist_workers as workers
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import kronfac
from kronfac.distributed import DistributedTimeoutError, RankMismatchError

#: Timeout of the mismatch scenarios: an error that came from a timeout instead of the check would take this long.
MISMATCH_TIMEOUT = 20.0
#: Timeout of the dead / hung rank scenarios.
FAULT_TIMEOUT = 1.5
ITERATIONS = 6


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def _batch(rank: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * rank + i)
    return torch.randn(4, 4, generator=gen), torch.randint(0, 2, (4,), generator=gen)


def _record(exc: BaseException | None, start: float, iteration: int | None) -> dict[str, Any]:
    return {
        "error": type(exc).__name__ if exc is not None else None,
        "message": str(exc) if exc is not None else "",
        "fields": getattr(exc, "fields", None),
        "iteration": iteration,
        "seconds": perf_counter() - start,
    }


def _build(model: nn.Module, timeout: float, **kwargs: Any) -> kronfac.KFAC:
    check_every = kwargs.pop("check_every", 2)
    config = kronfac.DistributedConfig(timeout=timeout, check_every=check_every)
    return kronfac.KFAC(model, inverse_every=kwargs.pop("inverse_every", 2), distributed=config, **kwargs)


def _train(
    rank: int,
    build: Callable[[nn.Module], kronfac.KFAC],
    *,
    skip: int | None = None,
    ddp: bool = False,
    before: Callable[[nn.Module, kronfac.KFAC], None] | None = None,
) -> dict[str, Any]:
    """Build the optimizer and train ``ITERATIONS`` batches; rank 1 does not call step() in iteration ``skip``.
    Returns the record of the first error (construction is iteration ``None``)."""
    model = _model()
    start = perf_counter()
    try:
        opt = build(model)
    except (RankMismatchError, DistributedTimeoutError) as exc:
        return _record(exc, start, None)
    if before is not None:
        before(model, opt)
    run: nn.Module = DistributedDataParallel(model) if ddp else model
    for i in range(ITERATIONS):
        x, y = _batch(rank, i)
        start = perf_counter()
        try:
            nn.functional.cross_entropy(run(x), y).backward()
            if not (rank == 1 and i == skip):
                opt.step()
            opt.zero_grad()
        except (RankMismatchError, RuntimeError) as exc:  # DistributedTimeoutError and DDP's errors are RuntimeErrors
            return _record(exc, start, i)
    opt.close()
    return _record(None, start, None)


def _resume_at(steps: int) -> Callable[[nn.Module, kronfac.KFAC], None]:
    """Load a checkpoint of a per-rank optimizer trained for ``steps`` steps (a rank resuming from another file)."""

    def load(model: nn.Module, opt: kronfac.KFAC) -> None:
        other = _model()
        local = kronfac.KFAC(other, inverse_every=2, distributed=False)
        for i in range(steps):
            x, y = _batch(0, i)
            nn.functional.cross_entropy(other(x), y).backward()
            local.step()
            local.zero_grad()
        local.close()
        opt.load_state_dict(local.state_dict())

    return load


def _damping_schedule(rank: int) -> Callable[[int], float]:
    return lambda step: 1e-2 if step < 3 or rank == 0 else 2e-2


#: name -> (what the scenario does, rank -> the run). Every one of these must raise RankMismatchError on every rank.
MISMATCHES: dict[str, tuple[str, Callable[[int], dict[str, Any]]]] = {
    "damping differs": (
        "rank 0 `damping=1e-2`, rank 1 `2e-2`",
        lambda rank: _train(rank, lambda m: _build(m, MISMATCH_TIMEOUT, damping=1e-2 * (1 + rank))),
    ),
    "damping schedule diverges": (
        "`damping` a schedule; rank 1's turns to `2e-2` at step 3 (checks at steps 0, 2, 4: `check_every=2`)",
        lambda rank: _train(rank, lambda m: _build(m, MISMATCH_TIMEOUT, damping=_damping_schedule(rank))),
    ),
    "factor_every differs": (
        "rank 0 `factor_every=1`, rank 1 `2`",
        lambda rank: _train(rank, lambda m: _build(m, MISMATCH_TIMEOUT, factor_every=1 + rank)),
    ),
    "inverse_every differs": (
        "rank 0 `inverse_every=2`, rank 1 `3`",
        lambda rank: _train(rank, lambda m: _build(m, MISMATCH_TIMEOUT, inverse_every=2 + rank)),
    ),
    "a rank skips a step() call": (
        "no DDP: rank 1 runs forward and backward of batch 1 but not `step()` (`check_every=2`)",
        lambda rank: _train(rank, lambda m: _build(m, MISMATCH_TIMEOUT), skip=1),
    ),
    "a rank resumes another checkpoint": (
        "rank 0 loads a state saved at step 4, rank 1 one saved at step 2",
        lambda rank: _train(rank, lambda m: _build(m, MISMATCH_TIMEOUT), before=_resume_at(4 - 2 * rank)),
    ),
}


def mismatch_worker(rank: int, world: int, names: list[str]) -> dict[str, dict[str, Any]]:
    """Run the named :data:`MISMATCHES` one after the other (each builds its own optimizer and groups)."""
    return {name: MISMATCHES[name][1](rank) for name in names}


def ddp_skip_worker(rank: int, world: int, timeout: float) -> dict[str, Any]:
    """Under DDP rank 1 skips step() in iteration 1: rank 0 waits in step() for rank 1's collectives, rank 1
    waits in DDP's all-reduce of the next batch for rank 0; kronfac's timeout ends it."""
    return _train(rank, lambda m: _build(m, timeout, inverse_every=1), skip=1, ddp=True)


ddp_skip_worker.hard_exit = True  # type: ignore[attr-defined]


def fault_worker(rank: int, world: int, timeout: float, mode: str, when: str) -> dict[str, Any]:
    """Rank 1 hangs (``mode="hang"``) or dies (``"die"``) before building the optimizer (``when="build"``) or at
    the second step (``"step"``); rank 0 must fail with a clear error within the timeout."""
    model = _model()
    start = perf_counter()
    if rank == 1 and when == "build":
        return _fault(mode, timeout)
    try:
        opt = kronfac.KFAC(model, distributed=kronfac.DistributedConfig(timeout=timeout), inverse_every=1)
    except DistributedTimeoutError as exc:
        return _record(exc, start, None)
    x, y = _batch(0, 0)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    if rank == 1:
        return _fault(mode, timeout)
    start = perf_counter()
    try:
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    except DistributedTimeoutError as exc:
        return _record(exc, start, 1)
    return _record(None, start, 1)


fault_worker.hard_exit = True  # type: ignore[attr-defined]


def _fault(mode: str, timeout: float) -> dict[str, Any]:
    if mode == "die":
        torch.save({"died": True}, Path(os.environ["KRONFAC_TEST_OUT"]) / "rank1.pt")
        os._exit(0)
    time.sleep(timeout + 2.5)
    return {"hung": True}


#: name -> (what the scenario does, launch arguments).
FAULTS: dict[str, tuple[str, tuple[Any, ...]]] = {
    "a rank skips a step() call under DDP": (
        "DDP: rank 1 runs forward and backward of batch 1 but not `step()`",
        (ddp_skip_worker, FAULT_TIMEOUT),
    ),
    "a rank hangs in step()": (
        "rank 1 sleeps instead of its second `step()`",
        (fault_worker, FAULT_TIMEOUT, "hang", "step"),
    ),
    "a rank dies in step()": (
        "rank 1 exits instead of its second `step()`",
        (fault_worker, FAULT_TIMEOUT, "die", "step"),
    ),
    "a rank hangs before building": (
        "rank 1 sleeps instead of building its optimizer",
        (fault_worker, FAULT_TIMEOUT, "hang", "build"),
    ),
    "a rank dies before building": (
        "rank 1 exits instead of building its optimizer",
        (fault_worker, FAULT_TIMEOUT, "die", "build"),
    ),
}


def run_mismatches(names: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Every named mismatch scenario (default: all) in one launch: ``{name: [record of rank 0, of rank 1]}``."""
    names = list(MISMATCHES) if names is None else names
    results = workers.launch(mismatch_worker, 2, names)
    return {name: [results[rank][name] for rank in range(2)] for name in names}


def run_fault(name: str) -> list[dict[str, Any]]:
    """One launch of the named :data:`FAULTS` scenario: the record of each rank."""
    worker, *args = FAULTS[name][1]
    return workers.launch(worker, 2, *args)


def check_cost_worker(rank: int, world: int, repeats: int) -> float:
    """Median seconds of one agreement check (hash the fields, all-gather the hashes) on ``world`` gloo ranks."""
    model = _model()
    opt = kronfac.KFAC(model, distributed=kronfac.DistributedConfig())
    assert opt.sync is not None
    times = []
    for _ in range(repeats):
        start = perf_counter()
        opt.sync.check_agreement(opt.agreement_fields())
        times.append(perf_counter() - start)
    opt.close()
    return statistics.median(times)
