"""Adapter study: KronA variants vs PEFT's LoRA and LoKr vs full fine-tuning at equal trainable budgets.

KronA (Edalati et al. 2022) claims to beat LoRA at an equal number of trainable parameters. Here a residual MLP
(stem 40->128, two blocks ``x + FFN(x)`` with ``FFN = Linear(128,128) GELU Linear(128,128)``, head) is
pretrained on mnist1d classes 0-4 and fine-tuned on classes 5-9 (600 training samples, a new head). Every
method trains the new head; the rest is frozen except the method's own parameters:

- ``head only``: linear probe (lower reference); ``full``: every parameter (upper reference).
- ``LoRA`` / ``LoKr``: the PyPI ``peft`` package (``LoraConfig`` / ``LoKrConfig``) on the four FFN Linear layers;
  LoKr in its usual form (``w1 ⊗ (w2_a w2_b)``, low-rank ``w2``), plus once with a full ``w2`` at KronA's shapes,
  where it is the same model as KronA (a cross-check of the two implementations).
- ``KronA`` (:func:`kronfac.nn.add_kron_adapters`, ``variant="krona"``) on the same four layers.
- ``KronA^B`` / ``KronA^B_res``: one adapter parallel to each FFN block (two adapters, larger factors).

Two budgets: ~1.0-1.3k and ~4.1k adapter parameters (exact counts in the table; head excluded). Adam, cosine
schedule, lr swept over ``LRS`` on seed 0 by validation accuracy, 3 seeds. Run:
``python benchmarks/kron_layers/finetune_adapters.py [--quick]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from common import HERE, environment, mnist1d_arrays, write_results
from torch import Tensor, nn

from kronfac.nn import add_kron_adapters

LRS = (1e-3, 3e-3, 1e-2)
WIDTH = 128


@dataclass(frozen=True, kw_only=True)
class Config:
    pretrain_epochs: int = 40
    finetune_epochs: int = 40
    finetune_train: int = 600
    batch: int = 64
    seeds: tuple[int, ...] = (0, 1, 2)


@dataclass(frozen=True, kw_only=True)
class Data:
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ffn = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.ffn(x)


class MLP(nn.Module):
    def __init__(self, d_in: int = 40, width: int = WIDTH, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(d_in, width), nn.GELU())
        self.blocks = nn.Sequential(Block(width), Block(width))
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


def tasks(cfg: Config) -> tuple[Data, Data]:
    """Task A: classes 0-4 (all samples). Task B: classes 5-9 relabelled 0-4, ``finetune_train`` samples."""
    x, y, xt, yt = mnist1d_arrays()
    mean, std = x.mean(), x.std()

    def t(a: np.ndarray) -> Tensor:
        return torch.tensor((a - mean) / std, dtype=torch.float32)

    rng = np.random.default_rng(0)
    out = []
    for lo, n_train in ((0, None), (5, cfg.finetune_train)):
        idx = rng.permutation(np.flatnonzero((y >= lo) & (y < lo + 5)))
        n_val = 400
        val, train = idx[:n_val], idx[n_val:]
        if n_train is not None:
            train = train[:n_train]
        test = np.flatnonzero((yt >= lo) & (yt < lo + 5))
        out.append(
            Data(
                x_train=t(x[train]),
                y_train=torch.tensor(y[train] - lo),
                x_val=t(x[val]),
                y_val=torch.tensor(y[val] - lo),
                x_test=t(xt[test]),
                y_test=torch.tensor(yt[test] - lo),
            )
        )
    return out[0], out[1]


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def train(model: nn.Module, data: Data, *, lr: float, epochs: int, batch: int, seed: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
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
            opt.step()
        sched.step()
    return {
        "train_s": time.perf_counter() - t0,
        "val_acc": accuracy(model, data.x_val, data.y_val),
        "test_acc": accuracy(model, data.x_test, data.y_test),
    }


FFN_LINEARS = ["blocks.0.ffn.0", "blocks.0.ffn.2", "blocks.1.ffn.0", "blocks.1.ffn.2"]
FFN_BLOCKS = ["blocks.0.ffn", "blocks.1.ffn"]


def _fresh_head(model: MLP, seed: int) -> MLP:
    model = copy.deepcopy(model)
    torch.manual_seed(1000 + seed)
    model.head = nn.Linear(WIDTH, 5)
    return model


def _peft(model: MLP, config: Any) -> nn.Module:
    from peft import get_peft_model

    wrapped = get_peft_model(model, config)
    for name, p in wrapped.named_parameters():
        if ".head." in f".{name}":
            p.requires_grad_(True)
    return wrapped


def methods(budget: str) -> dict[str, Callable[[MLP], nn.Module]]:
    """Method name -> function turning the pretrained model (fresh head) into the model to fine-tune."""
    from peft import LoKrConfig, LoraConfig

    small = budget == "small"
    # Per FFN Linear (128 x 128): KronA A (8x16) ⊗ B (16x8) = 256 = LoRA r=1 (small); (4x4) ⊗ (32x32) = 1040
    # vs LoRA r=4 = 1024 (large). Block adapters: two instead of four, so larger factors.
    krona: Any = ((8, 16), (16, 8)) if small else 4
    lora_r = 1 if small else 4
    # LoKr with a low-rank w2 (its usual form): w1 (4x4) + rank-5 w2 (32x32) = 336; w1 (2x2) + rank-8 w2 (64x64)
    # = 1028. With a full w2 LoKr is KronA (same shapes, same init, same scale): the "full w2" row checks that.
    lokr = {"r": 5, "alpha": 5, "decompose_factor": 4} if small else {"r": 8, "alpha": 8, "decompose_factor": 2}
    block = ((8, 4), (16, 32)) if small else ((2, 4), (64, 32))

    def head_only(m: MLP) -> nn.Module:
        for name, p in m.named_parameters():
            p.requires_grad_(name.startswith("head."))
        return m

    def kron(variant: str, targets: list[str], factors: Any) -> Callable[[MLP], nn.Module]:
        def make(m: MLP) -> nn.Module:
            add_kron_adapters(m, target_modules=targets, factors=factors, variant=variant, modules_to_save=["head"])  # type: ignore[arg-type]
            return m

        return make

    return {
        "LoRA (peft)": lambda m: _peft(m, LoraConfig(r=lora_r, lora_alpha=lora_r, target_modules=FFN_LINEARS)),
        "LoKr (peft)": lambda m: _peft(m, LoKrConfig(target_modules=FFN_LINEARS, **lokr)),
        "LoKr (peft, full w2)": lambda m: _peft(m, LoKrConfig(target_modules=FFN_LINEARS, r=8, alpha=8)),
        "KronA": kron("krona", FFN_LINEARS, krona),
        "KronA (LoKr's full-w2 shapes)": kron("krona", FFN_LINEARS, 8),
        "KronA^B": kron("krona_block", FFN_BLOCKS, block),
        "KronA^B_res": kron("krona_block_res", FFN_BLOCKS, block),
        "head only": head_only,
    }


def full(m: MLP) -> nn.Module:
    for p in m.parameters():
        p.requires_grad_(True)
    return m


def adapter_params(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".head." not in f".{n}")


def findings(summary: list[dict[str, Any]]) -> list[str]:
    acc = {(x["method"], x["budget"]): 100 * x["test_acc_mean"] for x in summary}
    out = []
    for budget in ("small", "large"):
        if ("KronA", budget) in acc and ("LoRA (peft)", budget) in acc:
            k, lo = acc[("KronA", budget)], acc[("LoRA (peft)", budget)]
            best = max((a, m) for (m, b), a in acc.items() if b == budget)
            out.append(
                f"- {budget} budget: KronA {k:.1f}% vs LoRA {lo:.1f}% ({k - lo:+.1f} points); best adapter "
                f"{best[1]} {best[0]:.1f}%; full fine-tuning {acc[('full fine-tuning', '-')]:.1f}%."
            )
    pair = (acc.get(("LoKr (peft, full w2)", "small")), acc.get(("KronA (LoKr's full-w2 shapes)", "small")))
    if None not in pair:
        same = "the same" if abs(pair[0] - pair[1]) < 1e-9 else "different"
        out.append(
            f"- cross-check: PEFT's LoKr with a full w2 and KronA at the same shapes give {same} accuracy "
            f"({pair[0]:.1f}% vs {pair[1]:.1f}%): same parameterisation, same init, same scale."
        )
    return out


def markdown(payload: dict[str, Any]) -> str:
    cfg, pre, summary, quick = payload["config"], payload["pretrain"], payload["summary"], payload.get("quick", False)
    total = sum(p.numel() for p in MLP().parameters())
    lines = [
        "## Adapters: KronA vs LoRA / LoKr (peft) vs full fine-tuning",
        "",
        f"Residual MLP ({total} parameters) pretrained on mnist1d classes 0-4 (test acc "
        f"{100 * pre['test_acc']:.1f}%), fine-tuned on classes 5-9 with {cfg['finetune_train']} training samples and "
        f"a new head ({WIDTH * 5 + 5} parameters, trained by every method, not counted as adapter parameters). "
        f"Adam + cosine, {cfg['finetune_epochs']} epochs, batch {cfg['batch']}, lr swept over {payload['lrs']} on "
        f"seed 0 by validation accuracy, seeds {list(cfg['seeds'])}; test accuracy in % (mean ± std). "
        f"Run time {payload['wall_s'] / 60:.1f} min, 1 CPU thread ({os.cpu_count()} cores on the machine, shared "
        f"with other jobs){' (--quick)' if quick else ''}.",
        "",
        "| method | budget | adapter params | trainable params | test acc % | lr |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for x in summary:
        lines.append(
            f"| {x['method']} | {x['budget']} | {x['adapter_params']} | {x['trainable_params']} | "
            f"{100 * x['test_acc_mean']:.1f} ± {100 * x['test_acc_std']:.1f} | {x['lr']:g} |"
        )
    return "\n".join([*lines, "", *findings(summary)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the JSON and markdown")
    parser.add_argument("--render", action="store_true", help="only rebuild the markdown from the saved JSON")
    args = parser.parse_args()
    if args.render:
        saved = json.loads((args.out / "adapters.json").read_text())
        write_results("adapters", saved, markdown(saved), args.out)
        print(markdown(saved))
        return
    torch.set_num_threads(1)
    cfg = Config(pretrain_epochs=3, finetune_epochs=2, seeds=(0,)) if args.quick else Config()
    lrs = LRS[:1] if args.quick else LRS
    t0 = time.perf_counter()
    task_a, task_b = tasks(cfg)
    torch.manual_seed(0)
    base = MLP()
    pre = train(base, task_a, lr=3e-3, epochs=cfg.pretrain_epochs, batch=cfg.batch, seed=0)
    print(f"pretrained on task A: test acc {pre['test_acc']:.3f}", flush=True)

    plan: list[tuple[str, str, Callable[[MLP], nn.Module]]] = [("full fine-tuning", "-", full)]
    for budget in ("small", "large"):
        for name, make in methods(budget).items():
            if name in ("head only", "LoKr (peft, full w2)", "KronA (LoKr's full-w2 shapes)") and budget == "large":
                continue
            plan.append((name, "-" if name == "head only" else budget, make))

    rows: list[dict[str, Any]] = []
    for name, budget, make in plan:
        chosen = None
        for seed in cfg.seeds:
            best = None
            for lr in lrs if seed == cfg.seeds[0] else (chosen,):
                model = make(_fresh_head(base, seed))
                torch.manual_seed(seed)
                res = train(model, task_b, lr=lr, epochs=cfg.finetune_epochs, batch=cfg.batch, seed=seed)
                res = {**res, "lr": lr, "adapter_params": adapter_params(model)}
                res["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
                if best is None or res["val_acc"] > best["val_acc"]:
                    best = res
            assert best is not None
            chosen = best["lr"]
            rows.append({"method": name, "budget": budget, "seed": seed, **best})
        print(f"{name} [{budget}]: {statistics.fmean(r['test_acc'] for r in rows[-len(cfg.seeds) :]):.3f}", flush=True)
    wall = time.perf_counter() - t0

    summary = []
    for name, budget, _ in plan:
        rs = [r for r in rows if r["method"] == name and r["budget"] == budget]
        accs = [r["test_acc"] for r in rs]
        summary.append(
            {
                "method": name,
                "budget": budget,
                "adapter_params": rs[0]["adapter_params"],
                "trainable_params": rs[0]["trainable_params"],
                "test_acc_mean": statistics.fmean(accs),
                "test_acc_std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
                "lr": rs[0]["lr"],
            }
        )
    payload = {
        "config": asdict(cfg),
        "lrs": list(lrs),
        "environment": environment(),
        "pretrain": pre,
        "wall_s": wall,
        "summary": summary,
        "runs": rows,
        "quick": args.quick,
    }
    md = markdown(payload)
    write_results("adapters" + ("_quick" if args.quick else ""), payload, md, args.out)
    print(md)


if __name__ == "__main__":
    main()
