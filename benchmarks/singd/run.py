"""SINGD benchmarks (issue 3): optimizer-state memory per structure, speed against the ``singd`` package, and a
bfloat16 study. Writes ``results.json`` and ``results.md`` next to this file.

SINGD: Lin, Dangel, Eschenhagen et al., "Structured Inverse-Free Natural Gradient Descent", ICML 2024.

    python benchmarks/singd/run.py                   # all three studies (a few minutes on 2 CPU cores)
    python benchmarks/singd/run.py --study memory    # one of: memory, speed, bf16
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kronfac.bench.models import mlp, small_cnn
from kronfac.bench.tasks import Task, get_task
from kronfac.optim.kfac import KFAC
from kronfac.optim.singd import SINGD

HERE = Path(__file__).parent
warnings.filterwarnings("ignore", message="kronfac.*first-order update")
warnings.filterwarnings("ignore", message=".*naive implementation.*")

#: The structures of the memory study, with the structural parameters of the reference package's classes.
STRUCTURES: dict[str, Any] = {
    "dense": "dense",
    "diagonal": "diagonal",
    "block_diagonal(8)": ("block_diagonal", {"block_size": 8}),
    "block_diagonal(30)": ("block_diagonal", {"block_size": 30}),
    "lower_triangular": "lower_triangular",
    "hierarchical(15,15)": ("hierarchical", {"k1": 15, "k2": 15}),
    "toeplitz": "toeplitz",
    "lower_toeplitz": "lower_toeplitz",
}
KFAC_OPTIONS: dict[str, Any] = {"damping": 1e-3, "factor_every": 10, "inverse_every": 10, "kl_clip": 1e-3}


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor reachable from ``optimizer.state_dict()`` (shared storage counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def walk(obj: Any) -> None:
        nonlocal total
        if isinstance(obj, Tensor):
            key = (obj.data_ptr(), obj.numel())
            if key not in seen:
                seen.add(key)
                total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            for value in obj.values():
                walk(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                walk(value)

    walk(optimizer.state_dict())
    return total


def one_step(model: nn.Module, optimizer: torch.optim.Optimizer, task: Task, x: Tensor, y: Tensor) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = task.loss(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.item()


# ---------------------------------------------------------------------------------------------- memory study
def memory_study() -> dict[str, Any]:
    """Optimizer-state bytes after one step on each bench model, per method."""
    out: dict[str, Any] = {}
    for name in ("mlp-digits", "mlp-mnist1d", "cnn-digits", "charlm"):
        task = get_task(name)
        split = task.load()
        x, y = split.x_train[: task.batch_size], split.y_train[: task.batch_size]
        makers: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
            "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
            "kfac": lambda m, o=task.curvature_options: KFAC(m, lr=0.1, **KFAC_OPTIONS, **o),
            "ikfac (dense)": lambda m, o=task.curvature_options: SINGD(m, kfac_like=True, **o),
        }
        for label, spec in STRUCTURES.items():
            makers[f"singd {label}"] = lambda m, s=spec, o=task.curvature_options: SINGD(m, structures=(s, s), **o)
        row: dict[str, Any] = {}
        for method, make in makers.items():
            torch.manual_seed(0)
            model = task.build(split)
            optimizer = make(model)
            one_step(model, optimizer, task, x, y)
            row[method] = state_bytes(optimizer)
        row["params"] = sum(p.numel() for p in task.build(split).parameters())
        out[name] = row
        print(f"memory {name}: " + ", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return out


# ----------------------------------------------------------------------------------------------- speed study
def _time_steps(model: nn.Module, optimizer: Any, x: Tensor, y: Tensor, steps: int) -> list[float]:
    """Seconds per full step; ``optimizer=None`` times the floor: the same zero_grad, forward and backward."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        if optimizer is None:
            model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
        else:
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        times.append(time.perf_counter() - start)
    return times


#: The speed study's settings: structure label -> (kronfac spec, singd spec, kfac_like).
SPEED_STRUCTURES: dict[str, tuple[Any, str, bool]] = {
    "dense": ("dense", "dense", False),
    "dense (IKFAC)": ("dense", "dense", True),
    "diagonal": ("diagonal", "diagonal", False),
    "block_diagonal(30)": (("block_diagonal", {"block_size": 30}), "block30diagonal", False),
    "hierarchical(15,15)": (("hierarchical", {"k1": 15, "k2": 15}), "hierarchical15_15", False),
    "lower_toeplitz": ("lower_toeplitz", "triltoeplitz", False),
}
SPEED_ROUNDS, SPEED_STEPS, SPEED_WARMUP = 8, 10, 3


def speed_study(rounds: int = SPEED_ROUNDS, steps_per_round: int = SPEED_STEPS) -> dict[str, Any]:
    """Median ms/step of kronfac.SINGD, singd's SINGD and the floor (forward + backward alone) on the same model,
    data and structure, in interleaved rounds; the optimizer-only ratio is (step - floor) / (singd step - floor)."""
    from singd.optim.optimizer import SINGD as ReferenceSINGD

    g = torch.Generator().manual_seed(0)
    setups = {
        "mlp 40-256-256-10, batch 128": (lambda: mlp([40, 256, 256, 10]), torch.randn(128, 40, generator=g)),
        "cnn (2 conv + linear) 8x8, batch 64": (lambda: small_cnn(), torch.randn(64, 64, generator=g)),
    }
    out: dict[str, Any] = {}
    for setup, (build, x) in setups.items():
        y = torch.randint(0, 10, (x.shape[0],), generator=g)
        for label, (spec, ref_spec, kfac_like) in SPEED_STRUCTURES.items():
            if setup.startswith("cnn") and label not in ("dense", "diagonal"):
                continue
            for T in (1, 10):
                hyper = {"lr": 1e-3, "momentum": 0.9, "damping": 1e-3, "lr_cov": 1e-2, "kfac_like": kfac_like}
                hyper["alpha1"] = 0.0 if kfac_like else 0.5
                torch.manual_seed(0)
                ours_model, ref_model, floor_model = build(), build(), build()
                ref_model.load_state_dict(ours_model.state_dict())
                floor_model.load_state_dict(ours_model.state_dict())
                ours = SINGD(ours_model, factor_every=T, structures=(spec, spec), **hyper)
                runs: dict[str, tuple[nn.Module, Any]] = {"ours": (ours_model, ours), "floor": (floor_model, None)}
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ref = ReferenceSINGD(
                        ref_model, T=T, structures=(ref_spec, ref_spec), warn_unsupported=False, **hyper
                    )
                    runs["ref"] = (ref_model, ref)
                    times: dict[str, list[float]] = {name: [] for name in runs}
                    for model, optimizer in runs.values():
                        _time_steps(model, optimizer, x, y, SPEED_WARMUP)
                    for _ in range(rounds):  # interleave so that machine load hits all three alike
                        for name, (model, optimizer) in runs.items():
                            times[name] += _time_steps(model, optimizer, x, y, steps_per_round)
                ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
                mean = {name: 1e3 * statistics.fmean(t) for name, t in times.items()}
                key = f"{setup} | {label} | T={T}"
                out[key] = {
                    "kronfac_ms": ms["ours"],
                    "singd_ms": ms["ref"],
                    "floor_ms": ms["floor"],
                    "kronfac_mean_ms": mean["ours"],
                    "singd_mean_ms": mean["ref"],
                    "floor_mean_ms": mean["floor"],
                    "ratio": ms["ours"] / ms["ref"],
                    "optimizer_ratio": (ms["ours"] - ms["floor"]) / (ms["ref"] - ms["floor"]),
                    "mean_ratio": mean["ours"] / mean["ref"],
                    "kronfac_state_bytes": ours.state_bytes(),
                    "singd_state_bytes": state_bytes(ref),
                }
                print(
                    f"speed {key}: {ms['ours']:.2f} ms vs {ms['ref']:.2f} ms, floor {ms['floor']:.2f} "
                    f"({out[key]['ratio']:.2f}x, optimizer only {out[key]['optimizer_ratio']:.2f}x)",
                    flush=True,
                )
    return out


# ------------------------------------------------------------------------------------------------ bf16 study
BF16_TASKS = {"mlp-digits": 150, "charlm": 60}
LR_GRIDS = {
    "adamw": (1e-3, 3e-3, 1e-2),
    "kfac": (0.03, 0.1, 0.3),
    "singd dense": (0.03, 0.1, 0.3),
    "singd diagonal": (0.03, 0.1, 0.3),
}
#: SINGD settings of the bf16 study: T = 5 and β1 = 0.02 so that K and C move within the short CPU budgets, and
#: λ = 1e-2 (with λ = 1e-3 and β1 = 0.05 SINGD diverged on mlp-digits at every lr of the grid, in fp32 too).
SINGD_BF16_OPTIONS: dict[str, Any] = {"lr_cov": 2e-2, "damping": 1e-2, "factor_every": 5}


def _make(method: str, model: nn.Module, lr: float, task: Task) -> torch.optim.Optimizer:
    options = task.curvature_options
    if method == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr)
    if method == "kfac":
        return KFAC(model, lr=lr, **KFAC_OPTIONS, **options)
    structure = method.split()[1]
    return SINGD(model, lr=lr, structures=(structure, structure), **SINGD_BF16_OPTIONS, **options)


def _train(method: str, task: Task, lr: float, dtype: torch.dtype, steps: int) -> dict[str, Any]:
    split = task.load()
    torch.manual_seed(0)
    model = task.build(split).to(dtype)
    optimizer = _make(method, model, lr, task)
    g = torch.Generator().manual_seed(0)
    losses: list[float] = []
    status = "ok"
    for _ in range(steps):
        idx = torch.randint(0, len(split.x_train), (task.batch_size,), generator=g)
        x = split.x_train[idx]
        x = x.to(dtype) if x.is_floating_point() else x
        try:
            loss = one_step(model, optimizer, task, x, split.y_train[idx])
        except FloatingPointError as exc:
            status = f"stopped: {str(exc)[:60]}"
            break
        losses.append(loss)
        if not math.isfinite(loss):
            status = "diverged (non-finite loss)"
            break
    x_val = split.x_val.to(dtype) if split.x_val.is_floating_point() else split.x_val
    val_loss, val_acc = task.evaluate(model, x_val, split.y_val) if status == "ok" else (math.nan, math.nan)
    tail = losses[-10:] if losses else [math.nan]
    return {"status": status, "train_loss_last10": sum(tail) / len(tail), "val_loss": val_loss, "val_acc": val_acc}


def bf16_study() -> dict[str, Any]:
    """Per task: a 3-point lr sweep in fp32 (val loss), then fp32 and pure-bf16 runs at the chosen lr."""
    out: dict[str, Any] = {}
    for name, steps in BF16_TASKS.items():
        task = get_task(name)
        record: dict[str, Any] = {"steps": steps, "batch_size": task.batch_size, "methods": {}}
        for method, grid in LR_GRIDS.items():
            sweep = {lr: _train(method, task, lr, torch.float32, steps)["val_loss"] for lr in grid}
            finite = {lr: v for lr, v in sweep.items() if math.isfinite(v)}
            lr = min(finite, key=finite.__getitem__) if finite else grid[0]
            runs = {
                str(dtype).split(".")[1]: _train(method, task, lr, dtype, steps)
                for dtype in (torch.float32, torch.bfloat16)
            }
            record["methods"][method] = {"lr": lr, "sweep_val_loss": {str(k): v for k, v in sweep.items()}, **runs}
            print(f"bf16 {name} {method} lr={lr}: {runs}", flush=True)
        out[name] = record
    return out


# -------------------------------------------------------------------------------------------------- report
def _kib(n: int) -> str:
    return f"{n / 1024:.1f}"


def render(results: dict[str, Any]) -> str:
    lines = ["# SINGD benchmarks", "", f"Generated by `benchmarks/singd/run.py` on {results['machine']}.", ""]
    if "memory" in results:
        mem = results["memory"]
        tasks = list(mem)
        methods = [m for m in mem[tasks[0]] if m != "params"]
        lines += [
            "## Optimizer-state memory per structure",
            "",
            "KiB of every tensor in `optimizer.state_dict()` after one step (float32), and the ratio to AdamW / "
            "K-FAC (factors + eigendecompositions + momentum). SINGD's state is K, C, m_K, m_C of every layer plus "
            "the momentum buffer; IKFAC keeps no m_K, m_C (α1 = 0); Embedding layers always keep a diagonal K. "
            "The K Kᵀ, C Cᵀ that `cache_outer` keeps between updates are derived, not in the state_dict, and not "
            "counted here (`SINGD.state_bytes()` counts them; the speed study below lists both packages' state).",
            "",
            "| method | " + " | ".join(f"{t} KiB | ×AdamW | ×KFAC" for t in tasks) + " |",
            "| --- | " + " | ".join("--- | --- | ---" for _ in tasks) + " |",
        ]
        for m in methods:
            cells = [
                f"{_kib(mem[t][m])} | {mem[t][m] / mem[t]['adamw']:.2f} | {mem[t][m] / mem[t]['kfac']:.2f}"
                for t in tasks
            ]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
        for s in ("diagonal", "block_diagonal(8)", "block_diagonal(30)"):
            met = [t for t in tasks if mem[t][f"singd {s}"] <= mem[t]["adamw"]]
            lines.append(
                f"- goal SINGD {s} at most AdamW's state: met on {len(met)} of {len(tasks)} models ({', '.join(met)})."
            )
        lines.append("")
    if "speed" in results:
        speed = results["speed"]
        ratios = [v["ratio"] for v in speed.values()]
        opt_ratios = [v["optimizer_ratio"] for v in speed.values()]
        lines += [
            "## Speed against the `singd` package",
            "",
            "Median ms per full training step (zero_grad, forward, backward, optimizer step) of `kronfac.SINGD` and "
            "PyPI `singd`'s `SINGD`, same model, data, structure and hyperparameters, and of the floor: the same "
            "zero_grad, forward and backward with no optimizer. "
            f"{SPEED_ROUNDS} interleaved rounds (kronfac, singd, floor) of {SPEED_STEPS} steps after {SPEED_WARMUP} "
            "warm-up steps, CPU, 1 thread, subnormals flushed. The box is shared with other jobs and was loaded "
            "during the run: compare the ratios (taken within one run), not the absolute times. T is the update "
            "interval of the factors (with T = 10 the median is a step without an update; the mean includes them). "
            "Ratio: kronfac / singd step time; optimizer only: (kronfac - floor) / (singd - floor). State: bytes of "
            "optimizer state, kronfac's `state_bytes()` (with the kept `K Kᵀ`, `C Cᵀ`) and every tensor of singd's "
            "`state_dict()`. `dense (IKFAC)` is `kfac_like=True` (α1 = 0).",
            "",
            "| model | structure | T | kronfac ms | singd ms | floor ms | ratio | optimizer only | mean ratio "
            "| kronfac state KiB | singd state KiB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for key, v in speed.items():
            model, structure, T = key.split(" | ")
            lines.append(
                f"| {model} | {structure} | {T[2:]} | {v['kronfac_ms']:.2f} | {v['singd_ms']:.2f} "
                f"| {v['floor_ms']:.2f} | {v['ratio']:.2f} | {v['optimizer_ratio']:.2f} | {v['mean_ratio']:.2f} "
                f"| {_kib(v['kronfac_state_bytes'])} | {_kib(v['singd_state_bytes'])} |"
            )
        lines += [
            "",
            f"Full step: median ratio {statistics.median(ratios):.2f}, worst {max(ratios):.2f}; goal at most 0.8x: "
            f"met in {sum(r <= 0.8 for r in ratios)} of {len(ratios)} settings. Optimizer only: median ratio "
            f"{statistics.median(opt_ratios):.2f}, worst {max(opt_ratios):.2f}; at most 0.8x in "
            f"{sum(r <= 0.8 for r in opt_ratios)} of {len(opt_ratios)} settings.",
            "",
        ]
    if "bf16" in results:
        lines += [
            "## bfloat16 study",
            "",
            "Each method's lr is the best of a 3-point sweep (fp32, same steps, validation loss); the same lr is "
            "then run in fp32 and in pure bfloat16 (parameters, inputs and optimizer state in bf16). Final numbers: "
            "mean training loss of the last 10 steps and validation loss/accuracy. Small budgets (CPU). K-FAC: factors "
            "and inverses every 10 steps; SINGD: T = 5, β1 = 0.02, λ = 1e-2 (with λ = 1e-3 and β1 = 0.05 it diverged "
            "on mlp-digits at every lr of the grid, in fp32 as well; with the paper's β1 = 1e-2, T = 10 its K and C "
            "barely move in 60 steps).",
            "",
            "| task (steps) | method | lr | fp32 train loss | bf16 train loss | fp32 val loss | bf16 val loss "
            "| fp32 val acc | bf16 val acc | fp32 status | bf16 status |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for task, record in results["bf16"].items():
            for method, r in record["methods"].items():
                f32, b16 = r["float32"], r["bfloat16"]
                lines.append(
                    f"| {task} ({record['steps']}) | {method} | {r['lr']:g} | {f32['train_loss_last10']:.3f} "
                    f"| {b16['train_loss_last10']:.3f} | {f32['val_loss']:.3f} | {b16['val_loss']:.3f} "
                    f"| {f32['val_acc']:.3f} | {b16['val_acc']:.3f} | {f32['status']} | {b16['status']} |"
                )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--study", choices=["memory", "speed", "bf16", "all"], default="all")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # subnormal K entries would time the FPU's slow path, not the method
    path = HERE / "results.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    results["machine"] = f"{platform.processor() or platform.machine()}, torch {torch.__version__}"
    studies = {"memory": memory_study, "speed": speed_study, "bf16": bf16_study}
    for name, study in studies.items():
        if args.study in (name, "all"):
            start = time.perf_counter()
            results[name] = study()
            results[f"{name}_seconds"] = time.perf_counter() - start
    path.write_text(json.dumps(results, indent=1))
    (HERE / "results.md").write_text(render(results))


if __name__ == "__main__":
    main()
