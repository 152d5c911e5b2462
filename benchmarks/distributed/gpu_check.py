"""One-GPU check of distributed K-FAC's NCCL path, and CUDA step timings against single-process K-FAC.

On one GPU (``torchrun`` is not needed): a 1-rank NCCL process group, DDP with ``device_ids=[0]``, and K-FAC
with ``DistributedConfig(strategy="naive" | "spd")`` versus plain single-process ``KFAC`` on the same data.
Checks that all three give the same parameters and times their steps (CUDA-synchronised medians). Also times
``torch.linalg.eigh`` on the GPU for a few sizes (``eigh_seconds``), which ``model.py --gpu-json`` uses to
calibrate its eigendecomposition rate. Without CUDA it runs the same on CPU with gloo (a smoke test).

Run: ``bash benchmarks/distributed/gpu_check.sh`` (writes ``$OUT/gpu_check.json``; under 3 minutes on an H100).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import kronfac
from kronfac.bench.models import CharTransformer


def _cnn(c: int, classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, 2 * c, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(2 * c, 4 * c, 3, padding=1, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4 * c, classes),
    )  # fmt: skip


def _workloads(quick: bool) -> dict[str, tuple[Any, Any, dict[str, Any]]]:
    side, batch, width, channels, classes = (8, 16, 32, 8, 50) if quick else (32, 128, 512, 64, 1000)

    def images(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(batch, 3, side, side, generator=gen), torch.randint(0, classes, (batch,), generator=gen)

    def text(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(0, 256, (batch // 4, 64), generator=gen)
        return ids, torch.randint(0, 256, (batch // 4, 64), generator=gen)

    return {
        "cnn": (lambda: _cnn(channels, classes), images, {}),
        "transformer": (lambda: CharTransformer(vocab=256, width=width, depth=2, heads=8), text,
                        {"loss_average": "batch+sequence"}),
    }  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _train(name: str, strategy: str | None, steps: int, device: torch.device, quick: bool) -> dict[str, Any]:
    build, make_batch, options = _workloads(quick)[name]
    torch.manual_seed(0)
    model = build().to(device)
    ddp = DistributedDataParallel(model, device_ids=[0] if device.type == "cuda" else None) if strategy else None
    config = kronfac.DistributedConfig(strategy=strategy) if strategy else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="kronfac.*first-order update")
        opt = kronfac.KFAC(model, lr=0.01, damping=1e-2, inverse_every=1, distributed=config, **options)
    gen = torch.Generator().manual_seed(1)
    times, timings = [], []
    for step in range(steps):
        x, y = (t.to(device) for t in make_batch(gen))
        _sync(device)
        start = time.perf_counter()
        out = (ddp or model)(x)
        nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
        _sync(device)
        if step >= 3:
            times.append(time.perf_counter() - start)
            timings.append(opt.timings)
    opt.close()
    result: dict[str, Any] = {"iteration_s": statistics.median(times)}
    if timings and timings[0]:
        result["host_timings_s"] = {k: statistics.median(t.get(k, 0.0) for t in timings) for k in timings[0]}
    result["params"] = torch.cat([p.detach().reshape(-1).double().cpu() for p in model.parameters()])
    return result


def _eigh_seconds(device: torch.device, sizes: list[int]) -> dict[int, float]:
    out = {}
    for d in sizes:
        x = torch.randn(d, d, device=device)
        matrix = x @ x.T / d + torch.eye(d, device=device)
        torch.linalg.eigh(matrix)  # warm-up (cuSOLVER handles, workspace)
        runs = []
        for _ in range(3):
            _sync(device)
            start = time.perf_counter()
            torch.linalg.eigh(matrix)
            _sync(device)
            runs.append(time.perf_counter() - start)
        out[d] = statistics.median(runs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "gpu_check.json")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke test)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    backend = "nccl" if cuda else "gloo"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    dist.init_process_group(backend, rank=0, world_size=1, timeout=timedelta(seconds=120))
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "backend": backend,
        "torch": torch.__version__,
        "steps_measured": args.steps - 3,
        "inverse_every": 1,
        "workloads": {},
    }
    total = time.perf_counter()
    for name in _workloads(args.quick):
        runs = {label: _train(name, strategy, args.steps, device, args.quick)
                for label, strategy in (("single", None), ("naive", "naive"), ("spd", "spd"))}  # fmt: skip
        reference = runs["single"].pop("params")
        entry: dict[str, Any] = {"single": runs["single"]}
        for label in ("naive", "spd"):
            params = runs[label].pop("params")
            runs[label]["max_abs_param_diff_vs_single"] = float((params - reference).abs().max())
            runs[label]["iteration_vs_single"] = runs[label]["iteration_s"] / runs["single"]["iteration_s"]
            entry[label] = runs[label]
        report["workloads"][name] = entry
        print(name, json.dumps(entry, indent=1), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")  # partial results survive a timeout
    sizes = [64, 128, 256] if args.quick else [256, 512, 1024, 2048, 4096]
    report["eigh_seconds"] = _eigh_seconds(device, sizes)
    report["total_s"] = time.perf_counter() - total
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["eigh_seconds"]), f"total {report['total_s']:.1f}s", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
