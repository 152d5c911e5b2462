"""Regenerate the README's benchmark section from committed results (never typed by hand).

Reads ``benchmarks/bench/results.json`` (``kronfac bench --out benchmarks/bench``) and
``benchmarks/kfac_speed/results.json`` (``python benchmarks/kfac_speed/run.py``) and links every other study's
``results.md`` under ``benchmarks/``. Run: ``python benchmarks/update_readme.py``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _config(record: dict) -> str:
    """The chosen learning rate plus any other swept hyperparameters."""
    extra = "".join(f", {k}={v:g}" for k, v in record.get("hyperparameters", {}).items())
    return f"{record['lr']:g}{extra}"


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def bench_section(results: dict, folder: str, title: str) -> list[str]:
    meta = results["meta"]
    lines = [
        f"**{title}** ({meta['date']}, {meta['machine']}, {meta['threads']} threads, seeds {meta['seeds']}; "
        "learning rates from the recorded sweep; time to target is training time, median over seeds; full tables "
        f"in [benchmarks/{folder}/](benchmarks/{folder}/results.md)):",
        "",
        "| task | method | lr | test acc | s to target | median ms/step | vs AdamW |",
        "|---|---|---|---|---|---|---|",
    ]
    for task_name, task in results["tasks"].items():
        base = task["methods"].get("adamw", {}).get("summary", {}).get("median_ms")
        for name, record in task["methods"].items():
            s = record["summary"]
            ratio = s["median_ms"] / base if base and s["median_ms"] else None
            lines.append(
                f"| {task_name} (target {task['target']}) | {name} | {_config(record)} "
                f"| {s['accuracy_mean']:.3f} ± {s['accuracy_std']:.3f} | {_fmt(s['seconds_to_target'], '.2f')} "
                f"| {_fmt(s['median_ms'], '.2f')} | {_fmt(ratio, '.2f')}x |"
            )
    return lines


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


def main() -> None:
    lines: list[str] = []
    bench = ROOT / "benchmarks" / "bench" / "results.json"
    if bench.exists():
        lines += bench_section(json.loads(bench.read_text()), "bench", "`kronfac bench` (the default job)")
    every = ROOT / "benchmarks" / "bench_all" / "results.json"
    if every.exists():
        title = (
            "Every method on the small tasks (`kronfac bench --tasks mlp-digits mlp-mnist1d cnn-digits --methods ...`)"
        )
        lines += ["", *bench_section(json.loads(every.read_text()), "bench_all", title)]
    speed = ROOT / "benchmarks" / "kfac_speed" / "results.json"
    if speed.exists():
        lines += speed_section(json.loads(speed.read_text()))
    own = ("bench", "bench_all")
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
