"""Reports of a benchmark run: ``results.json``, ``results.md`` (one table per task, whether the differences
exceed the seed noise, our best against the best peer), a plain terminal table, learning-curve PNGs and a
performance profile across tasks (Dolan & Moré 2002)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["comparison", "markdown", "noise_sentence", "performance_profile", "plot", "terminal", "write_reports"]

#: Two standard errors of a difference of means: the bar a difference must clear to exceed the seed noise.
NOISE_Z = 2.0


def _config(record: dict) -> str:
    """The chosen learning rate plus any other tuned hyperparameters."""
    extra = "".join(f", {k}={v:g}" for k, v in record.get("hyperparameters", {}).items())
    return f"{record['lr']:g}{extra}"


def _fmt(value: Any, spec: str = ".3f", none: str = "—") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return none
    return format(value, spec)


def _bytes(n: int) -> str:
    return f"{n / 1024:.0f} KiB" if n < 1024**2 else f"{n / 1024**2:.1f} MiB"


def _metric(task: dict) -> str:
    return task.get("metric", "accuracy")


def _mean_std(s: dict, metric: str) -> tuple[float, float]:
    if "metric_mean" in s:
        return s["metric_mean"], s["metric_std"]
    return s[f"{metric}_mean"], s.get(f"{metric}_std", 0.0)  # results of the older grid sweep


def noise_sentence(task_name: str, task: dict) -> str:
    """Whether the final-metric differences from the best method exceed the seed noise (2 standard errors)."""
    metric = _metric(task)
    larger = metric == "accuracy"
    rows = {n: r["summary"] for n, r in task["methods"].items() if math.isfinite(_mean_std(r["summary"], metric)[0])}
    if not rows:
        return f"{task_name}: every method diverged."
    best = (max if larger else min)(rows, key=lambda n: _mean_std(rows[n], metric)[0])
    b_mean, b_std = _mean_std(rows[best], metric)
    n_b = rows[best].get("seeds", 1)
    head = f"{task_name}: best test {metric} {best} ({b_mean:.3f} ± {b_std:.3f})"
    if n_b < 2:
        return head + "; one seed per method, so no noise estimate: differences are not tested."
    tied: list[str] = []
    beaten: list[str] = []
    for name, s in rows.items():
        if name == best:
            continue
        mean, std = _mean_std(s, metric)
        se = math.sqrt(std**2 / max(1, s.get("seeds", 1)) + b_std**2 / n_b)
        (tied if abs(mean - b_mean) <= NOISE_Z * se else beaten).append(name)
    parts = [head]
    parts.append(f"within the seed noise of it: {', '.join(tied)}" if tied else "no other method within the noise")
    if beaten:
        parts.append(f"worse by more than the noise (> {NOISE_Z:g} standard errors): {', '.join(beaten)}")
    return "; ".join(parts) + "."


def comparison(task: dict) -> dict[str, Any]:
    """Our best method against the best other (peer or baseline) in steps and seconds to the validation target:
    ``{"steps": (ours, theirs, ratio), "seconds": (...)}``, ratio < 1 when ours is faster; None where nobody of a
    side reached the target on every seed."""
    out: dict[str, Any] = {}
    for key in ("steps", "seconds"):
        sides: dict[bool, tuple[str, float] | None] = {True: None, False: None}
        for name, record in task["methods"].items():
            value = record["summary"].get(f"{key}_to_target")
            ours = record.get("family", "kronfac") == "kronfac"
            current = sides[ours]
            if value is not None and (current is None or value < current[1]):
                sides[ours] = (name, float(value))
        mine, theirs = sides[True], sides[False]
        ratio = mine[1] / theirs[1] if mine and theirs and theirs[1] > 0 else None
        out[key] = (mine, theirs, ratio)
    return out


def _comparison_sentence(task: dict) -> str:
    parts = []
    for key, unit in (("steps", "steps"), ("seconds", "s")):
        mine, theirs, ratio = comparison(task)[key]
        if mine is None and theirs is None:
            parts.append(f"{key}: no method reached the target on every seed")
        elif mine is None or theirs is None:
            name, value = theirs or mine
            side = "only the others" if mine is None else "only kronfac"
            parts.append(f"{key}: {side} reached it ({name}, {value:.3g} {unit})")
        else:
            parts.append(f"{key}: {mine[0]} {mine[1]:.3g} vs {theirs[0]} {theirs[1]:.3g} {unit} = {ratio:.2f}x")
    return "Our best vs the best other method to the validation target — " + "; ".join(parts) + "."


def markdown(results: dict[str, Any]) -> str:
    """One table per task: final metric, time/steps to target, ms/step (and its ratio to AdamW), state bytes."""
    meta = results["meta"]
    protocol = meta.get("protocol")
    how = (
        f"Protocol: {protocol['trials']} quasi-random trials per method (the first its recommended setting) of "
        f"{protocol['trial_fraction']:g} of the steps on seed 0, scored on the validation split; the best rerun on "
        f"seeds {meta['seeds']}. "
        if protocol
        else f"Seeds {meta['seeds']}; learning rates chosen by a sweep on a validation split. "
    )
    lines = [
        "# kronfac bench results",
        "",
        f"Generated by `kronfac bench{' --suite ' + meta['suite'] if meta.get('suite') else ''}` on {meta['date']} "
        f"({meta['machine']}, device {meta.get('device', 'cpu')}, torch {meta['torch']}, {meta['threads']} threads, "
        f"subnormals flushed: {meta.get('flush_denormal', False)}). {how}Final metric on the test split (mean ± "
        "std over seeds); steps and seconds until the validation metric reaches the target (training time only, "
        "median over seeds; '—' means not every seed reached it); mean ms/step includes curvature refreshes.",
        "",
    ]
    for task_name, task in results["tasks"].items():
        methods = task["methods"]
        metric = _metric(task)
        base = methods.get("adamw", {}).get("summary", {}).get("median_ms")
        arrow = "≥" if metric == "accuracy" else "≤"
        lines += [
            f"## {task_name}: {task['description']}",
            "",
            f"{task['steps']} steps, batch {task['batch_size']}, target validation {metric} {arrow} {task['target']}.",
            "",
            f"| method | setting | test {metric} | steps to target | s to target | median ms/step | mean ms/step "
            "| vs AdamW | state |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, record in methods.items():
            s = record["summary"]
            mean, std = _mean_std(s, metric)
            ratio = s["median_ms"] / base if base and s["median_ms"] else None
            lines.append(
                f"| {name} | {_config(record)} | {_fmt(mean)} ± {_fmt(std)} "
                f"| {_fmt(s['steps_to_target'], '.0f')} ({s['reached_target']}) "
                f"| {_fmt(s['seconds_to_target'], '.2f')} | {_fmt(s['median_ms'], '.2f')} "
                f"| {_fmt(s.get('mean_ms'), '.2f')} | {_fmt(ratio, '.2f')}x | {_bytes(s['state_bytes'])} |"
            )
        lines += ["", noise_sentence(task_name, task), "", _comparison_sentence(task), ""]
    return "\n".join(lines)


def terminal(task_name: str, task: dict) -> str:
    """A plain, aligned table of one task for the terminal."""
    metric = _metric(task)
    header = ["method", f"test {metric}", "steps→target", "s→target", "median ms", "mean ms", "state"]
    rows = [header]
    for name, record in task["methods"].items():
        s = record["summary"]
        mean, std = _mean_std(s, metric)
        rows.append(
            [name, f"{_fmt(mean)} ± {_fmt(std)}", f"{_fmt(s['steps_to_target'], '.0f')} ({s['reached_target']})",
             _fmt(s["seconds_to_target"], ".2f"), _fmt(s["median_ms"], ".2f"), _fmt(s.get("mean_ms"), ".2f"),
             _bytes(s["state_bytes"])]
        )  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    text = [f"{task_name}: {task['description']} (target validation {metric} {task['target']})"]
    for i, row in enumerate(rows):
        text.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            text.append("  ".join("-" * w for w in widths))
    text.append(noise_sentence(task_name, task))
    return "\n".join(text)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(results: dict[str, Any], out: Path) -> list[Path]:
    """Per task, a 2x2 figure: test loss and validation metric vs steps and vs training seconds (first seed)."""
    plt = _pyplot()
    paths = []
    for task_name, task in results["tasks"].items():
        metric = _metric(task)
        fig, axes = plt.subplots(2, 2, figsize=(10, 7))
        for name, record in task["methods"].items():
            curve = record["runs"][0]["curve"]
            finite = [p for p in curve if math.isfinite(p["loss"])]
            key = f"val_{metric}" if finite and f"val_{metric}" in finite[0] else metric
            for col, xkey in enumerate(("step", "seconds")):
                axes[0][col].plot([p[xkey] for p in finite], [p["loss"] for p in finite], label=name)
                axes[1][col].plot([p[xkey] for p in finite], [p[key] for p in finite], label=name)
        for col, xlabel in enumerate(("step", "training seconds")):
            axes[0][col].set_ylabel("test loss")
            axes[1][col].set_ylabel(f"validation {metric}")
            axes[1][col].set_xlabel(xlabel)
            axes[1][col].axhline(task["target"], color="gray", lw=0.8, ls="--")
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"{task_name}: {task['description']}")
        fig.tight_layout()
        path = out / f"{task_name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def performance_profile(results: dict[str, Any], out: Path) -> Path | None:
    """Fraction of tasks on which a method's steps (left) and seconds (right) to the validation target are
    within a factor τ of the best method's on that task; a method that misses the target never counts."""
    tasks = list(results["tasks"].values())
    methods = list(dict.fromkeys(name for task in tasks for name in task["methods"]))
    if not tasks or not methods:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key in zip(axes, ("steps", "seconds")):
        ratios: dict[str, list[float]] = {m: [] for m in methods}
        for task in tasks:
            values = {
                m: task["methods"][m]["summary"].get(f"{key}_to_target") if m in task["methods"] else None
                for m in methods
            }
            finite = [v for v in values.values() if v is not None and v > 0]
            best = min(finite) if finite else None
            for m, v in values.items():
                ratios[m].append(v / best if best and v is not None and v > 0 else math.inf)
        top = max([r for rs in ratios.values() for r in rs if math.isfinite(r)] + [1.0]) * 1.1
        taus = [1.0 * (top / 1.0) ** (i / 200) for i in range(201)]
        for m in methods:
            ax.step(taus, [sum(r <= t for r in ratios[m]) / len(tasks) for t in taus], where="post", label=m)
        ax.set_xscale("log")
        ax.set_xlabel(f"τ: {key} to target / best method's")
        ax.set_title(f"{key} to the validation target")
    axes[0].set_ylabel(f"fraction of the {len(tasks)} tasks within τ")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = out / "performance_profile.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_reports(results: dict[str, Any], out: Path, *, plots: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "results.json", json.dumps(results, indent=1, default=float))
    _write(out / "results.md", markdown(results))
    written = [out / "results.json", out / "results.md"]
    if plots:
        written += plot(results, out)
        profile = performance_profile(results, out)
        if profile is not None:
            written.append(profile)
    return written
