"""Thermodynamic K-FAC on the bench's character-level transformer (Donatella et al. 2025, "Scalable
Thermodynamic Second-order Optimization"): AdamW vs K-FAC (factored damping, exact) vs thermodynamic K-FAC
(method 1) at 4, 8 and 16 bits, 3 seeds. Smaller than training_study.py (fewer steps and settings) because a
transformer step is already slow on a 2-core CPU; the Embedding layer's diagonal factor is inverted digitally.

Run: ``.venv/bin/python benchmarks/thermodynamic/transformer_study.py`` (about 7 minutes on 2 CPU cores).
Writes transformer_results.json and results_transformer.md (folded into results.md).
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import torch
from common import HERE, write_results
from training_study import SEEDS, TRAIN_EVAL, _fraction, _runs, _summary, _survival, factored_kfac, thermo_method

from kronfac.bench.methods import KFAC_BENCH_OPTIONS, METHODS, Method
from kronfac.bench.runner import sweep
from kronfac.bench.tasks import get_task

TASK = "charlm"
STEPS = 100
BITS = (4, 8, 16)
SAMPLES = 64


def main() -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    task = get_task(TASK)
    adam_lr, adam_sweep = sweep(task, METHODS["adamw"], STEPS)
    kfac_lr, kfac_sweep = sweep(task, factored_kfac(), STEPS)
    variants: dict[str, tuple[Method, float]] = {
        "adamw": (METHODS["adamw"], adam_lr),
        "kfac (factored)": (factored_kfac(), kfac_lr),
    }
    for bits in BITS:
        variants[f"bits={bits}"] = (thermo_method(bits, SAMPLES), kfac_lr)
    record: dict[str, Any] = {
        "task": TASK,
        "steps": STEPS,
        "lr": {"adamw": adam_lr, "kfac (factored)": kfac_lr},
        "sweep": {"adamw": adam_sweep, "kfac (factored)": kfac_sweep},
        "variants": {},
    }
    for label, (method, lr) in variants.items():
        runs = _runs(task, method, lr, STEPS)
        record["variants"][label] = {"method": method.name, "runs": runs, "summary": _summary(runs)}
        print(label, record["variants"][label]["summary"], flush=True)
    adam, kfac = record["variants"]["adamw"]["summary"], record["variants"]["kfac (factored)"]["summary"]
    for variant in record["variants"].values():
        s = variant["summary"]
        s["survival_accuracy"] = _survival(s["accuracy_mean"], adam["accuracy_mean"], kfac["accuracy_mean"])
        s["survival_train_loss"] = _survival(
            -math.log(s["train_loss_geomean"]),
            -math.log(adam["train_loss_geomean"]),
            -math.log(kfac["train_loss_geomean"]),
        )
    elapsed = time.perf_counter() - start
    record["elapsed_s"] = elapsed
    (HERE / "transformer_results.json").write_text(json.dumps(record, indent=1))
    lines = [
        f"## Transformer ({TASK}: {task.description})",
        "",
        f"{STEPS} steps, seeds {', '.join(map(str, SEEDS))}, K-FAC settings `{KFAC_BENCH_OPTIONS}` plus"
        f" {task.curvature_options}; learning rates from the harness's validation sweep at {STEPS} steps (AdamW"
        f" {adam_lr:g}, K-FAC factored {kfac_lr:g}, reused by thermodynamic K-FAC); thermodynamic K-FAC: method 1,"
        f" {SAMPLES} samples x 16 chains per inverse. Training loss on the first {TRAIN_EVAL} training sequences;"
        " accuracy = next-character accuracy on the test split. Survival as defined above.",
        "",
        "| method | train loss | survival (train loss) | test accuracy | survival (accuracy) | median ms/step |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, variant in record["variants"].items():
        s = variant["summary"]
        lines.append(
            f"| {label} | {s['train_loss_geomean']:.4g} | {_fraction(s['survival_train_loss'])}"
            f" | {s['accuracy_mean']:.4f} ± {s['accuracy_std']:.4f} | {_fraction(s['survival_accuracy'])}"
            f" | {s['median_ms']:.1f} |"
        )
    lines += [
        "",
        f"Milliseconds are simulation wall-clock on a shared 2-core CPU. Whole study: {elapsed / 60:.1f} min.",
    ]
    print(write_results("results_transformer.md", "\n".join(lines)))


if __name__ == "__main__":
    main()
