"""K-FAC step time against AdamW and the peers singd and ASDL, measured in one run on the same MLP.

MLP 40-256-256-10 on mnist1d batches of 128, curvature and inverses every 10 steps for every K-FAC-type method.
Methods are interleaved over several rounds so that machine noise hits them alike; we report the median step
time over all rounds, its ratio to AdamW and to the fastest peer. Run: ``python benchmarks/kfac_speed/run.py``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from kronfac.bench import METHODS, TASKS
from kronfac.bench.methods import Trainer
from kronfac.bench.models import mlp

HERE = Path(__file__).parent
METHOD_LRS = {"adamw": 1e-3, "sgd": 0.1, "kfac": 0.1, "kfac-cholesky": 0.1, "singd-ikfac": 0.1, "asdl-kfac": 0.01}
PEERS = ("singd-ikfac", "asdl-kfac")


def _kfac_cholesky(model, lr, task) -> Trainer:
    import warnings

    import kronfac
    from kronfac.bench.methods import KFAC_BENCH_OPTIONS, OptimizerTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = kronfac.KFAC(model, lr=lr, inverse=kronfac.CholeskyConfig(), **KFAC_BENCH_OPTIONS)
    return OptimizerTrainer(model, opt, task)


def time_method(name: str, steps: int, warmup: int = 20) -> list[float]:
    task = TASKS["mlp-mnist1d"]
    split = task.load()
    torch.manual_seed(0)
    model = mlp([40, 256, 256, 10])
    make = _kfac_cholesky if name == "kfac-cholesky" else METHODS[name].make
    trainer = make(model, METHOD_LRS[name], task)
    generator = torch.Generator().manual_seed(0)
    times = []
    for step in range(warmup + steps):
        idx = torch.randint(0, len(split.x_train), (128,), generator=generator)
        x, y = split.x_train[idx], split.y_train[idx]
        start = time.perf_counter()
        trainer.step(x, y)
        if step >= warmup:
            times.append(1e3 * (time.perf_counter() - start))
    trainer.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as kronfac bench: subnormal gradients would slow every method's matmuls
    methods = [m for m in METHOD_LRS if m in ("kfac-cholesky",) or METHODS[m].available()]
    samples: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.rounds):
        for name in methods:
            samples[name] += time_method(name, args.steps)
    adamw = statistics.median(samples["adamw"])
    peers = [statistics.median(samples[p]) for p in PEERS if p in samples]
    fastest_peer = min(peers) if peers else None
    rows = {}
    for name, times in samples.items():
        med = statistics.median(times)
        rows[name] = {
            "median_ms": med,
            "mean_ms": statistics.fmean(times),
            "p90_ms": sorted(times)[int(0.9 * len(times))],
            "vs_adamw": med / adamw,
            "vs_fastest_peer": med / fastest_peer if fastest_peer else None,
        }
    result = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__,
            "threads": args.threads,
            "rounds": args.rounds,
            "steps_per_round": args.steps,
            "model": "MLP 40-256-256-10, batch 128, mnist1d",
            "curvature_every": 10,
        },
        "methods": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    lines = [
        "# K-FAC step time vs AdamW and peers",
        "",
        f"{result['meta']['model']}; curvature and inverses every 10 steps; {args.rounds} interleaved rounds of "
        f"{args.steps} timed steps per method; {args.threads} thread(s); {result['meta']['date']}, "
        f"{result['meta']['machine']}, torch {torch.__version__}.",
        "",
        "| method | median ms/step | mean ms/step | p90 ms/step | vs AdamW (median) | vs fastest peer (median) |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        peer = f"{row['vs_fastest_peer']:.2f}x" if row["vs_fastest_peer"] else "—"
        lines.append(
            f"| {name} | {row['median_ms']:.2f} | {row['mean_ms']:.2f} | {row['p90_ms']:.2f} "
            f"| {row['vs_adamw']:.2f}x | {peer} |"
        )
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
