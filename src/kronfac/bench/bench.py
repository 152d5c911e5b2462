"""``kronfac bench``: train the same models on the same bundled data with several methods, side by side, under
one tuning protocol (:mod:`kronfac.bench.protocol`).

Every argument is checked before any training (one-line messages, exit status 2); the results and their tables
are written after each task, so an interruption keeps what finished.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from kronfac.bench.methods import METHODS
from kronfac.bench.protocol import SUITES, Protocol, run_protocol
from kronfac.bench.report import terminal, write_reports
from kronfac.bench.runner import resolve_device
from kronfac.bench.tasks import TASKS

__all__ = ["CheckError", "add_parser", "check", "listing", "run", "work"]


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="compare optimizers side by side on bundled data",
        description="Tune every method on every task with the same number of quasi-random trials on a validation "
        "split, rerun the best setting on fresh seeds, and write results.json, results.md and PNG plots (after "
        "each task). `--list` shows the tasks, methods and suites.",
    )
    suites = "; ".join(f"{name}: {suite.description}" for name, suite in SUITES.items())
    parser.add_argument("--suite", default="default", metavar="SUITE", help=f"fixed set of tasks, methods and "
                        f"protocol (default 'default'). {suites}")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="the 'quick' suite: a smoke run under a minute")
    parser.add_argument("--list", action="store_true", help="list tasks, methods and suites with descriptions")
    parser.add_argument("--tasks", nargs="+", default=None, metavar="TASK", help="tasks (default: the suite's)")
    parser.add_argument("--methods", nargs="+", default=None, metavar="METHOD", help="methods (default: the suite's)")
    parser.add_argument("--trials", type=int, default=None, help="tuning trials per method (default: the suite's)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds at the chosen setting (default: the suite's)")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every task's step budget")
    parser.add_argument("--device", default="cpu", metavar="DEVICE", help="cpu, cuda or auto (cuda when there is "
                        "a GPU); on CUDA every timed step is synchronised (default cpu)")  # fmt: skip
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


def listing() -> str:
    """Tasks, methods and suites, one line each."""
    lines = ["tasks:"]
    width = max(map(len, [*TASKS, *METHODS, *SUITES]))
    for name, task in TASKS.items():
        lines.append(
            f"  {name:<{width}}  {task.description}; {task.steps} steps, target validation {task.metric} {task.target}"
        )
    lines.append("methods:")
    for name, method in METHODS.items():
        missing = "" if method.available() else " [not installed]"
        lines.append(f"  {name:<{width}}  {method.description}{missing}")
    lines.append("suites:")
    for name, suite in SUITES.items():
        lines.append(f"  {name:<{width}}  {suite.description}: {' '.join(suite.tasks)}")
    return "\n".join(lines)


class CheckError(ValueError):
    """A bad command-line argument, said in one line."""


def _check_out(out: Path) -> None:
    probe = out / ".kronfac-bench-write-test"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise CheckError(f"cannot write to --out {str(out)!r}: {exc.strerror or exc}") from None


def check(args: argparse.Namespace) -> dict[str, Any]:
    """Every argument checked (and the output folder created and test-written) before any training; returns the
    plan: ``tasks``, ``methods``, ``protocol``, ``device``. Raises :class:`CheckError` with a one-line message."""
    suite_name = "quick" if args.quick else args.suite
    if suite_name not in SUITES:
        raise CheckError(f"unknown suite {suite_name!r}; available: {', '.join(SUITES)}")
    suite = SUITES[suite_name]
    tasks = list(args.tasks or suite.tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise CheckError(f"unknown task(s) {', '.join(unknown)}; available: {', '.join(TASKS)}")
    methods = list(args.methods or suite.methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise CheckError(f"unknown method(s) {', '.join(unknown)}; available: {', '.join(METHODS)}")
    if args.methods:
        missing = [m for m in methods if not METHODS[m].available()]
        if missing:
            raise CheckError(f"method(s) {', '.join(missing)} need packages that are not installed (see --list)")
    else:  # a suite's peers run where their packages are installed
        skipped = [m for m in methods if not METHODS[m].available()]
        if skipped:
            print(f"kronfac bench: skipping {', '.join(skipped)} (packages not installed)", file=sys.stderr)
        methods = [m for m in methods if m not in skipped]
    for flag, value in (("--trials", args.trials), ("--seeds", args.seeds), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise CheckError(f"{flag} must be >= 1, got {value}")
    if not (math.isfinite(args.steps_scale) and args.steps_scale > 0):
        raise CheckError(f"--steps-scale must be a positive number, got {args.steps_scale}")
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        raise CheckError(str(exc)) from None
    base = suite.protocol
    protocol = Protocol(
        trials=args.trials or base.trials, seeds=args.seeds or base.seeds, trial_fraction=base.trial_fraction,
        quick=base.quick,
    )  # fmt: skip
    _check_out(args.out)
    scale = args.steps_scale * suite.steps_scale
    return {
        "suite": suite_name,
        "tasks": tasks,
        "methods": methods,
        "protocol": protocol,
        "device": device,
        "steps_scale": scale,
    }


def work(
    tasks: list[str], methods: list[str], protocol: Protocol, scale: float
) -> tuple[dict[str, tuple[int, int]], dict[tuple[str, str], int], int]:
    """(steps and trial steps per task, weight of one step per (task, method), total weight) of a run.

    The progress bar counts expected microseconds: a step weighs its task's AdamW step time times the method's
    relative cost, so a char-LM step counts 30x an MLP step and the bar's ETA holds."""
    steps_of = {name: protocol.steps(TASKS[name], scale) for name in tasks}
    weight = {(t, m): round(1e3 * TASKS[t].step_ms * METHODS[m].cost) for t in tasks for m in methods}
    total = sum(
        weight[t, m] * (protocol.trials * steps_of[t][1] + protocol.seeds * steps_of[t][0])
        for t in tasks
        for m in methods
    )
    return steps_of, weight, total


def run(args: argparse.Namespace) -> int:
    if args.list:
        print(listing())
        return 0
    try:
        plan = check(args)
    except CheckError as exc:
        print(f"kronfac bench: error: {exc}", file=sys.stderr)
        return 2
    from tqdm.auto import tqdm

    protocol: Protocol = plan["protocol"]
    methods: list[str] = plan["methods"]
    device: torch.device = plan["device"]
    if args.threads:
        torch.set_num_threads(args.threads)
    flush_denormal = not args.keep_denormals and torch.set_flush_denormal(True)
    results: dict[str, Any] = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "flush_denormal": flush_denormal,
            "suite": plan["suite"],
            "quick": protocol.quick,
            "steps_scale": plan["steps_scale"],
            "protocol": {"trials": protocol.trials, "seeds": protocol.seeds, "trial_fraction": protocol.trial_fraction},
            "seeds": list(range(1, protocol.seeds + 1)),
            "methods": methods,
        },
        "tasks": {},
    }
    steps_of, weight, total = work(plan["tasks"], methods, protocol, plan["steps_scale"])
    finished = 0
    try:
        with tqdm(total=total, desc="kronfac bench", dynamic_ncols=True,
                  bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}") as bar:  # fmt: skip
            for task_name in plan["tasks"]:
                task = TASKS[task_name]
                task.load()  # generate/load data outside the timed steps
                steps, trial_steps = steps_of[task_name]
                record: dict[str, Any] = {
                    "description": task.description,
                    "metric": task.metric,
                    "steps": steps,
                    "trial_steps": trial_steps,
                    "batch_size": task.batch_size,
                    "target": task.target,
                    "methods": {},
                }
                results["tasks"][task_name] = record
                for name in methods:
                    bar.set_postfix_str(f"{task_name} / {name}")
                    w = weight[task_name, name]
                    record["methods"][name] = run_protocol(
                        task, METHODS[name], protocol, steps=steps, trial_steps=trial_steps, device=device,
                        on_step=functools.partial(bar.update, w),
                    )  # fmt: skip
                finished += 1
                write_reports(results, args.out, plots=False)
                bar.write(terminal(task_name, record) + "\n")
    except KeyboardInterrupt:
        results["tasks"] = dict(list(results["tasks"].items())[:finished])
        results["meta"]["interrupted"] = True
        write_reports(results, args.out, plots=False)
        print(f"kronfac bench: interrupted; the {finished} finished task(s) are in {args.out}/", file=sys.stderr)
        return 130
    finally:
        if flush_denormal:
            torch.set_flush_denormal(False)
    written = write_reports(results, args.out, plots=not args.no_plots)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
