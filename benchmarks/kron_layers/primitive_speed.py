"""Speed of ``kron_matvec`` vs the materialised dense matmul as the matrix grows: where is the crossover?

For ``W = A ⊗ B`` of size ``n x n`` and a batch of 64 vectors: dense ``x @ W.T`` (``W`` precomputed, ``n²``
multiply-adds per vector) vs :func:`kronfac.nn.kron_matvec` (``~n (√n_A + √n_B)``). Two factor families:
balanced ``A, B`` both ``√n x √n`` and unbalanced ``A`` ``4 x 4``. Forward, and forward + backward with
respect to the input and the factors (for the dense path, w.r.t. ``W``). Median ms, 1 CPU thread.

Run: ``python benchmarks/kron_layers/primitive_speed.py [--quick]``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch
from common import HERE, environment, median_ms, write_results

from kronfac.nn import kron_cost, kron_matvec

BATCH = 64


def measure(a_shape: tuple[int, int], b_shape: tuple[int, int], repeats: int, device: str) -> dict[str, Any]:
    a = torch.randn(*a_shape, device=device, requires_grad=True)
    b = torch.randn(*b_shape, device=device, requires_grad=True)
    w = torch.kron(a, b).detach().requires_grad_(True)
    x = torch.randn(BATCH, w.shape[1], device=device, requires_grad=True)
    cuda = device == "cuda"

    def dense_fwd() -> None:
        with torch.no_grad():
            x @ w.T

    def kron_fwd() -> None:
        with torch.no_grad():
            kron_matvec(a, b, x)

    def dense_train() -> None:
        (x @ w.T).sum().backward()

    def kron_train() -> None:
        kron_matvec(a, b, x).sum().backward()

    out = {"A": list(a_shape), "B": list(b_shape), "n": w.shape[0], "cost": kron_cost(a_shape, b_shape)}
    for name, fn in (("dense_fwd", dense_fwd), ("kron_fwd", kron_fwd), ("dense_fwdbwd", dense_train)):
        out[f"{name}_ms"] = median_ms(fn, repeats=repeats, warmup=2, cuda=cuda)
    out["kron_fwdbwd_ms"] = median_ms(kron_train, repeats=repeats, warmup=2, cuda=cuda)
    return out


def crossover(rows: list[dict[str, Any]], kind: str) -> int | None:
    """Smallest ``n`` from which on the Kronecker path is faster for every larger size measured."""
    for i, r in enumerate(rows):
        if all(s[f"kron_{kind}_ms"] < s[f"dense_{kind}_ms"] for s in rows[i:]):
            return r["n"]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the JSON and markdown")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = False  # compare like with like: plain float32 on both paths
    torch.manual_seed(0)
    t0 = time.perf_counter()
    cuda = args.device == "cuda"
    if args.quick:
        sizes = [16, 64, 256]
    elif cuda:
        sizes = [64, 256, 1024, 2304, 4096, 9216, 16384]
    else:
        sizes = [16, 64, 144, 256, 576, 1024, 2304, 4096]
    families: dict[str, list[dict[str, Any]]] = {"balanced": [], "A 4x4": []}
    for n in sizes:
        k = math.isqrt(n)
        repeats = 50 if cuda else (5 if n >= 4096 else 20)
        families["balanced"].append(measure((k, k), (k, k), repeats, args.device))
        families["A 4x4"].append(measure((4, 4), (n // 4, n // 4), repeats, args.device))
        print(f"n={n} done", flush=True)
    wall = time.perf_counter() - t0
    where = f"{torch.cuda.get_device_name()} (float32, TF32 off)" if cuda else "1 CPU thread"
    lines = [
        f"## Primitive: kron_matvec vs dense matmul ({'GPU' if cuda else 'CPU'})",
        "",
        f"`(A ⊗ B) x` for a batch of {BATCH} vectors, `A ⊗ B` of size n x n; dense uses the precomputed "
        f"n x n matrix. Median ms, {where}; fwd+bwd includes gradients w.r.t. the input and the weights "
        f"(factors for Kronecker). Run time {wall:.0f} s{' (--quick)' if args.quick else ''}.",
        "",
    ]
    env = environment() | ({"gpu": torch.cuda.get_device_name()} if cuda else {})
    payload: dict[str, Any] = {"environment": env, "batch": BATCH, "wall_s": wall, "families": {}}
    for family, rows in families.items():
        cross = {kind: crossover(rows, kind) for kind in ("fwd", "fwdbwd")}
        payload["families"][family] = {"rows": rows, "crossover_n": cross}
        lines += [
            f"### Factors: {family} (crossover: forward from n = {cross['fwd']}, "
            f"forward+backward from n = {cross['fwdbwd']})",
            "",
            "| n | A | B | dense fwd | kron fwd | speed-up | dense fwd+bwd | kron fwd+bwd | speed-up |",
            "|---:|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {r['n']} | {tuple(r['A'])} | {tuple(r['B'])} | {r['dense_fwd_ms']:.3f} | {r['kron_fwd_ms']:.3f} "
                f"| {r['dense_fwd_ms'] / r['kron_fwd_ms']:.1f}x | {r['dense_fwdbwd_ms']:.3f} | "
                f"{r['kron_fwdbwd_ms']:.3f} | {r['dense_fwdbwd_ms'] / r['kron_fwdbwd_ms']:.1f}x |"
            )
        lines.append("")
    md = "\n".join(lines)
    name = "primitive_speed" + ("_cuda" if cuda else "") + ("_quick" if args.quick else "")
    write_results(name, payload, md, args.out)
    print(md)


if __name__ == "__main__":
    main()
