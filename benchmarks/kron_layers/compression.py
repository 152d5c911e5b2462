"""Compression study: Kronecker-product LSTM/GRU vs low-rank and magnitude pruning at equal size.

Thakker et al. (2019) claim 16-38x compression of RNN layers with small accuracy loss, beating pruning and
low-rank factorisation at equal parameter count, and faster inference. Here: an LSTM and a GRU classifier
(hidden 128, last hidden state -> linear head) on sklearn digits (8 rows of 8 pixels) and mnist1d (10 steps of
4 values). Methods, all on the same recurrent loop (:class:`kronfac.nn.StructuredRNN`) so that latency compares
the weight structure and nothing else:

- ``dense``: full weights.
- ``kron``: :class:`kronfac.nn.KronLSTM` / ``KronGRU`` trained from scratch, factor shapes picked so the whole
  recurrent layer is compressed about 16x / 38x.
- ``kron-nkp``: the trained dense model converted by the nearest Kronecker product, then fine-tuned.
- ``lowrank``: every weight ``U V`` with the rank that gives the same parameter count per matrix, from scratch.
- ``prune``: the trained dense model magnitude-pruned per matrix to the same number of nonzeros, then fine-tuned
  with the mask fixed (index storage not counted, in pruning's favour).

Learning rates: Adam, swept over ``LRS`` on seed 0 by validation accuracy, per method; seeds 1-2 reuse the pick.
Latency: median ms per forward of a batch of 64 test sequences, one thread, no grad.

Run: ``python benchmarks/kron_layers/compression.py [--quick]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import HERE, Split, digits_sequences, environment, median_ms, mnist1d_sequences, write_results
from torch import Tensor, nn

from kronfac.nn import KronGRU, KronLSTM, StructuredRNN
from kronfac.nn.factorize import KronShape, kron_shape_options, nearest_kronecker

GATES = {"LSTM": 4, "GRU": 3}
LRS = (3e-3, 1e-2, 3e-2)


@dataclass(frozen=True, kw_only=True)
class Config:
    hidden: int = 128
    epochs: dict[str, int]
    finetune_epochs: dict[str, int]
    batch: dict[str, int]
    seeds: tuple[int, ...] = (0, 1, 2)
    targets: tuple[float, ...] = (16.0, 38.0)
    latency_batch: int = 64


class LowRank(nn.Module):
    """``W = U V`` with ``U`` ``(out, r)``, ``V`` ``(r, in)``; init gives ``W`` entries variance ``1/(3 h)``."""

    def __init__(self, out_features: int, in_features: int, rank: int, fan: int) -> None:
        super().__init__()
        bound = math.sqrt(3.0) * (3.0 * fan * rank) ** -0.25
        self.u = nn.Parameter(torch.empty(out_features, rank).uniform_(-bound, bound))
        self.v = nn.Parameter(torch.empty(rank, in_features).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.v.T) @ self.u.T


class Masked(nn.Module):
    """Dense weight times a fixed 0/1 mask (gradients of pruned entries are zeroed by the mask)."""

    def __init__(self, weight: Tensor, keep: int) -> None:
        super().__init__()
        threshold = weight.abs().flatten().kthvalue(weight.numel() - keep + 1).values
        self.register_buffer("mask", (weight.abs() >= threshold).to(weight.dtype))
        self.weight = nn.Parameter(weight.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return x @ (self.weight * self.mask).T


def dense_factory(hidden: int):
    def make(name: str, out_features: int, in_features: int) -> nn.Module:
        layer = nn.Linear(in_features, out_features, bias=False)
        nn.init.uniform_(layer.weight, -1 / math.sqrt(hidden), 1 / math.sqrt(hidden))
        return layer

    return make


def layer_factors(mode: str, d_in: int, hidden: int, target: float) -> dict[str, KronShape]:
    """Shapes for ``weight_ih_l0`` and ``weight_hh_l0`` whose combined compression is closest to ``target``.

    Among pairs within 10% of the closest, the one with the highest reachable rank (relative to full) wins.
    """
    g = GATES[mode] * hidden
    dense = g * d_in + g * hidden
    pairs = []
    for oi in kron_shape_options(g, d_in):
        for oh in kron_shape_options(g, hidden):
            dist = abs(math.log(dense / (oi.params + oh.params) / target))
            rank = oi.max_rank / min(g, d_in) + oh.max_rank / min(g, hidden)
            pairs.append((dist, rank, oi, oh))
    best = min(p[0] for p in pairs)
    dist, _, oi, oh = max((p for p in pairs if p[0] <= best + math.log(1.1)), key=lambda p: (p[1], -p[0]))
    return {"weight_ih_l0": oi.shape, "weight_hh_l0": oh.shape}


def kron_params(shape: KronShape) -> int:
    (m1, n1), (m2, n2) = shape
    return m1 * n1 + m2 * n2


class SeqClassifier(nn.Module):
    def __init__(self, rnn: nn.Module, hidden: int, classes: int) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def recurrent_weight_params(model: SeqClassifier) -> int:
    """Nonzero weight entries of the recurrent layer (biases excluded: identical for every method)."""
    total = 0
    for name, p in model.rnn.named_parameters():
        if "bias_" in name:
            continue
        if name.endswith(".weight") and hasattr(model.rnn.get_submodule(name.rsplit(".", 1)[0]), "mask"):
            total += int(model.rnn.get_submodule(name.rsplit(".", 1)[0]).mask.sum())
        else:
            total += p.numel()
    return total


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def train(model: nn.Module, data: Split, *, lr: float, epochs: int, batch: int, seed: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    n = len(data.x_train)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch):
            idx = perm[i : i + batch]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        sched.step()
    return {
        "train_s": time.perf_counter() - t0,
        "val_acc": accuracy(model, data.x_val, data.y_val),
        "test_acc": accuracy(model, data.x_test, data.y_test),
    }


def build(method: str, mode: str, d_in: int, cfg: Config, classes: int, target: float | None) -> SeqClassifier:
    h = cfg.hidden
    if method == "dense":
        rnn: nn.Module = StructuredRNN(mode, d_in, h, batch_first=True, make_weight=dense_factory(h))  # type: ignore[arg-type]
    elif method == "kron":
        assert target is not None
        cls = KronLSTM if mode == "LSTM" else KronGRU
        rnn = cls(d_in, h, batch_first=True, factors=layer_factors(mode, d_in, h, target))
    elif method == "lowrank":
        assert target is not None
        shapes = layer_factors(mode, d_in, h, target)

        def make(name: str, out_features: int, in_features: int) -> nn.Module:
            rank = max(1, round(kron_params(shapes[name]) / (out_features + in_features)))
            return LowRank(out_features, in_features, rank, h)

        rnn = StructuredRNN(mode, d_in, h, batch_first=True, make_weight=make)  # type: ignore[arg-type]
    else:
        raise ValueError(f"Invalid method: {method}")
    return SeqClassifier(rnn, h, classes)


def from_dense(method: str, dense: SeqClassifier, mode: str, d_in: int, cfg: Config, target: float) -> SeqClassifier:
    """``kron-nkp`` (nearest Kronecker product) or ``prune`` (magnitude) from a trained dense model."""
    shapes = layer_factors(mode, d_in, cfg.hidden, target)
    model = copy.deepcopy(dense)
    rnn = model.rnn
    assert isinstance(rnn, StructuredRNN)
    if method == "kron-nkp":
        cls = KronLSTM if mode == "LSTM" else KronGRU
        kron = cls(d_in, cfg.hidden, batch_first=True, factors=shapes)
        with torch.no_grad():
            for name, shape in shapes.items():
                a, b, _ = nearest_kronecker(rnn.weights[name].weight, shape)
                kron.kron_weight(name).kron_a.copy_(a)
                kron.kron_weight(name).kron_b.copy_(b)
            for name, p in kron.named_parameters(recurse=False):
                p.copy_(getattr(rnn, name))
        model.rnn = kron
        return model
    for name, shape in shapes.items():
        rnn.weights[name] = Masked(rnn.weights[name].weight, kron_params(shape))
    return model


def latency(model: SeqClassifier, x: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return median_ms(lambda: model(x))


def run_task(dataset: str, data: Split, mode: str, cfg: Config, quick: bool) -> list[dict[str, Any]]:
    d_in = data.x_train.shape[-1]
    classes = data.num_classes
    epochs, ft_epochs = cfg.epochs[dataset], cfg.finetune_epochs[dataset]
    rows: list[dict[str, Any]] = []
    dense_models: dict[int, SeqClassifier] = {}
    lrs = LRS[:1] if quick else LRS

    batch = cfg.batch[dataset]

    def run(method: str, target: float | None, make, n_epochs: int) -> None:
        chosen, sweep = None, {}
        for seed in cfg.seeds:
            candidates = lrs if seed == cfg.seeds[0] else (chosen,)
            best = None
            for lr in candidates:
                torch.manual_seed(seed)
                model = make(seed)
                res = train(model, data, lr=lr, epochs=n_epochs, batch=batch, seed=seed)
                if seed == cfg.seeds[0]:
                    sweep[lr] = res["val_acc"]
                if best is None or res["val_acc"] > best[1]["val_acc"]:
                    best = (lr, res, model)
            assert best is not None
            chosen = best[0]
            lr, res, model = best
            if method == "dense":
                dense_models[seed] = model
            rows.append(
                {
                    "dataset": dataset,
                    "cell": mode,
                    "method": method,
                    "target": target,
                    "seed": seed,
                    "lr": lr,
                    "lr_sweep_val_acc": sweep if seed == cfg.seeds[0] else None,
                    "recurrent_weight_params": recurrent_weight_params(model),
                    "total_params": sum(p.numel() for p in model.parameters()),
                    **res,
                }
            )
        x_lat = data.x_test[: cfg.latency_batch]
        rows[-1]["latency_ms"] = latency(model, x_lat)

    run("dense", None, lambda s: build("dense", mode, d_in, cfg, classes, None), epochs)
    for target in cfg.targets:
        run("kron", target, lambda s, t=target: build("kron", mode, d_in, cfg, classes, t), epochs)
        run("lowrank", target, lambda s, t=target: build("lowrank", mode, d_in, cfg, classes, t), epochs)
        for method in ("kron-nkp", "prune"):
            run(
                method,
                target,
                lambda s, t=target, m=method: from_dense(m, dense_models[s], mode, d_in, cfg, t),
                ft_epochs,
            )
    # Reference: PyTorch's fused dense kernel on the same batch (not comparable loop-for-loop).
    fused_cls = nn.LSTM if mode == "LSTM" else nn.GRU
    fused = SeqClassifier(fused_cls(d_in, cfg.hidden, batch_first=True), cfg.hidden, classes)
    rows.append(
        {
            "dataset": dataset,
            "cell": mode,
            "method": f"dense (fused nn.{mode})",
            "target": None,
            "latency_ms": latency(fused, data.x_test[: cfg.latency_batch]),
            "recurrent_weight_params": recurrent_weight_params(fused),
        }
    )
    return rows


def latency_sweep(hiddens: tuple[int, ...], *, d_in: int = 32, steps: int = 10, batch: int = 64) -> list[dict]:
    """Forward latency of one LSTM layer (no training) as the hidden size grows."""
    out = []
    x = torch.randn(batch, steps, d_in)
    for h in hiddens:
        cfg = Config(hidden=h, epochs={}, finetune_epochs={}, batch={})
        models: dict[str, nn.Module] = {
            "dense (loop)": build("dense", "LSTM", d_in, cfg, 10, None),
            "dense (fused nn.LSTM)": SeqClassifier(nn.LSTM(d_in, h, batch_first=True), h, 10),
        }
        for target in (16.0, 38.0):
            models[f"kron {target:.0f}x"] = build("kron", "LSTM", d_in, cfg, 10, target)
            models[f"lowrank {target:.0f}x"] = build("lowrank", "LSTM", d_in, cfg, 10, target)
        for name, model in models.items():
            model.eval()
            with torch.no_grad():
                ms = median_ms(lambda m=model: m(x), repeats=7 if h >= 1024 else 15, warmup=2)
            out.append({"hidden": h, "method": name, "latency_ms": ms})
    return out


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["cell"], r["method"], r["target"]), []).append(r)
    out = []
    for (dataset, cell, method, target), rs in groups.items():
        dense = next(g for g in rows if g["dataset"] == dataset and g["cell"] == cell and g["method"] == "dense")
        accs = [r["test_acc"] for r in rs if "test_acc" in r]
        lat = [r["latency_ms"] for r in rs if "latency_ms" in r]
        out.append(
            {
                "dataset": dataset,
                "cell": cell,
                "method": method,
                "target": target,
                "recurrent_weight_params": rs[0]["recurrent_weight_params"],
                "compression": dense["recurrent_weight_params"] / rs[0]["recurrent_weight_params"],
                "test_acc_mean": statistics.fmean(accs) if accs else None,
                "test_acc_std": statistics.pstdev(accs) if len(accs) > 1 else None,
                "test_accs": accs,
                "latency_ms": lat[0] if lat else None,
                "lr": rs[0].get("lr"),
            }
        )
    return out


def findings(summary: list[dict[str, Any]]) -> list[str]:
    """Head-to-head counts of the Kronecker model (from scratch) against the baselines at equal size."""
    acc = {(s["dataset"], s["cell"], s["method"], s["target"]): s["test_acc_mean"] for s in summary}
    settings = sorted({(d, c, t) for d, c, m, t in acc if m == "kron"})
    out = []
    for other in ("lowrank", "prune", "kron-nkp"):
        wins = sum(acc[(d, c, "kron", t)] > acc[(d, c, other, t)] for d, c, t in settings)
        n = len(settings)
        out.append(f"- kron (from scratch) vs {other}: higher mean test accuracy in {wins} of {n} settings.")
    trained = [x for x in summary if x["lr"]]
    top = sum(x["lr"] == max(LRS) for x in trained)
    out.append(
        f"- learning rate: {top} of {len(trained)} methods picked the largest swept value {max(LRS):g}; "
        "a wider sweep or more epochs may still move every row (this is a small study)."
    )
    drops = [100 * (acc[(d, c, "dense", None)] - acc[(d, c, "kron", t)]) for d, c, t in settings]
    out.append(
        "- accuracy lost by kron vs dense, percentage points: "
        + ", ".join(f"{d} {c} {t:.0f}x: {x:.1f}" for (d, c, t), x in zip(settings, drops))
        + "."
    )
    return out


def markdown(
    summary: list[dict[str, Any]], sweep: list[dict[str, Any]], cfg: Config, wall_s: float, quick: bool, where: str
) -> str:
    lines = [
        "## Compression: Kronecker RNN vs low-rank vs pruning at equal size",
        "",
        f"Hidden {cfg.hidden}, one layer, Adam + cosine schedule, batch {cfg.batch}, epochs {cfg.epochs} "
        f"(fine-tune after conversion/pruning: {cfg.finetune_epochs}), seeds {list(cfg.seeds)}, lr swept over "
        f"{list(LRS[:1] if quick else LRS)} on the first seed by validation accuracy. Compression = dense recurrent "
        "weight entries / method's (biases excluded; pruning counts nonzeros only). Latency: median ms per forward "
        f"of {cfg.latency_batch} test sequences, 1 CPU thread, every method on the same Python recurrence loop; "
        "the fused nn.LSTM/nn.GRU row is PyTorch's C++ kernel for reference. Test accuracy in % (mean ± std). "
        f"Total run time {wall_s / 60:.1f} min ({where}){' (--quick)' if quick else ''}.",
        "",
        "| data | cell | method | target | rec. weights | compression | test acc % | latency ms | lr |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        acc = (
            f"{100 * s['test_acc_mean']:.1f} ± {100 * (s['test_acc_std'] or 0):.1f}"
            if s["test_acc_mean"] is not None
            else "—"
        )
        lat = f"{s['latency_ms']:.2f}" if s["latency_ms"] is not None else "—"
        target = f"{s['target']:.0f}x" if s["target"] else "—"
        lr = f"{s['lr']:g}" if s["lr"] else "—"
        lines.append(
            f"| {s['dataset']} | {s['cell']} | {s['method']} | {target} | {s['recurrent_weight_params']} | "
            f"{s['compression']:.1f}x | {acc} | {lat} | {lr} |"
        )
    lines += ["", *findings(summary)]
    hiddens = sorted({r["hidden"] for r in sweep})
    methods = list(dict.fromkeys(r["method"] for r in sweep))
    lines += [
        "",
        "### Latency as the LSTM grows (no training)",
        "",
        "One LSTM layer + head, 10 steps of 32 features, batch 64, median ms per forward, 1 CPU thread.",
        "",
        "| method | " + " | ".join(f"h={h}" for h in hiddens) + " |",
        "|---|" + "---:|" * len(hiddens),
    ]
    for m in methods:
        cells = [next(r["latency_ms"] for r in sweep if r["method"] == m and r["hidden"] == h) for h in hiddens]
        lines.append(f"| {m} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    return "\n".join(lines)


def remeasure_latency(payload: dict[str, Any]) -> None:
    """Measure every latency again (they do not depend on the trained values) and update ``payload`` in place.

    For runs whose training shared the cores with other jobs: latency is then taken on fresh models of the same
    structure, one after the other, with nothing else of this script running.
    """
    torch.set_num_threads(1)
    cfg = Config(**{k: tuple(v) if k == "seeds" else v for k, v in payload["config"].items()})
    loaders = {"digits": digits_sequences, "mnist1d": mnist1d_sequences}
    cache: dict[str, Split] = {}
    for entry in payload["summary"]:
        dataset, mode, method, target = entry["dataset"], entry["cell"], entry["method"], entry["target"]
        data = cache.setdefault(dataset, loaders[dataset]())
        d_in, classes = data.x_train.shape[-1], data.num_classes
        if method.startswith("dense (fused"):
            fused_cls = nn.LSTM if mode == "LSTM" else nn.GRU
            model = SeqClassifier(fused_cls(d_in, cfg.hidden, batch_first=True), cfg.hidden, classes)
        elif method in ("kron-nkp", "prune"):
            model = from_dense(method, build("dense", mode, d_in, cfg, classes, None), mode, d_in, cfg, target)
        else:
            model = build(method, mode, d_in, cfg, classes, target)
        ms = latency(model, data.x_test[: cfg.latency_batch])
        entry["latency_ms"] = ms
        for run in payload["runs"]:
            if (run["dataset"], run["cell"], run["method"], run["target"]) == (dataset, mode, method, target):
                if "latency_ms" in run:
                    run["latency_ms"] = ms
    payload["latency_sweep"] = latency_sweep((128, 256, 512, 1024))
    payload["environment"]["loadavg_at_end"] = list(os.getloadavg())
    payload["latency_remeasured"] = True


def _where(payload: dict[str, Any]) -> str:
    env = payload["environment"]
    return (
        f"{env['cpu_count']}-core {env['machine']} host, torch {env['torch']}, {env['jobs']} task(s) in parallel, "
        "1 thread each"
        + (
            f"; 1/5/15-min load average at the end {', '.join(f'{x:.1f}' for x in env['loadavg_at_end'])}"
            + (
                "; latencies re-measured after training with `--remeasure-latency`, nothing else of this script running"
                if payload.get("latency_remeasured")
                else ": other jobs shared the cores, so latencies carry that noise"
            )
            if "loadavg_at_end" in env
            else ""
        )
    )


def _task(spec: tuple[str, str, Config, bool]) -> list[dict[str, Any]]:
    dataset, mode, cfg, quick = spec
    torch.set_num_threads(1)
    data = {"digits": digits_sequences, "mnist1d": mnist1d_sequences}[dataset]()
    t1 = time.perf_counter()
    rows = run_task(dataset, data, mode, cfg, quick)
    print(f"{dataset} {mode}: {time.perf_counter() - t1:.0f}s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 lr, few epochs (smoke test)")
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist1d"])
    parser.add_argument("--cells", nargs="+", default=["LSTM", "GRU"])
    parser.add_argument("--jobs", type=int, default=2, help="(data set, cell) tasks in parallel, 1 thread each")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the JSON and markdown")
    parser.add_argument("--render", action="store_true", help="only rebuild the markdown from the saved JSON")
    parser.add_argument(
        "--remeasure-latency", action="store_true", help="measure latencies of the saved run again, alone"
    )
    args = parser.parse_args()
    if args.remeasure_latency:
        saved = json.loads((args.out / "compression.json").read_text())
        remeasure_latency(saved)
        (args.out / "compression.json").write_text(json.dumps(saved, indent=2) + "\n")
        args.render = True
    if args.render:
        saved = json.loads((args.out / "compression.json").read_text())
        cfg_saved = Config(**{k: tuple(v) if k == "seeds" else v for k, v in saved["config"].items()})
        md = markdown(saved["summary"], saved["latency_sweep"], cfg_saved, saved["wall_s"], False, _where(saved))
        write_results("compression", saved, md, args.out)
        print(md)
        return
    torch.set_num_threads(1)
    if args.quick:
        cfg = Config(
            epochs={"digits": 2, "mnist1d": 1},
            finetune_epochs={"digits": 1, "mnist1d": 1},
            batch={"digits": 64, "mnist1d": 128},
            seeds=(0,),
        )
    else:
        cfg = Config(
            epochs={"digits": 20, "mnist1d": 20},
            finetune_epochs={"digits": 8, "mnist1d": 8},
            batch={"digits": 64, "mnist1d": 128},
        )
    t0 = time.perf_counter()
    tasks = [(dataset, mode, cfg, args.quick) for dataset in args.datasets for mode in args.cells]
    if args.jobs > 1:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            results = pool.map(_task, tasks)
    else:
        results = [_task(t) for t in tasks]
    rows: list[dict[str, Any]] = [row for result in results for row in result]
    sweep = latency_sweep((128, 256) if args.quick else (128, 256, 512, 1024))
    wall = time.perf_counter() - t0
    summary = summarize(rows)
    payload = {
        "config": asdict(cfg),
        "lrs": list(LRS),
        "environment": environment()
        | {"cpu_count": os.cpu_count(), "jobs": args.jobs, "loadavg_at_end": list(os.getloadavg())},
        "wall_s": wall,
        "summary": summary,
        "latency_sweep": sweep,
        "runs": rows,
    }
    md = markdown(summary, sweep, cfg, wall, args.quick, _where(payload))
    write_results("compression" + ("_quick" if args.quick else ""), payload, md, args.out)
    print(md)


if __name__ == "__main__":
    main()
