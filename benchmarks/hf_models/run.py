"""kronfac on Hugging Face models: KFAC, SINGD and AdaFisherW vs AdamW on a tiny GPT-2 and a tiny BERT (issue 11).

Protocol (the same for every method; see README.md here):

1. Tuning: the same ``TRIALS`` quasi-random points (scrambled Sobol, one sequence for all methods) of the unit cube
   mapped onto each method's ranges of learning rate, damping (AdamW: ``eps``) and linear warmup (a fraction of
   the run; then cosine decay to 10%, via ``LambdaLR`` for every method). Each trial trains one seed (seed 100)
   for the full step budget; the best final validation metric wins (diverged trials lose).
2. Three seeds (0, 1, 2) at the chosen setting; the methods are interleaved seed by seed (and trial by trial in
   the tuning) so that load changes on the shared machine hit all of them alike.
3. Target: AdamW's final validation loss (GPT-2) or accuracy (BERT) on the curve's validation subset, of its
   worst seed (so every AdamW seed reaches it). Steps and training seconds to the target are read from the
   validation curve (every ``eval_every`` steps; evaluation time excluded); medians over the seeds.
4. Ablations of K-FAC at its chosen setting, one seed each: loss averaging, which layers are covered, damping,
   update frequency, KL clip; for BERT also SGD with momentum (what K-FAC's first-order parameters get).

Usage: ``python benchmarks/hf_models/run.py [--quick] [--out DIR]``. Writes ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import kronfac

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from report import write_markdown  # noqa: E402
from tasks import HFTask, bert_task, gpt2_task  # noqa: E402

SEEDS = (0, 1, 2)
TUNE_SEED = 100
TRIALS = 6


@dataclass(frozen=True)
class Space:
    """Log-uniform ranges of lr and damping and a uniform range of the warmup fraction."""

    lr: tuple[float, float]
    damping: tuple[float, float]
    warmup: tuple[float, float] = (0.0, 0.2)

    def point(self, u: list[float]) -> dict[str, float]:
        def log(lo: float, hi: float, x: float) -> float:
            return float(math.exp(math.log(lo) + x * (math.log(hi) - math.log(lo))))

        lo, hi = self.warmup
        return {
            "lr": float(f"{log(*self.lr, u[0]):.3g}"),
            "damping": float(f"{log(*self.damping, u[1]):.3g}"),
            "warmup": round(lo + u[2] * (hi - lo), 3),
        }


Factory = Callable[[nn.Module, HFTask, dict[str, Any]], torch.optim.Optimizer]


def _adamw(model: nn.Module, task: HFTask, hp: dict[str, Any]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=hp["lr"], eps=hp["damping"], weight_decay=0.01)


def _sgd(model: nn.Module, task: HFTask, hp: dict[str, Any]) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=0.9)


class _PreconditionedAdamW(torch.optim.AdamW):
    """``KFACPreconditioner`` in front of AdamW: ``.grad`` <- K-FAC direction, then AdamW's step."""

    def __init__(self, model: nn.Module, task: HFTask, hp: dict[str, Any]) -> None:
        super().__init__(model.parameters(), lr=hp["lr"], weight_decay=0.01)
        self.preconditioner = kronfac.KFACPreconditioner(model, damping=hp["damping"], loss_average=task.loss_average)

    def step(self, closure: Any = None) -> Any:
        self.preconditioner.step()
        return super().step(closure)

    def summary(self) -> str:
        return "KFACPreconditioner -> AdamW: " + self.preconditioner.summary()

    def close(self) -> None:
        self.preconditioner.close()


def _kronfac(cls: type, **fixed: Any) -> Factory:
    def make(model: nn.Module, task: HFTask, hp: dict[str, Any]) -> torch.optim.Optimizer:
        options = {"loss_average": task.loss_average, **fixed, **hp.get("options", {})}
        return cls(model, lr=hp["lr"], damping=hp["damping"], **options)

    return make


@dataclass(frozen=True)
class Method:
    name: str
    make: Factory
    space: Space
    damping_name: str = "damping"


METHODS = {
    "adamw": Method("adamw", _adamw, Space(lr=(3e-4, 1e-2), damping=(1e-10, 1e-6)), damping_name="eps"),
    "kfac": Method("kfac", _kronfac(kronfac.KFAC), Space(lr=(0.02, 0.5), damping=(1e-4, 1e-1))),
    "singd": Method("singd", _kronfac(kronfac.SINGD), Space(lr=(0.003, 0.1), damping=(1e-4, 1e-1))),
    "adafisherw": Method(
        "adafisherw", _kronfac(kronfac.AdaFisherW, weight_decay=0.01), Space(lr=(1e-3, 2e-2), damping=(1e-4, 1e-2))
    ),
}


@dataclass
class Budget:
    steps: int
    eval_every: int
    val_size: int


@dataclass
class Run:
    """One training run: the validation curve (step, training seconds, loss, accuracy) and the final metrics."""

    hp: dict[str, Any]
    seed: int
    curve: list[tuple[int, float, float, float]] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    diverged: bool = False
    final_val: dict[str, float] = field(default_factory=dict)
    final_test: dict[str, float] = field(default_factory=dict)
    summary: str = ""

    def score(self, kind: str) -> float:
        """Higher is better: -loss for the LM, accuracy (then -loss) for the classifier."""
        if self.diverged or not self.final_val:
            return -math.inf
        if kind == "lm":
            return -self.final_val["loss"]
        return self.final_val["accuracy"] - 1e-3 * self.final_val["loss"]

    def to_target(self, kind: str, target: float) -> tuple[int | None, float | None]:
        for step, seconds, loss, acc in self.curve:
            if (loss <= target) if kind == "lm" else (acc >= target):
                return step, seconds
        return None, None

    def to_dict(self) -> dict[str, Any]:
        return {
            "hp": self.hp,
            "seed": self.seed,
            "diverged": self.diverged,
            "final_val": self.final_val,
            "final_test": self.final_test,
            "median_ms": statistics.median(self.step_ms) if self.step_ms else None,
            "curve": [[s, round(t, 3), round(loss, 4), round(acc, 4)] for s, t, loss, acc in self.curve],
        }


def schedule(steps: int, warmup: float) -> Callable[[int], float]:
    """Linear warmup over ``warmup * steps`` steps, then cosine decay to 10% at the end."""
    warm = max(1, round(warmup * steps)) if warmup > 0 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, steps - warm)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train(task: HFTask, make: Factory, hp: dict[str, Any], seed: int, budget: Budget) -> Run:
    run = Run(hp=hp, seed=seed)
    torch.manual_seed(seed)
    model = task.build()
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = make(model, task, hp)
    summary = getattr(opt, "summary", None)
    run.summary = summary() if summary is not None else "all parameters: " + type(opt).__name__
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, schedule(budget.steps, hp.get("warmup", 0.0)))
    generator = torch.Generator().manual_seed(seed)
    x_val, y_val = task.x_val[: budget.val_size], task.y_val[: budget.val_size]
    elapsed = 0.0
    try:
        for step in range(1, budget.steps + 1):
            idx = torch.randint(0, len(task.x_train), (task.batch_size,), generator=generator)
            x, y = task.x_train[idx], task.y_train[idx]
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = task.loss(model, x, y)
            loss.backward()
            opt.step()
            scheduler.step()
            took = time.perf_counter() - start
            elapsed += took
            run.step_ms.append(1e3 * took)
            if not math.isfinite(loss.item()):
                raise FloatingPointError("non-finite loss")
            if step % budget.eval_every == 0 or step == budget.steps:
                metrics = task.evaluate(model, x_val, y_val)
                if not math.isfinite(metrics["loss"]):
                    raise FloatingPointError("non-finite validation loss")
                run.curve.append((step, elapsed, metrics["loss"], metrics["accuracy"]))
    except (FloatingPointError, StopIteration):
        run.diverged = True
    if not run.diverged:
        run.final_val = task.evaluate(model, task.x_val, task.y_val)
        run.final_test = task.evaluate(model, task.x_test, task.y_test)
    close = getattr(opt, "close", None)
    if close is not None:
        close()
    return run


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[Run], kind: str, target: float | None) -> dict[str, Any]:
    ok = [r for r in runs if not r.diverged]
    metric = "loss" if kind == "lm" else "accuracy"
    val_mean, val_std = _mean_std([r.final_val[metric] for r in ok])
    test_mean, test_std = _mean_std([r.final_test[metric] for r in ok])
    val_loss, _ = _mean_std([r.final_val["loss"] for r in ok])
    out: dict[str, Any] = {
        "metric": metric,
        "val_mean": val_mean,
        "val_std": val_std,
        "test_mean": test_mean,
        "test_std": test_std,
        "val_loss_mean": val_loss,
        "diverged": len(runs) - len(ok),
        "median_ms": statistics.median([ms for r in runs for ms in r.step_ms]) if runs else None,
    }
    if target is not None:
        hits = [r.to_target(kind, target) for r in runs]
        steps = [s for s, _ in hits if s is not None]
        secs = [t for _, t in hits if t is not None]
        out["reached"] = f"{len(steps)}/{len(runs)}"
        out["steps_to_target"] = statistics.median(steps) if len(steps) == len(runs) else None
        out["seconds_to_target"] = statistics.median(secs) if len(secs) == len(runs) else None
    return out


def adamw_target(runs: list[Run], kind: str) -> float | None:
    """AdamW's final validation metric on the curve's validation subset, of its worst seed (so that every AdamW
    seed reaches the target and its steps to the target are defined)."""
    last = [r.curve[-1][2 if kind == "lm" else 3] for r in runs if not r.diverged and r.curve]
    if not last:
        return None
    return max(last) if kind == "lm" else min(last)


def tune(task: HFTask, methods: dict[str, Method], trials: int, budget: Budget) -> dict[str, list[Run]]:
    """The same Sobol points for every method, interleaved trial by trial."""
    points = torch.quasirandom.SobolEngine(3, scramble=True, seed=0).draw(trials).tolist()
    out: dict[str, list[Run]] = {name: [] for name in methods}
    for k, u in enumerate(points):
        for name, method in methods.items():
            run = train(task, method.make, method.space.point(u), TUNE_SEED, budget)
            out[name].append(run)
            final = run.final_val.get("loss" if task.kind == "lm" else "accuracy")
            print(f"  tune {task.name} {name:10s} trial {k} {run.hp} -> {final}", flush=True)
    return out


def ablations(task: HFTask, tuned: dict[str, Any], quick: bool) -> list[tuple[str, Factory, dict[str, Any]]]:
    """K-FAC at its chosen setting with one thing changed (the first row is the chosen setting itself)."""
    kfac = _kronfac(kronfac.KFAC)
    chosen = tuned["kfac"]
    lr, damping = chosen["lr"], chosen["damping"]
    rows: list[tuple[str, Factory, dict[str, Any]]] = [("kfac (chosen)", kfac, chosen)]
    if task.kind == "lm":
        options = {
            "loss_average='batch'": {"loss_average": "batch"},
            "exclude tied wte/lm_head (first-order)": {"exclude": ["lm_head", "transformer.wte"]},
            "exclude wpe": {"exclude": ["transformer.wpe"]},
            "factor_every=5, inverse_every=50": {"factor_every": 5, "inverse_every": 50},
            "kl_clip=None": {"kl_clip": None},
        }
    else:
        options = {
            "exclude embeddings (first-order)": {"exclude": r".*embeddings\..*"},
            "only classifier + pooler": {"include": ["classifier", "bert.pooler.dense"]},
            "kl_clip=None": {"kl_clip": None},
            "kl_clip=1e-2": {"kl_clip": 1e-2},
            "factor_every=5, inverse_every=50": {"factor_every": 5, "inverse_every": 50},
            "approx='reduce' (one loss per sequence)": {"approx": "reduce"},
            "fisher_type='mc' (true Fisher, 1 sample)": {"fisher_type": "mc"},
        }
    rows += [(label, kfac, {**chosen, "options": opts}) for label, opts in options.items()]
    rows += [
        (f"damping={damping * 10:.3g} (x10)", kfac, {**chosen, "damping": damping * 10}),
        (f"damping={damping / 10:.3g} (/10)", kfac, {**chosen, "damping": damping / 10}),
    ]
    if task.kind == "cls":
        rows.append((f"lr={lr / 3:.3g} (/3)", kfac, {**chosen, "lr": lr / 3}))
    if task.kind == "cls":
        rows += [(f"sgd momentum 0.9, lr={sgd_lr}", _sgd, {"lr": sgd_lr, "warmup": 0.1}) for sgd_lr in (0.03, 0.3)]
    if "adamw" in tuned and task.kind == "cls":
        hybrid = {**tuned["adamw"], "damping": damping}
        rows.append((f"KFACPreconditioner -> AdamW (AdamW's lr, damping={damping:g})", _PreconditionedAdamW, hybrid))
    return rows[:2] if quick else rows


def run_task(task: HFTask, methods: dict[str, Method], budget: Budget, trials: int, seeds: tuple[int, ...],
             quick: bool) -> dict[str, Any]:  # fmt: skip
    t0 = time.perf_counter()
    tuned = tune(task, methods, trials, budget)
    chosen = {name: max(runs, key=lambda r: r.score(task.kind)).hp for name, runs in tuned.items()}
    final: dict[str, list[Run]] = {name: [] for name in methods}
    for seed in seeds:
        for name, method in methods.items():
            run = train(task, method.make, chosen[name], seed, budget)
            final[name].append(run)
            print(f"  seed {task.name} {name:10s} {seed} -> {run.final_val}", flush=True)
    target = adamw_target(final.get("adamw", []), task.kind)
    record: dict[str, Any] = {
        "description": task.description,
        "kind": task.kind,
        "config": task.config,
        "batch_size": task.batch_size,
        "loss_average": task.loss_average,
        "majority_accuracy": task.majority_accuracy() if task.kind == "cls" else None,
        "target": target,
        "methods": {},
    }
    for name, method in methods.items():
        record["methods"][name] = {
            "space": vars(method.space),
            "damping_name": method.damping_name,
            "trials": [r.to_dict() | {"curve": None} for r in tuned[name]],
            "chosen": chosen[name],
            "coverage": final[name][0].summary,
            "runs": [r.to_dict() for r in final[name]],
            "summary": summarize(final[name], task.kind, target),
        }
    if "kfac" in methods:
        rows = []
        for label, make, hp in ablations(task, chosen, quick):
            run = train(task, make, hp, seeds[0], budget)
            summary = summarize([run], task.kind, target)
            rows.append({"label": label, "hp": hp, "coverage": run.summary, **summary, "run": run.to_dict()})
            print(f"  ablation {task.name} {label}: {run.final_val}", flush=True)
        record["ablation"] = {"seed": seeds[0], "rows": rows}
    record["seconds"] = time.perf_counter() - t0
    return record


def merge(folders: list[Path], out: Path) -> int:
    """One results.json/results.md from runs of single tasks (``--tasks``) in separate processes: their meta must
    agree but for the date and wall time (the latest date and the longest wall time are kept)."""
    parts = [json.loads((folder / "results.json").read_text()) for folder in folders]
    results: dict[str, Any] = {"meta": dict(parts[0]["meta"]), "tasks": {}}
    for part in parts:
        results["tasks"].update(part["tasks"])
        results["meta"]["budgets"].update(part["meta"]["budgets"])
    results["meta"]["date"] = max(p["meta"]["date"] for p in parts)
    results["meta"]["wall_seconds"] = max(p["meta"]["wall_seconds"] for p in parts)
    results["meta"]["processes"] = len(parts)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(write_markdown(results))
    print(f"merged {len(parts)} runs -> {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds (tiny budgets)")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--tasks", nargs="*", default=["gpt2-stdlib", "bert-stdlib-pkg"])
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument(
        "--merge",
        nargs="*",
        type=Path,
        default=None,
        help="combine the results.json of runs of single tasks into --out",
    )
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    torch.set_num_threads(1)  # the machine is shared: one thread keeps the timings comparable
    torch.set_flush_denormal(True)  # subnormal gradients slow matrix products ~100x on CPU (docs/kfac.md)
    began = time.perf_counter()
    methods = {name: METHODS[name] for name in args.methods}
    if args.quick:
        builders = {
            "gpt2-stdlib": lambda: gpt2_task(num_chars=20_000, seq_len=32, width=32, layers=1),
            "bert-stdlib-pkg": lambda: bert_task(seq_len=16, per_class=(40, 10, 10), vocab_size=200, width=32),
        }
        budgets = {name: Budget(steps=6, eval_every=3, val_size=32) for name in builders}
        trials, seeds = 2, SEEDS[:1]
    else:
        builders = {"gpt2-stdlib": gpt2_task, "bert-stdlib-pkg": bert_task}
        budgets = {
            "gpt2-stdlib": Budget(steps=200, eval_every=10, val_size=128),
            "bert-stdlib-pkg": Budget(steps=200, eval_every=10, val_size=400),
        }
        trials, seeds = TRIALS, SEEDS
    import transformers

    results: dict[str, Any] = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.system()}",
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "flush_denormal": True,
            "quick": args.quick,
            "trials": trials,
            "tune_seed": TUNE_SEED,
            "seeds": list(seeds),
            "budgets": {name: vars(budgets[name]) for name in args.tasks},
        },
        "tasks": {},
    }
    for name in args.tasks:
        task = builders[name]()
        print(f"{name}: {task.description}", flush=True)
        results["tasks"][name] = run_task(task, methods, budgets[name], trials, seeds, args.quick)
    results["meta"]["wall_seconds"] = time.perf_counter() - began
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text(write_markdown(results))
    print(f"done in {results['meta']['wall_seconds']:.0f}s -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
