"""The tuning protocol of ``kronfac bench`` and its suites.

Per task and method (the external-tuning protocol of AlgoPerf, Dahl et al. 2023, and of the LLM-optimizer
benchmarks, e.g. Semenov et al. 2025):

1. ``trials`` settings, the same number for every method: its recommended setting, then quasi-random points of
   its search space (learning rate, damping or ε, weight decay, warmup; :meth:`Method.trials`). Each trial trains
   on seed 0 for ``trial_fraction`` of the task's steps and is scored on the validation split.
2. The best trial (no divergence, best final validation metric) is rerun on ``seeds`` fresh seeds (1, 2, ...:
   never the seed it was selected on, so the reported numbers carry no selection luck) with the full budget.
3. Reported: the final test metric (mean ± sample std over seeds), steps and seconds until the validation metric
   reaches the task's target (median over seeds, only when every seed reaches it), median and mean ms/step (the
   mean includes the curvature refreshes), optimizer-state bytes.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kronfac.bench.methods import Method
from kronfac.bench.runner import RunResult, run_one
from kronfac.bench.tasks import Task

__all__ = ["SUITES", "Protocol", "Suite", "run_protocol", "summarize"]


@dataclass(frozen=True)
class Protocol:
    """How much tuning every method gets: ``trials`` settings of ``trial_fraction`` of the steps, then ``seeds``."""

    trials: int
    seeds: int
    trial_fraction: float = 1.0
    quick: bool = False

    def __post_init__(self) -> None:
        if self.trials < 1 or self.seeds < 1 or not 0.0 < self.trial_fraction <= 1.0:
            raise ValueError(f"Invalid protocol: {self} (trials >= 1, seeds >= 1, 0 < trial_fraction <= 1)")

    def steps(self, task: Task, scale: float = 1.0) -> tuple[int, int]:
        """(steps of a seeded run, steps of a trial) for ``task``."""
        steps = max(1, round((task.quick_steps if self.quick else task.steps) * scale))
        return steps, max(1, round(steps * self.trial_fraction))


@dataclass(frozen=True)
class Suite:
    """A fixed set of tasks and methods run under one protocol."""

    description: str
    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    protocol: Protocol
    #: multiplies every task's steps (before ``--steps-scale``): the default suite's budget fits ~7 minutes (measured)
    steps_scale: float = 1.0


#: Methods of every suite: our K-FAC against the optimizers practitioners pick (and SGD as the floor).
CORE_METHODS = ("sgd", "adamw", "kfac", "muon", "soap", "shampoo", "psgd-kron")
SUITES: dict[str, Suite] = {
    "quick": Suite(
        "smoke run: tiny budgets, the recommended setting only, 1 seed (under a minute)",
        ("cnn-digits", "lstm-mnist1d", "charlm"),
        CORE_METHODS,
        Protocol(trials=1, seeds=1, quick=True),
    ),
    "default": Suite(
        "`make bench`: three small tasks at 0.6 of their steps, 4 trials at half budget, 2 seeds (about 7 "
        "minutes on 2 quiet cores)",
        ("mlp-mnist1d", "cnn-digits", "cnn-mnist1d"),
        CORE_METHODS,
        Protocol(trials=4, seeds=2, trial_fraction=0.5),
        steps_scale=0.6,
    ),
    "full": Suite(
        "every task, the core methods plus the kronfac variants and library peers: 8 trials, 3 seeds",
        ("mlp-digits", "mlp-mnist1d", "cnn-digits", "cnn-mnist1d", "lstm-mnist1d", "charlm"),
        (*CORE_METHODS, "adafisherw", "ikfac", "singd-ikfac", "asdl-kfac"),
        Protocol(trials=8, seeds=3, trial_fraction=0.5),
    ),
}


def _score(task: Task, result: RunResult) -> float:
    """A trial's final validation metric as a number to minimise (diverged: +inf)."""
    value = result.final[task.metric]
    if result.diverged or not math.isfinite(value):
        return math.inf
    return -value if task.larger_is_better else value


def run_protocol(
    task: Task,
    method: Method,
    protocol: Protocol,
    *,
    steps: int,
    trial_steps: int,
    device: torch.device | str = "cpu",
    on_step: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Tune ``method`` on ``task`` with ``protocol`` and run the seeds; the JSON-ready record with a summary."""
    settings = method.trials(protocol.trials)
    trial_records, scores = [], []
    for setting in settings:
        extra = {k: v for k, v in setting.items() if k != "lr"}
        result = run_one(
            task, method, setting["lr"], 0, trial_steps, split_name="val", on_step=on_step, extra=extra, device=device
        )
        scores.append(_score(task, result))
        trial_records.append(
            {**setting, "val_loss": result.final["loss"], "val_accuracy": result.final["accuracy"],
             "diverged": result.diverged}
        )  # fmt: skip
    best = settings[min(range(len(settings)), key=lambda i: scores[i])]
    extra = {k: v for k, v in best.items() if k != "lr"}
    runs = [
        run_one(task, method, best["lr"], seed, steps, on_step=on_step, extra=extra, track_val=True, device=device)
        for seed in range(1, protocol.seeds + 1)
    ]
    return {
        "method": method.name,
        "description": method.description,
        "family": method.family,
        "space": {k: [r.low, r.high, "log" if r.log else "linear"] for k, r in method.search_space().items()},
        "trials": trial_records,
        "lr": best["lr"],
        "hyperparameters": extra,
        "runs": [r.to_dict() for r in runs],
        "summary": summarize(runs, task),
    }


def _std(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.stdev(finite) if len(finite) > 1 else 0.0


def summarize(runs: list[RunResult], task: Task) -> dict[str, Any]:
    """Final test metric (mean ± sample std), time to the validation target, step times, state bytes."""
    metric = [r.final[task.metric] for r in runs]
    accuracies = [r.final["accuracy"] for r in runs]
    losses = [r.final["loss"] for r in runs]
    reached = [r.to_target(task.target, task) for r in runs]
    steps_hit = [s for s, _ in reached if s is not None]
    secs_hit = [t for _, t in reached if t is not None]
    all_ms = [ms for r in runs for ms in r.step_ms]
    return {
        "metric": task.metric,
        "metric_mean": statistics.fmean(metric),
        "metric_std": _std(metric),
        "accuracy_mean": statistics.fmean(accuracies),
        "accuracy_std": _std(accuracies),
        "loss_mean": statistics.fmean(losses),
        "loss_std": _std(losses),
        "seeds": len(runs),
        "reached_target": f"{len(steps_hit)}/{len(runs)}",
        "steps_to_target": statistics.median(steps_hit) if len(steps_hit) == len(runs) else None,
        "seconds_to_target": statistics.median(secs_hit) if len(secs_hit) == len(runs) else None,
        "median_ms": statistics.median(all_ms) if all_ms else None,
        "mean_ms": statistics.fmean(all_ms) if all_ms else None,
        "state_bytes": max(r.state_bytes for r in runs),
        "diverged": sum(r.diverged for r in runs),
    }
