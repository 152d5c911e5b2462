"""Per-rank memory and ms/step of kronfac under DDP vs FSDP2 (``fully_shard``) at 1, 2 and 4 gloo ranks (CPU).

Every rank trains the same MLP (width ``--width``, ``--depth`` hidden layers, batch 32 per rank) with KFAC and
with AdamW, under DDP and under FSDP2 (each Linear and the root sharded), in alternating rounds so that drift of
the shared machine hits every setting alike. Per rank it records the bytes of parameters and gradients held
between steps (local shards under FSDP2), of torch.optim state (momentum / Adam moments), of kronfac's
curvature state (factors and inverses), and the median and mean ms/step. Writes ``fsdp.json`` and ``fsdp.md``.

Run: ``python benchmarks/distributed/fsdp.py [--worlds 1 2 4] [--width 256] [--steps 12]``
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
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import kronfac

HERE = Path(__file__).parent
BATCH = 32


def _local_bytes(tensors: list[Tensor]) -> int:
    from kronfac.distributed.sharded import is_sharded

    total = 0
    for t in tensors:
        local = t.to_local() if is_sharded(t) else t  # type: ignore[attr-defined]
        total += local.numel() * local.element_size()
    return total


def _curvature_bytes(opt: Any) -> int:
    """Bytes of the factors and inverses this rank holds (placed curvature: its own layers only)."""
    blob = [layer.block.state_dict() for layer in opt.layers.values()]
    tensors: list[Tensor] = []

    def walk(value: Any) -> None:
        if isinstance(value, Tensor):
            tensors.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(blob)
    return sum(t.numel() * t.element_size() for t in tensors)


def _model(width: int, depth: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(64, width), nn.Tanh()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def _run(rank: int, world: int, wrap: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    model = _model(args.width, args.depth)
    run: nn.Module = model
    if wrap == "fsdp2":
        for module in model:
            if isinstance(module, nn.Linear):
                fully_shard(module)
        fully_shard(model)
    else:
        run = DistributedDataParallel(model)
    if method == "kfac":
        opt: Any = kronfac.KFAC(model, lr=0.05, damping=1e-2, factor_every=1, inverse_every=10)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(rank)
    data = [(torch.randn(BATCH, 64, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen))]
    times = []
    for step in range(args.steps + 2):
        x, y = data[0]
        dist.barrier()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(run(x), y).backward()
        opt.step()
        if step >= 2:  # the first steps build inverses and buffers
            times.append((time.perf_counter() - start) * 1e3)
    params = list(model.parameters())
    state = [v for s in opt.state.values() for v in s.values() if isinstance(v, Tensor) and v.ndim > 0]
    out = {
        "params_and_grads_bytes": _local_bytes(params) + _local_bytes([p.grad for p in params if p.grad is not None]),
        "optim_state_bytes": _local_bytes(state),
        "curvature_bytes": _curvature_bytes(opt) if method == "kfac" else 0,
        "median_ms": statistics.median(times),
        "mean_ms": statistics.fmean(times),
    }
    if hasattr(opt, "close"):
        opt.close()
    return out


def _worker(rank: int, world: int, port: int, out: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results: dict[str, list[dict[str, Any]]] = {}
    for _ in range(args.rounds):
        for wrap in ("ddp", "fsdp2"):
            for method in ("adamw", "kfac"):
                results.setdefault(f"{wrap} {method}", []).append(_run(rank, world, wrap, method, args))
    every: list[Any] = [None] * world
    dist.all_gather_object(every, results)
    if rank == 0:  # memory: the largest rank's (placed curvature differs by rank); times: rank 0's
        for key, runs in results.items():
            for i, run in enumerate(runs):
                for field in ("params_and_grads_bytes", "optim_state_bytes", "curvature_bytes"):
                    run[field] = max(part[key][i][field] for part in every)
                run["curvature_bytes_min"] = min(part[key][i]["curvature_bytes"] for part in every)
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "r.json")
            mp.start_processes(_worker, args=(world, _free_port(), out, args), nprocs=world, start_method="spawn")
            results = json.loads(Path(out).read_text())
        for key, runs in results.items():
            wrap, method = key.split()
            row = {"world": world, "wrap": wrap, "method": method}
            for field in ("params_and_grads_bytes", "optim_state_bytes", "curvature_bytes", "curvature_bytes_min"):
                row[field] = runs[-1][field]
            row["median_ms"] = statistics.median(r["median_ms"] for r in runs)
            row["mean_ms"] = statistics.median(r["mean_ms"] for r in runs)
            rows.append(row)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, gloo on CPU, 1 thread per rank",
        "load_average": os.getloadavg(),
        "args": vars(args),
    }
    (HERE / "fsdp.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    kib = 1024
    lines = [
        f"# kronfac under DDP vs FSDP2: per-rank memory and time ({meta['date']})",
        "",
        f"MLP 64-{args.width}x{args.depth}-10, batch {BATCH} per rank, K-FAC factors every step, inverses every 10;"
        f" {meta['machine']}; load average {meta['load_average'][0]:.1f} (a shared machine: times are indicative,"
        " memory is exact).",
        "",
        "Memory is the largest rank's (curvature: largest / smallest rank); under FSDP2 K-FAC places each layer's"
        " curvature on one rank (the default), so the ideal per-rank share is 1/ranks of the replicated size, up"
        " to the granularity of whole layers.",
        "",
        "| ranks | wrap | method | params+grads KiB/rank | optimizer state KiB/rank | curvature KiB/rank (max / min) |"
        " median ms/step | mean ms/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['world']} | {r['wrap']} | {r['method']} | {r['params_and_grads_bytes'] / kib:.0f} |"
            f" {r['optim_state_bytes'] / kib:.0f} |"
            f" {r['curvature_bytes'] / kib:.0f} / {r['curvature_bytes_min'] / kib:.0f} |"
            f" {r['median_ms']:.1f} |"
            f" {r['mean_ms']:.1f} |"
        )
    (HERE / "fsdp.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
