"""Collect the distributed K-FAC studies into ``results.md``: CPU breakdown, alpha-beta model, GPU check.

Reads ``breakdown.json`` (``breakdown.py``), ``model.json`` (``model.py``) and, when present,
``gpu_check.json`` (``gpu_check.sh`` on a GPU machine). Run: ``python benchmarks/distributed/results.py``
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import breakdown
import model

HERE = Path(__file__).parent


def gpu_markdown(report: dict[str, Any]) -> str:
    lines = [
        "# One-GPU check (NCCL, 1 rank) and CUDA step times vs single-process K-FAC",
        "",
        f"Device: {report['device']}, backend {report['backend']}, torch {report['torch']}; factors and inverses "
        f"every step; median of {report['steps_measured']} steps (CUDA-synchronised).",
        "",
        "| workload | run | iteration (ms) | vs single | max abs param diff vs single |",
        "|---|---|---|---|---|",
    ]
    for name, runs in report["workloads"].items():
        for label, run in runs.items():
            ratio = f"{run['iteration_vs_single']:.2f}" if "iteration_vs_single" in run else ""
            diff = f"{run['max_abs_param_diff_vs_single']:.1e}" if "max_abs_param_diff_vs_single" in run else ""
            lines.append(f"| {name} | {label} | {run['iteration_s'] * 1e3:.1f} | {ratio} | {diff} |")
    eigh = ", ".join(f"d={d}: {t * 1e3:.1f} ms" for d, t in report["eigh_seconds"].items())
    lines += ["", f"torch.linalg.eigh (fp32): {eigh}.", ""]
    return "\n".join(lines)


def main() -> None:
    parts = [
        "# Distributed K-FAC: results",
        "",
        "Three studies, each generated from committed JSON by the script named in its section.",
        "",
        breakdown.markdown(json.loads((HERE / "breakdown.json").read_text())).replace("# ", "## ", 1),
        model.markdown(json.loads((HERE / "model.json").read_text()))
        .replace("# ", "## ", 1)
        .replace("\n## ", "\n### "),
    ]
    gpu = HERE / "gpu_check.json"
    if gpu.exists():
        parts.append(gpu_markdown(json.loads(gpu.read_text())).replace("# ", "## ", 1))
    else:
        parts.append(
            "## One-GPU check\n\nNot run yet: run `bash benchmarks/distributed/gpu_check.sh` on a GPU machine, "
            "commit `gpu_check.json`, then rerun this script (and `model.py --gpu-json "
            "benchmarks/distributed/gpu_check.json` to calibrate the eigendecomposition rate).\n"
        )
    (HERE / "results.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
