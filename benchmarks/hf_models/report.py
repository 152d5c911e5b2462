"""Markdown report of ``benchmarks/hf_models/run.py``'s JSON: every number and every sentence of the reading is
computed from the JSON, none typed by hand. Regenerate with ``python benchmarks/hf_models/report.py``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

KRONFAC = ("kfac", "singd", "adafisherw")


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _hp(hp: dict[str, Any], damping_name: str = "damping") -> str:
    text = f"lr={hp['lr']:g}, {damping_name}={hp['damping']:g}, warmup={hp.get('warmup', 0):g}"
    return text + "".join(f", {k}={v}" for k, v in hp.get("options", {}).items())


def _metric_name(task: dict[str, Any]) -> str:
    return "val loss (nats/char)" if task["kind"] == "lm" else "val accuracy"


def _main_table(task: dict[str, Any]) -> list[str]:
    base = task["methods"].get("adamw", {}).get("summary", {})
    test = "test loss" if task["kind"] == "lm" else "test accuracy"
    lines = [
        f"| method | chosen setting | {_metric_name(task)} | {test} | reached | steps to target | × AdamW "
        "| s to target | × AdamW | median ms/step | × AdamW | diverged trials |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in task["methods"].items():
        s = m["summary"]
        diverged = sum(t["diverged"] for t in m["trials"])
        lines.append(
            f"| {name} | {_hp(m['chosen'], m['damping_name'])} | {_fmt(s['val_mean'], '.3f')} ± "
            f"{_fmt(s['val_std'], '.3f')} | {_fmt(s['test_mean'], '.3f')} ± {_fmt(s['test_std'], '.3f')} "
            f"| {s.get('reached', '—')} | {_fmt(s.get('steps_to_target'), '.0f')} "
            f"| {_fmt(_ratio(s.get('steps_to_target'), base.get('steps_to_target')), '.2f')} "
            f"| {_fmt(s.get('seconds_to_target'), '.1f')} "
            f"| {_fmt(_ratio(s.get('seconds_to_target'), base.get('seconds_to_target')), '.2f')} "
            f"| {_fmt(s['median_ms'], '.1f')} | {_fmt(_ratio(s['median_ms'], base.get('median_ms')), '.2f')} "
            f"| {diverged}/{len(m['trials'])} |"
        )
    return lines


def _tuning_table(task: dict[str, Any]) -> list[str]:
    key = "loss" if task["kind"] == "lm" else "accuracy"
    lines = ["| method | trial | setting | final val " + key + " |", "|---|---|---|---|"]
    for name, m in task["methods"].items():
        for k, t in enumerate(m["trials"]):
            value = "diverged" if t["diverged"] else f"{t['final_val'][key]:.3f}"
            mark = " (chosen)" if t["hp"] == m["chosen"] else ""
            lines.append(f"| {name} | {k} | {_hp(t['hp'], m['damping_name'])}{mark} | {value} |")
    return lines


def _ablation_table(task: dict[str, Any]) -> list[str]:
    rows = task["ablation"]["rows"]
    ref = rows[0]["val_mean"]
    lines = [
        f"| K-FAC variant (seed {task['ablation']['seed']}) | {_metric_name(task)} | Δ vs chosen | steps to target "
        "| s to target | median ms/step |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        value = row["val_mean"]
        delta = None if value is None or ref is None else value - ref
        lines.append(
            f"| {row['label']} | {_fmt(value, '.3f') if value is not None else 'diverged'} | {_fmt(delta, '+.3f')} "
            f"| {_fmt(row.get('steps_to_target'), '.0f')} | {_fmt(row.get('seconds_to_target'), '.1f')} "
            f"| {_fmt(row['median_ms'], '.1f')} |"
        )
    return lines


def _reading(name: str, task: dict[str, Any]) -> list[str]:
    """Plain-language sentences computed from the numbers: the goal of issue 11 and what the ablation says."""
    methods = task["methods"]
    if "adamw" not in methods:
        return []
    base = methods["adamw"]["summary"]
    out: list[str] = []
    for m in KRONFAC:
        if m not in methods:
            continue
        s = methods[m]["summary"]
        if task["kind"] == "lm":
            steps = _ratio(s.get("steps_to_target"), base.get("steps_to_target"))
            secs = _ratio(s.get("seconds_to_target"), base.get("seconds_to_target"))
            if steps is None or secs is None:
                verdict = (
                    f"does not reach AdamW's final validation loss {task['target']:.3f} in every seed "
                    f"(reached {s.get('reached')}; its final loss {_fmt(s['val_mean'], '.3f')})"
                )
            else:
                met = "meets" if steps <= 0.8 and secs <= 1.0 else "misses"
                verdict = f"reaches it in {steps:.2f}x AdamW's steps and {secs:.2f}x its seconds: {met} the goal"
            out.append(f"- **{m}** {verdict} (goal: ≤ 0.8x steps and ≤ 1.0x seconds).")
        else:
            gap = None if s["val_mean"] is None else s["val_mean"] - base["val_mean"]
            spread = max(s["val_std"] or 0.0, base["val_std"] or 0.0)
            if gap is None:
                verdict = "diverged"
            else:
                match = gap >= -spread
                verdict = (
                    f"validation accuracy {s['val_mean']:.3f} vs AdamW's {base['val_mean']:.3f} ({gap:+.3f}; "
                    f"{'matches' if match else 'does not match'} AdamW within the larger seed std {spread:.3f}); "
                    f"majority class {task['majority_accuracy']:.3f}"
                )
            out.append(f"- **{m}**: {verdict}.")
    if "ablation" in task:
        rows = task["ablation"]["rows"]
        ref = rows[0]["val_mean"]
        better = (lambda d: d < 0) if task["kind"] == "lm" else (lambda d: d > 0)
        moves = [
            (row["label"], row["val_mean"] - ref) for row in rows[1:] if row["val_mean"] is not None and ref is not None
        ]
        if moves:
            best = min(moves, key=lambda x: x[1]) if task["kind"] == "lm" else max(moves, key=lambda x: x[1])
            worst = max(moves, key=lambda x: x[1]) if task["kind"] == "lm" else min(moves, key=lambda x: x[1])
            verb = "improves" if better(best[1]) else "does not improve"
            harm = f"; the most harmful is {worst[0]} ({worst[1]:+.3f})" if better(-worst[1]) else ""
            out.append(
                f"- Ablation: the best single change, {best[0]}, {verb} on the chosen K-FAC ({best[1]:+.3f}){harm}."
            )
        diverged = [row["label"] for row in rows if row["val_mean"] is None]
        if diverged:
            out.append(f"- Diverged in the ablation: {', '.join(diverged)}.")
    return out


def write_markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        "# kronfac on Hugging Face models (issue 11)",
        "",
        f"Generated by `python benchmarks/hf_models/run.py{' --quick' if meta['quick'] else ''}` on {meta['date']}: "
        f"{meta['machine']}, Python {meta['python']}, torch {meta['torch']}, transformers {meta['transformers']}, "
        f"{meta['threads']} thread(s), subnormals flushed; wall time {meta['wall_seconds'] / 60:.1f} min"
        + (f" (the tasks ran as {meta['processes']} processes side by side)" if meta.get("processes") else "")
        + ". "
        f"{meta['trials']} tuning trials per method (seed {meta['tune_seed']}), then seeds {meta['seeds']}. "
        "Protocol and the investigation: [README.md](README.md). Every number and sentence below is generated "
        "from `results.json` (`python benchmarks/hf_models/report.py`).",
    ]
    for name, task in results["tasks"].items():
        budget = meta["budgets"][name]
        target = _fmt(task["target"], ".3f")
        lines += [
            "",
            f"## {name}",
            "",
            f"{task['description']}; batch {task['batch_size']}, {budget['steps']} steps, validation every "
            f"{budget['eval_every']} steps on {budget['val_size']} sequences (final metrics on the whole split); "
            f"kronfac's `loss_average={task['loss_average']!r}`. Target: AdamW's final {_metric_name(task)} on that "
            f"subset, of its worst seed: {target}."
            + (f" Majority-class accuracy: {task['majority_accuracy']:.3f}." if task["majority_accuracy"] else ""),
            "",
            *_main_table(task),
            "",
            "Reading:",
            "",
            *_reading(name, task),
        ]
        if "ablation" in task:
            lines += [
                "",
                f"### Ablation of K-FAC on {name}",
                "",
                "One seed per row, run one after another (not interleaved): read the metric; the seconds and ms/step "
                "columns carry the machine's load changes and are not comparable between rows.",
                "",
                *_ablation_table(task),
            ]
        lines += ["", f"### Tuning trials on {name}", "", *_tuning_table(task), "", "Coverage (`opt.summary()`):", ""]
        lines += [f"- {m}: {record['coverage']}" for m, record in task["methods"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
    (folder / "results.md").write_text(write_markdown(json.loads((folder / "results.json").read_text())))
