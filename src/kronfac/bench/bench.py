"""``kronfac bench``: train the same models on the same bundled data with several methods, side by side."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from pathlib import Path
from typing import Any

import torch

from kronfac.bench.methods import METHODS
from kronfac.bench.report import write_reports
from kronfac.bench.runner import run_method
from kronfac.bench.tasks import TASKS

__all__ = ["add_parser", "run"]

DEFAULT_METHODS = ("sgd", "adamw", "kfac")


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="compare optimizers side by side on bundled data",
        description="Train every task with every method (same seeds and budgets), sweep learning rates on a "
        "validation split, and write results.json, results.md and PNG plots.",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run (tiny budgets, one seed): under a minute")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS), metavar="TASK",
                        help=f"tasks to run (default: all of {', '.join(TASKS)})")  # fmt: skip
    available = ", ".join(METHODS)
    parser.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                        help=f"methods (default: {' '.join(DEFAULT_METHODS)}; available: {available})")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=2, help="seeds per method after the sweep (default 2)")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every task's step budget")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: timings do not depend on the OS scheduler, and flushing subnormals, which "
        "only reaches the calling thread, covers all the work)",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument(
        "--keep-denormals",
        action="store_true",
        help="do not flush subnormal floats to zero (by default the run sets torch.set_flush_denormal(True) for "
        "every method: once a model fits its training set, subnormal gradients make CPU matmuls ~100x slower)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    methods = list(args.methods or DEFAULT_METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"kronfac bench: unknown method(s) {unknown}; available: {', '.join(METHODS)}")
    unavailable = [m for m in methods if not METHODS[m].available()]
    if unavailable:
        raise SystemExit(f"kronfac bench: method(s) {unavailable} need packages that are not installed")
    if args.threads:
        torch.set_num_threads(args.threads)
    flush_denormal = not args.keep_denormals and torch.set_flush_denormal(True)
    seeds = list(range(1 if args.quick else args.seeds))
    results: dict[str, Any] = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "flush_denormal": flush_denormal,
            "quick": args.quick,
            "seeds": seeds,
            "methods": methods,
        },
        "tasks": {},
    }
    plan = []
    for name in args.tasks:
        task = TASKS[name]
        steps = task.quick_steps if args.quick else max(1, int(task.steps * args.steps_scale))
        sweep_steps = steps if args.quick else max(1, steps // 2)
        plan.append((task, steps, sweep_steps))
    total = sum(
        (len(METHODS[m].configurations()) * sweep_steps * min(len(seeds), 2) + len(seeds) * steps)
        for _, steps, sweep_steps in plan
        for m in methods
    )
    with tqdm(total=total, unit="step", desc="kronfac bench", dynamic_ncols=True) as bar:
        for task, steps, sweep_steps in plan:
            task.load()  # generate/load data outside the timed steps
            record: dict[str, Any] = {
                "description": task.description,
                "steps": steps,
                "batch_size": task.batch_size,
                "target": task.target,
                "methods": {},
            }
            for name in methods:
                bar.set_postfix_str(f"{task.name} / {name}")
                record["methods"][name] = run_method(
                    task, METHODS[name], steps=steps, sweep_steps=sweep_steps, seeds=seeds, on_step=bar.update
                )
            results["tasks"][task.name] = record
    written = write_reports(results, args.out, plots=not args.no_plots)
    print((args.out / "results.md").read_text())
    print("wrote " + ", ".join(str(p) for p in written))
    if flush_denormal:
        torch.set_flush_denormal(False)
    return 0
