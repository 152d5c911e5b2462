"""Tables and plots of the thermodynamic cost model (Donatella et al. 2025, "Scalable Thermodynamic Second-order
Optimization"): predicted per-step times, speedups over digital K-FAC and crossover widths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kronfac.linalg.thermodynamic.cost import CostModel, crossover_width, sweep

__all__ = ["cost_report", "format_assumptions", "format_crossover", "format_table", "plot_speedups"]


def cost_report(model: CostModel, workloads: list[str], widths: list[int]) -> dict[str, Any]:
    """Sweep every workload over ``widths``; add the crossover widths of both methods and the assumptions."""
    return {
        "assumptions": model.assumptions(),
        "workloads": {
            name: {
                "rows": sweep(model, name, widths),
                "crossover_width": {method: crossover_width(model, name, method) for method in ("thermo1", "thermo2")},
            }
            for name in workloads
        },
    }


def format_crossover(width: int | None) -> str:
    """A crossover width as text: ``None`` (never within the scanned range) and 1 (at every width) in words."""
    if width is None:
        return "never (up to 4M)"
    return "every width" if width == 1 else str(width)


def format_assumptions(assumptions: dict[str, Any]) -> str:
    """One markdown bullet per assumption."""
    return "\n".join(f"- `{key}` = {value}" for key, value in assumptions.items())


def format_table(rows: list[dict[str, float]]) -> str:
    """Markdown table of per-step milliseconds and speedups, one row per width."""
    header = (
        "| width | Adam ms | K-FAC ms | thermo-1 ms | thermo-2 ms | speedup 1 vs K-FAC | speedup 2 vs K-FAC "
        "| thermo-1 / Adam |\n|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [header]
    for row in rows:
        lines.append(
            f"| {int(row['width'])} | {1e3 * row['adam']:.4g} | {1e3 * row['kfac']:.4g} "
            f"| {1e3 * row['thermo1']:.4g} | {1e3 * row['thermo2']:.4g} | {row['speedup1_vs_kfac']:.3g} "
            f"| {row['speedup2_vs_kfac']:.3g} | {row['thermo1_vs_adam']:.3g} |"
        )
    return "\n".join(lines)


def plot_speedups(report: dict[str, Any], path: str | Path) -> Path:
    """Plot predicted speedup of thermodynamic K-FAC over digital K-FAC vs width (log-log), one panel per
    workload. Needs matplotlib (the ``bench`` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = report["workloads"]
    fig, axes = plt.subplots(1, len(workloads), figsize=(4.5 * len(workloads), 3.6), squeeze=False)
    for ax, (name, result) in zip(axes[0], workloads.items()):
        widths = [row["width"] for row in result["rows"]]
        for key, label in (("speedup1_vs_kfac", "method 1"), ("speedup2_vs_kfac", "method 2")):
            ax.plot(widths, [row[key] for row in result["rows"]], marker="o", label=label)
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("layer width n")
        ax.set_ylabel("predicted speedup over digital K-FAC")
        ax.legend()
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
