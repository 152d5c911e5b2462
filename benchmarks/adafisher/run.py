"""AdaFisher vs Adam / AdamW vs K-FAC on the bench tasks (issue 4; Gomes et al., ICLR 2025 claim better accuracy
and faster convergence than Adam).

Every method gets the harness's learning-rate sweep on the validation split, then 3 seeded runs evaluated on the
test split (``kronfac.bench.runner.run_method``). Budgets are cut to fit ~8 minutes on 2 shared CPU cores (see
``BUDGETS``). The wall-clock cost per step is measured separately, interleaving the methods step by step on the
same batches, so that load changes on the shared machine hit every method alike.

Usage: ``python benchmarks/adafisher/run.py [--tasks ...] [--out DIR]``; writes ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kronfac.bench.methods import ADAFISHER_BENCH_OPTIONS, METHODS, Method, OptimizerTrainer, Trainer
from kronfac.bench.runner import run_method
from kronfac.bench.tasks import TASKS, Task

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from report import write_markdown  # noqa: E402

#: (steps of a seeded run, steps of each sweep run) per task: shorter than the harness's full budgets.
BUDGETS: dict[str, tuple[int, int]] = {
    "mlp-digits": (300, 300),
    "cnn-digits": (300, 300),
    "mlp-mnist1d": (800, 400),
    "charlm": (100, 100),
}
SEEDS = (0, 1, 2)
#: Compared by default; ``adafisherw`` (registered by the harness too) can be added with ``--methods``.
DEFAULT_METHODS = ("adam", "adamw", "adafisher", "kfac")
TIMING_STEPS = 40


class _GuardedTrainer(Trainer):
    """Reports a run whose gradients overflow as diverged: ``KronOptimizer.grads_finite`` raises
    ``StopIteration`` when the gradient norms overflow to inf while every entry is still finite."""

    def __init__(self, inner: Trainer) -> None:
        self.inner = inner

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        try:
            return self.inner.step(x, y)
        except StopIteration as exc:
            raise FloatingPointError("gradient norm overflow (diverged)") from exc

    def state_objects(self) -> list[Any]:
        return self.inner.state_objects()

    def close(self) -> None:
        self.inner.close()


def _guarded(method: Method) -> Method:
    def make(model: torch.nn.Module, lr: float, task: Task) -> Trainer:
        return _GuardedTrainer(method.make(model, lr, task))

    return Method(method.name, make, method.lr_grid, method.description)


def _adam(model: torch.nn.Module, lr: float, task: Task) -> Trainer:
    return OptimizerTrainer(model, torch.optim.Adam(model.parameters(), lr=lr), task)


def methods(names: list[str]) -> dict[str, Method]:
    """The harness's methods (AdaFisher(W), AdamW, K-FAC) plus Adam, with the grid of AdamW."""
    table = dict(METHODS)
    table.setdefault("adam", Method("adam", _adam, METHODS["adamw"].lr_grid, "Adam (torch), no weight decay"))
    return {name: _guarded(table[name]) for name in names}


def step_cost(task: Task, chosen: dict[str, float], table: dict[str, Method], seed: int = 0) -> dict[str, float]:
    """Median ms per training step, methods interleaved step by step on the same batches."""
    split = task.load()
    trainers: dict[str, Trainer] = {}
    for name in chosen:
        torch.manual_seed(seed)
        trainers[name] = table[name].make(task.build(split), chosen[name], task)
    times: dict[str, list[float]] = {name: [] for name in trainers}
    generator = torch.Generator().manual_seed(seed)
    for _ in range(TIMING_STEPS):
        idx = torch.randint(0, len(split.x_train), (task.batch_size,), generator=generator)
        x, y = split.x_train[idx], split.y_train[idx]
        for name, trainer in trainers.items():
            start = time.perf_counter()
            trainer.step(x, y)
            times[name].append(1e3 * (time.perf_counter() - start))
    for trainer in trainers.values():
        trainer.close()
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="*", default=list(BUDGETS))
    parser.add_argument("--methods", nargs="*", default=list(DEFAULT_METHODS))
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the machine is shared: one thread per run keeps timings comparable
    table = methods(args.methods)
    began = time.perf_counter()
    results: dict[str, Any] = {
        "settings": {
            "budgets": {t: BUDGETS[t] for t in args.tasks},
            "seeds": list(SEEDS),
            "torch_threads": 1,
            "timing_steps": TIMING_STEPS,
            "adafisher_options": ADAFISHER_BENCH_OPTIONS,
            "lr_grids": {name: list(m.lr_grid) for name, m in table.items()},
            "torch": torch.__version__,
        },
        "tasks": {},
    }
    for task_name in args.tasks:
        task = TASKS[task_name]
        steps, sweep_steps = BUDGETS[task_name]
        record: dict[str, Any] = {"description": task.description, "target": task.target, "methods": {}}
        for name, method in table.items():
            t0 = time.perf_counter()
            out = run_method(task, method, steps=steps, sweep_steps=sweep_steps, seeds=SEEDS)
            for run in out["runs"]:
                run.pop("step_ms", None)  # summarised as median/mean; per-step lists would bloat the JSON
            record["methods"][name] = out
            print(f"{task_name:12s} {name:11s} lr={out['lr']:<7g} acc={out['summary']['accuracy_mean']:.3f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)  # fmt: skip
        chosen = {name: record["methods"][name]["lr"] for name in table}
        record["step_ms_interleaved"] = step_cost(task, chosen, table)
        results["tasks"][task_name] = record
    results["settings"]["total_seconds"] = time.perf_counter() - began
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text(write_markdown(results))
    print(f"done in {results['settings']['total_seconds']:.0f}s -> {args.out}")


if __name__ == "__main__":
    main()
