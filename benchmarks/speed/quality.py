"""Training quality of K-FAC's refresh and damping variants on the bench tasks (same seeds, same data order).

Each variant is ``kronfac.KFAC`` with the bench settings (``KFAC_BENCH_OPTIONS``) and the learning rate and damping
the committed bench sweep chose for the task (benchmarks/bench/results.json); only the inverse backend differs:

- ``exact``: ``EighConfig()``: a fresh eigendecomposition every refresh (the default until this study);
- ``warm``: ``EighConfig(refresh="warm")``: one QR step from the previous basis, a full ``eigh`` every 10th refresh
  or when the residual test fails;
- ``factored``: ``CholeskyConfig()``: factored damping with the π correction (two products per step, not four).

Reported per task: final test loss and accuracy, mean ± std over seeds, and the difference to ``exact`` against the
seed noise. Run: ``python benchmarks/speed/quality.py [--seeds 0 1 2] [--tasks ...]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any

import torch

import kronfac
from kronfac.bench import METHODS, TASKS
from kronfac.bench.runner import run_one

HERE = Path(__file__).parent
#: The learning rate and damping the committed bench sweep picked for K-FAC on each task.
CHOSEN = {
    "mlp-digits": (0.03, 1e-3),
    "mlp-mnist1d": (0.1, 1e-2),
    "cnn-digits": (0.3, 1e-2),
    "charlm": (0.1, 1e-3),
}
VARIANTS: dict[str, Any] = {
    "exact": lambda: kronfac.EighConfig(),
    "warm": lambda: kronfac.EighConfig(refresh="warm"),
    "factored": lambda: kronfac.CholeskyConfig(),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", default=list(CHOSEN))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    load_before = os.getloadavg()
    rows: dict[str, dict[str, Any]] = {}
    for task_name in args.tasks:
        task, (lr, damping) = TASKS[task_name], CHOSEN[task_name]
        rows[task_name] = {}
        for variant in args.variants:
            runs = []
            for seed in args.seeds:
                extra = {"damping": damping, "inverse": VARIANTS[variant]()}
                result = run_one(task, METHODS["kfac"], lr, seed, task.steps, extra=extra)
                final = result.final
                runs.append(
                    {
                        "seed": seed,
                        "loss": final["loss"],
                        "accuracy": final["accuracy"],
                        "diverged": result.diverged,
                        "mean_ms": statistics.fmean(result.step_ms),
                    }
                )
                print(task_name, variant, seed, runs[-1], flush=True)
            rows[task_name][variant] = {
                "runs": runs,
                "loss_mean": statistics.fmean(r["loss"] for r in runs),
                "loss_std": statistics.stdev(r["loss"] for r in runs) if len(runs) > 1 else 0.0,
                "accuracy_mean": statistics.fmean(r["accuracy"] for r in runs),
                "accuracy_std": statistics.stdev(r["accuracy"] for r in runs) if len(runs) > 1 else 0.0,
                "mean_ms": statistics.fmean(r["mean_ms"] for r in runs),
            }
    result = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared with other jobs",
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "torch": torch.__version__,
            "threads": 1,
            "seeds": args.seeds,
            "chosen_lr_damping": CHOSEN,
        },
        "tasks": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(result, indent=1))
    lines = [
        "# K-FAC refresh and damping variants: training quality on the bench tasks",
        "",
        f"Final test loss / accuracy, mean ± std over seeds {args.seeds}, full bench step budgets, lr and damping "
        f"of the committed bench sweep; {result['meta']['date']}, {result['meta']['machine']} (load averages "
        f"{load_before[0]:.1f} before, {result['meta']['load_average_after'][0]:.1f} after), "
        f"torch {torch.__version__}. "
        "Δ is the difference of means to `exact`, in units of the larger seed std.",
        "",
        "| task | variant | test loss | test accuracy | Δ accuracy / std | mean ms/step |",
        "|---|---|---|---|---|---|",
    ]
    for task_name, variants in rows.items():
        base = variants.get("exact")
        for variant, row in variants.items():
            delta = "—"
            if base is not None and variant != "exact":
                noise = max(row["accuracy_std"], base["accuracy_std"], 1e-12)
                delta = f"{(row['accuracy_mean'] - base['accuracy_mean']) / noise:+.1f}"
            lines.append(
                f"| {task_name} | {variant} | {row['loss_mean']:.3f} ± {row['loss_std']:.3f} "
                f"| {row['accuracy_mean']:.4f} ± {row['accuracy_std']:.4f} | {delta} | {row['mean_ms']:.2f} |"
            )
    (args.out / "quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
