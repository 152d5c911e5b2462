"""Run methods on tasks with the same seeds and budgets. :func:`run_one` trains once and records the learning
curve (on a CUDA device every step is synchronised before its clock stops); :func:`sweep` and :func:`run_method`
are the older grid sweep the studies under ``benchmarks/`` use, :mod:`kronfac.bench.protocol` the tuning protocol
of ``kronfac bench``. Step times exclude data indexing and evaluation."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kronfac.bench.data import Split
from kronfac.bench.methods import Method
from kronfac.bench.tasks import Task

__all__ = ["RunResult", "resolve_device", "run_method", "run_one", "schedule", "state_bytes", "sweep"]


@dataclass
class RunResult:
    task: str
    method: str
    lr: float
    seed: int
    steps: int
    split: str
    curve: list[dict[str, float]] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    state_bytes: int = 0
    diverged: bool = False
    error: str | None = None

    @property
    def final(self) -> dict[str, float]:
        return self.curve[-1] if self.curve else {"loss": math.inf, "accuracy": 0.0}

    def to_target(self, target: float, task: Task | None = None) -> tuple[int | None, float | None]:
        """(steps, training seconds) at the first evaluation that reaches ``target``: with a ``task``, the first
        whose validation metric reaches it (``val_`` keys, else the evaluated split's); else the first whose
        accuracy does."""
        for point in self.curve:
            if task is None:
                hit = point["accuracy"] >= target
            else:
                value = point.get(f"val_{task.metric}", point.get(task.metric))
                hit = value is not None and math.isfinite(value) and task.reached(value)
            if hit:
                return int(point["step"]), float(point["seconds"])
        return None, None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["median_ms"] = statistics.median(self.step_ms) if self.step_ms else None
        out["mean_ms"] = statistics.fmean(self.step_ms) if self.step_ms else None
        return out


def state_bytes(objects: Iterable[Any]) -> int:
    """Bytes of all distinct tensors reachable from ``objects`` through dicts, lists, tuples and plain objects'
    attributes (peers keep state in their own classes); modules are not entered (their weights are not state).
    """
    seen: set[tuple[int, int]] = set()
    visited: set[int] = set()
    total = 0

    def visit(obj: Any) -> None:
        nonlocal total
        if isinstance(obj, Tensor):
            key = (obj.untyped_storage().data_ptr(), obj.nbytes)
            if key not in seen:
                seen.add(key)
                total += obj.nbytes
            return
        if id(obj) in visited or isinstance(obj, (nn.Module, str, bytes, int, float, type)) or obj is None:
            return
        visited.add(id(obj))
        if isinstance(obj, dict):
            for v in obj.values():
                visit(v)
        elif isinstance(obj, (list, tuple, set)):
            for v in obj:
                visit(v)
        elif hasattr(obj, "__dict__"):
            for v in vars(obj).values():
                visit(v)

    for obj in objects:
        visit(obj)
    return total


def _eval_split(split: Split, which: str) -> tuple[Tensor, Tensor]:
    return (split.x_val, split.y_val) if which == "val" else (split.x_test, split.y_test)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when available, else the CPU; ``"cuda"`` without a GPU raises ``ValueError``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"Invalid device: {name!r} (must be cpu, cuda or auto)")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch sees no CUDA GPU (use --device cpu or auto)")
    return torch.device(name)


_ON_DEVICE: dict[tuple[str, str], Split] = {}


def _split_on(task: Task, device: torch.device) -> Split:
    split = task.load()
    if device.type == "cpu":
        return split
    key = (task.name, str(device))
    if key not in _ON_DEVICE:
        _ON_DEVICE[key] = Split(*(getattr(split, f).to(device) for f in split.__dataclass_fields__))
    return _ON_DEVICE[key]


def schedule(steps: int, warmup: float) -> Callable[[int], float]:
    """Linear warmup over ``warmup`` of the ``steps`` steps, then cosine decay to zero: the learning-rate factor of
    every method in the tuning protocol (AlgoPerf's baselines' schedule)."""
    warm = round(warmup * steps)

    def factor(step: int) -> float:  # step = number of optimizer steps taken so far
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warm, steps - warm) / max(1, steps - warm)))

    return factor


def run_one(
    task: Task,
    method: Method,
    lr: float,
    seed: int,
    steps: int,
    *,
    split_name: str = "test",
    on_step: Callable[[], None] | None = None,
    extra: dict[str, Any] | None = None,
    track_val: bool = False,
    device: torch.device | str = "cpu",
) -> RunResult:
    """Train ``task``'s model with ``method`` for ``steps`` steps and record its learning curve.

    Args:
        extra: further hyperparameters of the method (a point of its ``grid`` or a trial); ``warmup`` among them
            is not the method's: it puts every optimizer of the trainer on :func:`schedule`.
        split_name: the split evaluated into ``loss`` and ``accuracy`` (``"test"`` or ``"val"``).
        track_val: also record ``val_loss`` and ``val_accuracy`` at every evaluation (time to target).
        device: where the model, the data and the step run.
    """
    device = torch.device(device)
    split = _split_on(task, device)
    extra = dict(extra or {})
    warmup = extra.pop("warmup", None)
    torch.manual_seed(seed)
    model = task.build(split).to(device)
    trainer = method.make(model, lr, task, **extra)
    schedulers = []
    if warmup is not None:
        factor = schedule(steps, float(warmup))
        schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, factor) for opt in trainer.optimizers()]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    result = RunResult(task.name, method.name, lr, seed, steps, split_name)
    x_eval, y_eval = _eval_split(split, split_name)
    generator = torch.Generator().manual_seed(seed)
    n = len(split.x_train)
    order = torch.randperm(n, generator=generator)
    cursor, seconds = 0, 0.0
    try:
        for step in range(1, steps + 1):
            if cursor + task.batch_size > n:
                order, cursor = torch.randperm(n, generator=generator), 0
            idx = order[cursor : cursor + task.batch_size]
            cursor += task.batch_size
            x, y = split.x_train[idx.to(device)], split.y_train[idx.to(device)]
            sync()
            start = time.perf_counter()
            loss = trainer.step(x, y)
            for scheduler in schedulers:
                scheduler.step()
            sync()
            elapsed = time.perf_counter() - start
            seconds += elapsed
            result.step_ms.append(1e3 * elapsed)
            if on_step is not None:
                on_step()
            if not math.isfinite(loss):
                result.diverged = True
                result.curve.append({"step": step, "seconds": seconds, "loss": math.inf, "accuracy": 0.0})
                break
            if step % task.eval_every == 0 or step == steps:
                eval_loss, accuracy = task.evaluate(model, x_eval, y_eval)
                if not math.isfinite(eval_loss):
                    result.diverged = True
                point = {"step": step, "seconds": seconds, "train_loss": loss, "loss": eval_loss, "accuracy": accuracy}
                if track_val:
                    point["val_loss"], point["val_accuracy"] = task.evaluate(model, split.x_val, split.y_val)
                result.curve.append(point)
                if result.diverged:
                    break
    except (FloatingPointError, RuntimeError) as exc:  # non-finite values, or a peer's failed factorization
        result.diverged = True
        result.error = f"{type(exc).__name__}: {exc}"[:300]
        result.curve.append({"step": len(result.step_ms), "seconds": seconds, "loss": math.inf, "accuracy": 0.0})
    result.state_bytes = state_bytes(trainer.state_objects())
    trainer.close()
    return result


def sweep(
    task: Task,
    method: Method,
    steps: int,
    *,
    seeds: Iterable[int] = (0, 1),
    on_step: Callable[[], None] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Try every configuration of the method's sweep on the validation split with each of ``seeds``. The best one
    diverges on no seed and has the highest mean final validation accuracy (the metric the report compares), ties
    broken by the lower mean validation loss. Several seeds keep a configuration that is only lucky on one seed
    (e.g. small damping with stale curvature) from being chosen."""
    records = []
    for config in method.configurations():
        extra = {k: v for k, v in config.items() if k != "lr"}
        results = [
            run_one(task, method, config["lr"], seed, steps, split_name="val", on_step=on_step, extra=extra)
            for seed in seeds
        ]
        records.append(
            {
                **config,
                "val_loss": statistics.fmean(r.final["loss"] for r in results),
                "val_accuracy": statistics.fmean(r.final["accuracy"] for r in results),
                "diverged": any(r.diverged for r in results),
            }
        )
    best = min(records, key=lambda r: (r["diverged"], -r["val_accuracy"], r["val_loss"]))
    return {k: v for k, v in best.items() if k not in ("val_loss", "val_accuracy", "diverged")}, records


def run_method(
    task: Task,
    method: Method,
    *,
    steps: int,
    sweep_steps: int,
    seeds: Iterable[int],
    on_step: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Sweep, then run every seed at the chosen configuration; returns the JSON-ready record with a summary."""
    seeds = list(seeds)
    config, sweep_records = sweep(task, method, sweep_steps, seeds=seeds[:2], on_step=on_step)
    extra = {k: v for k, v in config.items() if k != "lr"}
    runs = [run_one(task, method, config["lr"], seed, steps, on_step=on_step, extra=extra) for seed in seeds]
    return {
        "method": method.name,
        "description": method.description,
        "lr_grid": list(method.lr_grid),
        "grid": list(method.grid),
        "sweep": sweep_records,
        "lr": config["lr"],
        "hyperparameters": extra,
        "runs": [r.to_dict() for r in runs],
        "summary": summarize(runs, task.target),
    }


def summarize(runs: list[RunResult], target: float) -> dict[str, Any]:
    accuracies = [r.final["accuracy"] for r in runs]
    losses = [r.final["loss"] for r in runs]
    reached = [r.to_target(target) for r in runs]
    steps_hit = [s for s, _ in reached if s is not None]
    secs_hit = [t for _, t in reached if t is not None]
    all_ms = [ms for r in runs for ms in r.step_ms]
    return {
        "accuracy_mean": statistics.fmean(accuracies),
        "accuracy_std": statistics.pstdev(accuracies) if len(accuracies) > 1 else 0.0,
        "loss_mean": statistics.fmean(losses),
        "reached_target": f"{len(steps_hit)}/{len(runs)}",
        "steps_to_target": statistics.median(steps_hit) if len(steps_hit) == len(runs) else None,
        "seconds_to_target": statistics.median(secs_hit) if len(secs_hit) == len(runs) else None,
        "median_ms": statistics.median(all_ms) if all_ms else None,
        "mean_ms": statistics.fmean(all_ms) if all_ms else None,
        "state_bytes": max(r.state_bytes for r in runs),
        "diverged": sum(r.diverged for r in runs),
    }
