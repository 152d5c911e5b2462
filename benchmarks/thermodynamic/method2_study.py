"""Thermodynamic K-FAC method 2 (device linear solves every step) next to method 1 (device inverses) on
mlp-digits, 8-bit input/output, 3 seeds (Donatella et al. 2025, "Scalable Thermodynamic Second-order
Optimization"). Separate from training_study.py because simulating a solve for every column of every gradient
on every step is slow on a CPU (the device itself would run them in microseconds: see the cost model).

Run after training_study.py (it reuses that study's learning rates): ``.venv/bin/python
benchmarks/thermodynamic/method2_study.py`` (about 3 minutes on 2 CPU cores). Writes method2_results.json and
results_method2.md (folded into results.md).
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import torch
from common import HERE, write_results
from training_study import CHAINS, SEEDS, STEPS, _fraction, _runs, _summary, _survival, factored_kfac, thermo_method

from kronfac.bench.methods import METHODS
from kronfac.bench.tasks import get_task

TASK = "mlp-digits"
BITS = 8
SAMPLES = 16


def main() -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    lrs = json.loads((HERE / "training_results.json").read_text())["tasks"][TASK]["lr"]
    task, steps = get_task(TASK), STEPS[TASK]
    variants = {
        "adamw": (METHODS["adamw"], lrs["adamw"]),
        "kfac (factored)": (factored_kfac(), lrs["kfac (factored)"]),
        f"method 1, bits={BITS}, n={SAMPLES}": (thermo_method(BITS, SAMPLES, method=1), lrs["kfac (factored)"]),
        f"method 2, bits={BITS}, n={SAMPLES}": (thermo_method(BITS, SAMPLES, method=2), lrs["kfac (factored)"]),
    }
    record: dict[str, Any] = {"task": TASK, "steps": steps, "lr": lrs, "variants": {}}
    for label, (method, lr) in variants.items():
        runs = _runs(task, method, lr, steps)
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
    (HERE / "method2_results.json").write_text(json.dumps(record, indent=1))
    lines = [
        f"## Method 2 (device solves every step) vs method 1 on {TASK}",
        "",
        f"{steps} steps, seeds {', '.join(map(str, SEEDS))}, {BITS}-bit input and output, {SAMPLES} samples per"
        f" read-out (method 1: x {CHAINS} chains for the covariance; method 2: one chain per right-hand side,"
        f" β = 1e3), learning rates of the training study. Survival as defined above.",
        "",
        "| method | train loss | survival (train loss) | test accuracy | survival (accuracy) | median ms/step |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, variant in record["variants"].items():
        s = variant["summary"]
        lines.append(
            f"| {label} | {s['train_loss_geomean']:.3g} | {_fraction(s['survival_train_loss'])}"
            f" | {s['accuracy_mean']:.3f} ± {s['accuracy_std']:.3f} | {_fraction(s['survival_accuracy'])}"
            f" | {s['median_ms']:.1f} |"
        )
    lines += [
        "",
        f"Milliseconds are simulation wall-clock on a shared 2-core CPU. Whole study: {elapsed / 60:.1f} min.",
    ]
    print(write_results("results_method2.md", "\n".join(lines)))


if __name__ == "__main__":
    main()
