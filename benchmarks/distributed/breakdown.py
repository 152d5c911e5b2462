"""Iteration-time breakdown of distributed K-FAC, naive vs spd, on local gloo processes (CPU).

Each world size starts its ranks once (torch.multiprocessing, gloo on 127.0.0.1); every rank trains the bench
CNN (``kronfac.bench.models.small_cnn``, 8x8 inputs) and the bench char transformer
(``kronfac.bench.models.CharTransformer``, width 64, 2 blocks, context 64) under DDP with K-FAC, factors and
inverses refreshed every step (the regime in which distributed K-FAC's extra work is largest). Strategies
alternate in rounds (naive, spd, naive, spd, ...) so that drift of the shared machine hits both alike.
Inputs are random tensors of the tasks' shapes: only time is measured. Writes ``breakdown.json`` and
``breakdown.md`` next to this file.

Run: ``python benchmarks/distributed/breakdown.py [--worlds 2 4] [--steps 16] [--rounds 2]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import kronfac
from kronfac.bench.models import CharTransformer, small_cnn

HERE = Path(__file__).parent
KEYS = ("forward_backward", "factor", "comm_wait", "inversion", "precondition", "other")


def _images(gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 64, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def _text(gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(0, 96, (n, 64), generator=gen), torch.randint(0, 96, (n, 64), generator=gen)


#: name -> (builder, per-rank batch, input maker, curvature options)
MODELS: dict[str, tuple[Any, int, Any, dict[str, Any]]] = {
    "cnn": (small_cnn, 64, _images, {}),
    "transformer": (lambda: CharTransformer(vocab=96), 8, _text, {"loss_average": "batch+sequence"}),
}
BUCKET_BYTES = 64 * 2**10  # these models' statistics are < 1 MB: 64 KiB gives ~10 buckets to pipeline


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_strategy(name: str, strategy: str, rank: int, steps: int) -> list[dict[str, float]]:
    build, batch, make_input, options = MODELS[name]
    torch.manual_seed(0)
    model = build()
    ddp = DistributedDataParallel(model)
    config = kronfac.DistributedConfig(strategy=strategy, bucket_bytes=BUCKET_BYTES)
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="kronfac.*first-order update")
        opt = kronfac.KFAC(model, lr=0.01, damping=1e-2, inverse_every=1, distributed=config, **options)
    gen = torch.Generator().manual_seed(100 + rank)
    records = []
    for step in range(steps + 2):
        x, y = make_input(gen, batch)
        start = time.perf_counter()
        out = ddp(x)
        loss = nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        wall = time.perf_counter() - start
        if step >= 2:  # warm-up: first steps allocate buffers and learn the bucket order
            timings = opt.timings
            other = wall - sum(timings.get(key, 0.0) for key in KEYS[:-1])
            records.append({**timings, "other": max(other, 0.0), "iteration": wall})
    opt.close()
    return records


def _worker(rank: int, world: int, port: int, out_dir: str, steps: int, rounds: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    for name in MODELS:
        results[name] = {"naive": [], "spd": []}
        for _ in range(rounds):
            for strategy in ("naive", "spd"):
                results[name][strategy] += _run_strategy(name, strategy, rank, steps)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _median(records: list[dict[str, float]], key: str) -> float:
    return statistics.median(r.get(key, 0.0) for r in records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=16, help="measured steps per round and strategy")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    summary: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "settings": {"steps": args.steps, "rounds": args.rounds, "bucket_bytes": BUCKET_BYTES, "inverse_every": 1},
        "results": {},
    }
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as out_dir:
            start = time.time()
            mp.spawn(_worker, args=(world, _free_port(), out_dir, args.steps, args.rounds), nprocs=world, join=True)
            ranks = [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(world)]
            print(f"world {world}: {time.time() - start:.0f}s", flush=True)
        for name in MODELS:
            for strategy in ("naive", "spd"):
                # Per-phase medians on rank 0; the iteration is as slow as the slowest rank, so take the max.
                rows = ranks[0][name][strategy]
                entry = {key: _median(rows, key) for key in KEYS}
                entry["iteration"] = max(_median(r[name][strategy], "iteration") for r in ranks)
                summary["results"].setdefault(name, {}).setdefault(str(world), {})[strategy] = entry
    (HERE / "breakdown.json").write_text(json.dumps(summary, indent=2) + "\n")
    (HERE / "breakdown.md").write_text(markdown(summary))
    print(markdown(summary))


def markdown(summary: dict[str, Any]) -> str:
    ms = 1e3
    lines = [
        "# Distributed K-FAC iteration-time breakdown (CPU, gloo, local processes)",
        "",
        f"Machine: {summary['machine']['cpus']} CPU cores ({summary['machine']['platform']}), torch "
        f"{summary['machine']['torch']}. **2 cores shared by all ranks (and other jobs)**: with 4 ranks the "
        "processes time-share the cores, so communication cannot overlap with computation the way it does on "
        "GPUs with a network; these numbers test the machinery, they do not predict cluster speed-ups (see "
        "`model.md`). Factors and inverses every step; medians of "
        f"{summary['settings']['steps']} steps x {summary['settings']['rounds']} rounds per strategy (ms).",
        "",
        "| model | ranks | strategy | fwd+bwd | factor | comm wait | inversion | precond+update | other | "
        "iteration | spd / naive |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, per_world in summary["results"].items():
        for world, per_strategy in per_world.items():
            naive = per_strategy["naive"]["iteration"]
            for strategy, entry in per_strategy.items():
                ratio = f"{entry['iteration'] / naive:.2f}" if strategy == "spd" else ""
                cells = " | ".join(f"{entry[k] * ms:.1f}" for k in (*KEYS, "iteration"))
                lines.append(f"| {name} | {world} | {strategy} | {cells} | {ratio} |")
    lines += [
        "",
        "fwd+bwd excludes the time spent in the capture hooks (column factor: the batch factors, packing and "
        "unpacking); comm wait is time blocked on K-FAC collectives (factor all-reduce, inverse broadcasts); "
        "precond+update is the rest of `step()` after the curvature work (preconditioning, EMA commit, KL clip, "
        "momentum); other is the iteration minus the named phases (zero_grad, collective launches, bookkeeping). "
        "Columns are medians, so they need not add up to the median iteration.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
