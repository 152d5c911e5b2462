"""Regenerate the README's benchmark section from committed results (never typed by hand).

Reads ``benchmarks/bench/results.json`` (``kronfac bench --out benchmarks/bench``, the default suite),
``benchmarks/bench_full/results.json`` (``kronfac bench --suite full --out benchmarks/bench_full``),
``benchmarks/kfac_speed/results.json`` (``python benchmarks/kfac_speed/run.py``),
``benchmarks/hf_models/results.json`` (``python benchmarks/hf_models/run.py``) and links every other study's
``results.md`` under ``benchmarks/``. Run: ``python benchmarks/update_readme.py``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
sys.path.insert(0, str(ROOT / "src"))

from kronfac.bench.report import comparison, noise_sentence  # noqa: E402


def _config(record: dict) -> str:
    """The chosen learning rate plus any other swept hyperparameters."""
    extra = "".join(f", {k}={v:g}" for k, v in record.get("hyperparameters", {}).items())
    return f"{record['lr']:g}{extra}"


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _protocol(meta: dict) -> str:
    p = meta.get("protocol")
    if not p:
        return "learning rates from the recorded sweep"
    return (
        f"{p['trials']} quasi-random trials per method at {p['trial_fraction']:g} of the steps, the best rerun on "
        f"seeds {meta['seeds']}, steps x{meta.get('steps_scale', 1):g}"
    )


def _ratio_line(task_name: str, task: dict) -> str:
    parts = []
    for key, unit in (("steps", ""), ("seconds", " s")):
        mine, theirs, ratio = comparison(task)[key]
        if mine and theirs:
            parts.append(f"{key} {mine[0]} {mine[1]:.3g}{unit} / {theirs[0]} {theirs[1]:.3g}{unit} = **{ratio:.2f}x**")
        else:
            who = "kronfac's methods" if theirs else "the other methods"
            parts.append(f"{key}: {who} never reached it on every seed")
    return f"- {task_name}: our best vs the best other to the validation target: " + "; ".join(parts) + "."


def bench_section(results: dict, folder: str, title: str) -> list[str]:
    meta = results["meta"]
    lines = [
        f"**{title}** ({meta['date']}, {meta['machine']}, {meta['threads']} threads; {_protocol(meta)}; final "
        "metric on the test split, mean ± std over seeds; steps and seconds to the validation target, median over "
        f"seeds; full tables in [benchmarks/{folder}/](benchmarks/{folder}/results.md)):",
        "",
        "| task (target) | method | setting | test metric | steps to target | s to target | median ms/step "
        "| mean ms/step | vs AdamW |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for task_name, task in results["tasks"].items():
        base = task["methods"].get("adamw", {}).get("summary", {}).get("median_ms")
        metric = task.get("metric", "accuracy")
        arrow = "≥" if metric == "accuracy" else "≤"
        for name, record in task["methods"].items():
            s = record["summary"]
            mean = s.get("metric_mean", s.get(f"{metric}_mean"))
            std = s.get("metric_std", s.get(f"{metric}_std", 0.0))
            ratio = s["median_ms"] / base if base and s["median_ms"] else None
            lines.append(
                f"| {task_name} ({metric} {arrow} {task['target']}) | {name} | {_config(record)} "
                f"| {mean:.3f} ± {std:.3f} | {_fmt(s['steps_to_target'], '.0f')} "
                f"| {_fmt(s['seconds_to_target'], '.2f')} | {_fmt(s['median_ms'], '.2f')} "
                f"| {_fmt(s.get('mean_ms'), '.2f')} | {_fmt(ratio, '.2f')}x |"
            )
        if "metric" in task:
            notes += [f"- {noise_sentence(task_name, task)}", _ratio_line(task_name, task)]
    return lines + (["", *notes] if notes else [])


def speed_section(results: dict) -> list[str]:
    meta = results["meta"]
    lines = [
        "",
        f"**K-FAC step time vs AdamW and peers** ({meta['model']}, curvature every {meta['curvature_every']} steps, "
        f"{meta['threads']} thread(s), {meta['date']}, {meta['machine']}; "
        "[benchmarks/kfac_speed/](benchmarks/kfac_speed/results.md)):",
        "",
        "| method | median ms/step | vs AdamW | vs fastest peer |",
        "|---|---|---|---|",
    ]
    for name, row in results["methods"].items():
        lines.append(
            f"| {name} | {row['median_ms']:.2f} | {row['vs_adamw']:.2f}x | {_fmt(row['vs_fastest_peer'], '.2f')}x |"
        )
    return lines


def hf_section(results: dict) -> list[str]:
    """benchmarks/hf_models: final metric and steps/seconds to AdamW's final metric, per method and task."""
    meta = results["meta"]
    lines = [
        "",
        f"**Hugging Face models: tiny GPT-2 char LM and BERT classifier** ({meta['date']}, {meta['machine']}, "
        f"{meta['threads']} thread(s), {meta['trials']} tuning trials per method, seeds {meta['seeds']}; "
        "[benchmarks/hf_models/](benchmarks/hf_models/results.md)):",
        "",
        "| task | method | final val metric | steps to AdamW's final | × AdamW | s × AdamW | ms/step × AdamW |",
        "|---|---|---|---|---|---|---|",
    ]
    for task_name, task in results["tasks"].items():
        base = task["methods"]["adamw"]["summary"]
        metric = "loss" if task["kind"] == "lm" else "acc"
        for name, record in task["methods"].items():
            s = record["summary"]
            ratio = {
                key: s[key] / base[key] if s.get(key) is not None and base.get(key) else None
                for key in ("steps_to_target", "seconds_to_target", "median_ms")
            }
            value = "diverged" if s["val_mean"] is None else f"{metric} {s['val_mean']:.3f} ± {s['val_std']:.3f}"
            lines.append(
                f"| {task_name} | {name} | {value} | {_fmt(s.get('steps_to_target'), '.0f')} "
                f"| {_fmt(ratio['steps_to_target'], '.2f')} | {_fmt(ratio['seconds_to_target'], '.2f')} "
                f"| {_fmt(ratio['median_ms'], '.2f')} |"
            )
    return lines


def main() -> None:
    lines: list[str] = []
    bench = ROOT / "benchmarks" / "bench" / "results.json"
    if bench.exists():
        lines += bench_section(json.loads(bench.read_text()), "bench", "`kronfac bench` (the default job)")
    full = ROOT / "benchmarks" / "bench_full" / "results.json"
    if full.exists():
        results = json.loads(full.read_text())
        title = f"The full suite (`kronfac bench --suite full --steps-scale {results['meta'].get('steps_scale', 1):g}`)"
        lines += ["", *bench_section(results, "bench_full", title)]
    speed = ROOT / "benchmarks" / "kfac_speed" / "results.json"
    if speed.exists():
        lines += speed_section(json.loads(speed.read_text()))
    hf = ROOT / "benchmarks" / "hf_models" / "results.json"
    if hf.exists():
        lines += hf_section(json.loads(hf.read_text()))
    own = ("bench", "bench_full")
    studies = sorted(p for p in (ROOT / "benchmarks").glob("*/results.md") if p.parent.name not in own)
    if studies:
        lines += ["", "Other studies: " + ", ".join(f"[{p.parent.name}]({p.relative_to(ROOT)})" for p in studies) + "."]
    readme = ROOT / "README.md"
    text = readme.read_text()
    block = START + "\n" + "\n".join(lines) + "\n" + END
    readme.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S))
    print(f"updated {readme} ({len(lines)} lines)")


if __name__ == "__main__":
    main()
