"""KLD-WRM (Puiu 2022) vs K-FAC in the paper's setting, small: its MNIST CNN on scikit-learn digits upscaled to
28x28, K-FAC vs SO/Q/QE-KLD-WRM (plus K-FAC with the same low EMA decay as a control), 3 seeds, test accuracy and
loss per epoch and against training wall-clock.

Usage: ``python benchmarks/kldwrm/run.py [--quick] [--threads N] [--out DIR]``; writes ``results.json``,
``results.md`` and ``curves.png`` next to this file (or into ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import kronfac

HERE = Path(__file__).resolve().parent

#: shared K-FAC platform settings (the paper: damping 1e-2, weight decay 1e-3, no momentum, KL clip 0.1)
PLATFORM: dict[str, Any] = {
    "momentum": 0.0,
    "damping": 1e-2,
    "weight_decay": 1e-3,
    "kl_clip": 1e-1,
    "factor_every": 5,
    "inverse_every": 5,
}


def methods() -> dict[str, Callable[[nn.Module, float], torch.optim.Optimizer]]:
    def kfac(decay: float, correction: Callable[[], kronfac.KLDWRM] | None = None):
        def make(model: nn.Module, lr: float) -> torch.optim.Optimizer:
            rule = None if correction is None else correction()
            return kronfac.KFAC(model, lr=lr, factor_decay=decay, correction=rule, **PLATFORM)

        return make

    return {
        "kfac (ρ_F=0.95)": kfac(0.95),
        "kfac (ρ_F=0.33)": kfac(0.33),
        "so-kld-wrm (ρ=0.33)": kfac(0.33, lambda: kronfac.KLDWRM("so")),
        "q-kld-wrm (ρ=0.5)": kfac(0.5, lambda: kronfac.KLDWRM("q")),
        "qe-kld-wrm (ρ=0.5)": kfac(0.5, lambda: kronfac.KLDWRM("qe", inner_steps=3, networks=3)),
    }


class PaperCNN(nn.Module):
    """Puiu 2022's MNIST network: conv 1->5 k5, pool, conv 5->7 k5, pool, FC 112->30->10 (ReLU; no dropout)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 5, kernel_size=5)
        self.conv2 = nn.Conv2d(5, 7, kernel_size=5)
        self.fc1 = nn.Linear(7 * 16, 30)
        self.fc2 = nn.Linear(30, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def load_data(seed: int = 0) -> dict[str, torch.Tensor]:
    """Digits upscaled bilinearly to 28x28 and standardised with the training statistics; 1197/300/300 split."""
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(x))
    images = torch.tensor(x[order], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    images = F.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False)
    labels = torch.tensor(y[order])
    mean, std = images[600:].mean(), images[600:].std()
    images = (images - mean) / std
    return {"x_test": images[:300], "y_test": labels[:300], "x_val": images[300:600], "y_val": labels[300:600],
            "x_train": images[600:], "y_train": labels[600:]}  # fmt: skip


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    out = model(x)
    return float(F.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())


def train(make, lr: float, seed: int, epochs: int, data: dict[str, torch.Tensor], split: str, batch: int):
    torch.manual_seed(seed)
    model = PaperCNN()
    opt = make(model, lr)
    generator = torch.Generator().manual_seed(seed)
    n = len(data["x_train"])
    curve, step_ms, seconds = [], [], 0.0
    loss0, acc0 = evaluate(model, data[f"x_{split}"], data[f"y_{split}"])
    curve.append({"epoch": 0, "seconds": 0.0, "loss": loss0, "accuracy": acc0, "train_loss": None})
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n, generator=generator)
        losses = []
        for start in range(0, n - batch + 1, batch):
            idx = order[start : start + batch]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(data["x_train"][idx]), data["y_train"][idx])
            loss.backward()
            opt.step()
            elapsed = time.perf_counter() - t0
            seconds += elapsed
            step_ms.append(1e3 * elapsed)
            losses.append(loss.item())
        test_loss, acc = evaluate(model, data[f"x_{split}"], data[f"y_{split}"])
        curve.append({"epoch": epoch, "seconds": seconds, "loss": test_loss, "accuracy": acc,
                      "train_loss": statistics.fmean(losses)})  # fmt: skip
        if not np.isfinite(test_loss):
            break
    close = getattr(getattr(opt, "correction", None), "close", None)
    if close is not None:
        close()
    opt.close()  # type: ignore[attr-defined]
    return curve, step_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--method", type=int, default=None, help="run only this method (index) into a partial file")
    parser.add_argument("--merge", type=Path, default=None, help="merge the partial files of this folder into --out")
    args = parser.parse_args()
    if args.merge is not None:
        parts = [json.loads(p.read_text()) for p in sorted(args.merge.glob("partial_*.json"))]
        meta = dict(parts[0]["meta"], seconds=max(p["meta"]["seconds"] for p in parts), parallel=len(parts))
        results = {k: v for p in parts for k, v in p["methods"].items()}
        write(args.out, meta, {k: results[k] for k in methods() if k in results})
        return
    torch.set_num_threads(args.threads)
    epochs, sweep_epochs = (2, 1) if args.quick else (15, 5)
    seeds = [0] if args.quick else [0, 1, 2]
    lr_grid = [0.03, 0.1] if args.quick else [0.01, 0.03, 0.1, 0.3]
    batch = 64
    data = load_data()
    results: dict[str, Any] = {}
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for index, (name, make) in enumerate(methods().items()):
            if args.method is not None and index != args.method:
                continue
            sweep = []
            for lr in lr_grid:
                curve, _ = train(make, lr, 100, sweep_epochs, data, "val", batch)
                sweep.append({"lr": lr, "val_loss": curve[-1]["loss"], "val_accuracy": curve[-1]["accuracy"]})
            finite = [s for s in sweep if np.isfinite(s["val_loss"])]
            best = min(finite, key=lambda s: s["val_loss"])["lr"]
            runs = []
            for seed in seeds:
                curve, step_ms = train(make, best, seed, epochs, data, "test", batch)
                runs.append({"seed": seed, "curve": curve, "median_ms": statistics.median(step_ms)})
            results[name] = {"lr": best, "sweep": sweep, "runs": runs}
            print(name, best, [r["curve"][-1]["accuracy"] for r in runs], flush=True)
    device = f"CPU ({platform.machine()}, {os.cpu_count()} cores, shared)"
    meta = {"device": device, "threads": args.threads, "torch": torch.__version__,
            "epochs": epochs, "sweep_epochs": sweep_epochs, "seeds": seeds, "lr_grid": lr_grid, "batch": batch,
            "platform": PLATFORM, "quick": args.quick, "seconds": time.perf_counter() - started}  # fmt: skip
    if args.method is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"partial_{args.method}.json").write_text(json.dumps({"meta": meta, "methods": results}))
        return
    write(args.out, meta, results)


def write(out: Path, meta: dict[str, Any], results: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "methods": results}, indent=1))
    (out / "results.md").write_text(report(meta, results))
    plot(results, out / "curves.png")


def _mean(values: list[float]) -> float:
    return statistics.fmean(values)


def _std(values: list[float]) -> float:
    return statistics.pstdev(values) if len(values) > 1 else 0.0


def report(meta: dict[str, Any], results: dict[str, Any]) -> str:
    epochs = meta["epochs"]
    lines = [
        "# KLD-WRM vs K-FAC: the paper's MNIST CNN on upscaled digits",
        "",
        f"Generated by `benchmarks/kldwrm/run.py` on {meta['device']} ({meta['threads']} thread(s) per method, "
        f"{meta.get('parallel', 1)} method process(es) in parallel, torch {meta['torch']}) in {meta['seconds']:.0f} s. "
        "Puiu 2022's CNN (conv 1→5 k5, pool, conv 5→7 k5, pool, "
        "FC 112→30→10, no dropout) on scikit-learn digits upscaled to 28x28 (1197 train / 300 val / 300 test), "
        f"batch {meta['batch']}, {epochs} epochs, seeds {meta['seeds']}. Shared K-FAC platform: "
        f"`{meta['platform']}`. Each method's lr is picked from {meta['lr_grid']} by validation loss after "
        f"{meta['sweep_epochs']} epochs (seed 100). ρ_F is K-FAC's factor EMA decay; the KLD-WRM wake decay ρ is "
        "tied to it, as in the paper. Small data: differences of one or two test images are 0.3-0.7 points.",
        "",
        "## Final test metrics (mean ± std over seeds)",
        "",
        "| method | lr | test accuracy | test loss | best-epoch accuracy | median ms/step | train seconds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rec in results.items():
        finals = [r["curve"][-1] for r in rec["runs"]]
        best = [max(p["accuracy"] for p in r["curve"]) for r in rec["runs"]]
        acc, loss = [f["accuracy"] for f in finals], [f["loss"] for f in finals]
        lines.append(
            f"| {name} | {rec['lr']} | {100 * _mean(acc):.1f} ± {100 * _std(acc):.1f} | "
            f"{_mean(loss):.3f} ± {_std(loss):.3f} | {100 * _mean(best):.1f} | "
            f"{statistics.median(r['median_ms'] for r in rec['runs']):.1f} | "
            f"{_mean([f['seconds'] for f in finals]):.1f} |"
        )
    shown = sorted({1, 2, 3, 5, epochs // 2, epochs} & set(range(1, epochs + 1)))
    lines += ["", "## Test accuracy (%) and loss per epoch (mean over seeds)", ""]
    lines.append("| method | " + " | ".join(f"ep {e}" for e in shown) + " |")
    lines.append("|---|" + "---:|" * len(shown))
    for name, rec in results.items():
        cells = []
        for e in shown:
            pts = [r["curve"][e] for r in rec["runs"] if len(r["curve"]) > e]
            cells.append(f"{100 * _mean([p['accuracy'] for p in pts]):.1f} / {_mean([p['loss'] for p in pts]):.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: accuracy / loss. Curves against wall-clock: `curves.png` (right panel), raw: `results.json`."]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - optional
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, rec in results.items():
        length = min(len(r["curve"]) for r in rec["runs"])
        epochs = [rec["runs"][0]["curve"][i]["epoch"] for i in range(length)]
        acc = [_mean([r["curve"][i]["accuracy"] for r in rec["runs"]]) for i in range(length)]
        loss = [_mean([r["curve"][i]["loss"] for r in rec["runs"]]) for i in range(length)]
        secs = [_mean([r["curve"][i]["seconds"] for r in rec["runs"]]) for i in range(length)]
        axes[0].plot(epochs, acc, label=name)
        axes[1].plot(epochs, loss, label=name)
        axes[2].plot(secs, acc, label=name)
    axes[0].set(xlabel="epoch", ylabel="test accuracy", ylim=(0.5, 1.0))
    axes[1].set(xlabel="epoch", ylabel="test loss", yscale="log")
    axes[2].set(xlabel="training seconds", ylabel="test accuracy", ylim=(0.5, 1.0))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
