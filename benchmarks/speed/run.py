"""Step time of kronfac's optimizers against AdamW and the peers, at several widths, in one interleaved run.

MLP 40-d-d-10 on mnist1d batches of 128 (d = width), curvature and inverses every 10 steps for every
Kronecker-factored method. Methods are interleaved round by round so that the noise of a shared machine hits them
alike; reported per width and method: median and mean ms/step (the mean includes the refresh steps), ratios of
both to AdamW and to the peers measured in the same run (SOAP from pytorch-optimizer, torch.optim.Muon on the
2-D hidden weights with AdamW for the rest, the singd package's IKFAC, ASDL's K-FAC, where installed), the
optimizer state in bytes, and for the K-FAC variants the time split: forward+backward (capture hooks excluded),
statistics (capture hooks and the commit), refresh, preconditioning (+ KL clip), update.

Run: ``python benchmarks/speed/run.py [--widths 256 512 1024] [--rounds 2]``; writes results.json and
results.md next to this file (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from products import median_ms  # this folder's micro-benchmark timer (the script's folder is on sys.path)
from torch import nn

import kronfac
from kronfac.bench import METHODS, TASKS
from kronfac.bench.methods import KFAC_BENCH_OPTIONS, SINGD_BENCH_OPTIONS
from kronfac.bench.models import mlp
from kronfac.bench.runner import state_bytes

HERE = Path(__file__).parent
BATCH = 128
#: timed steps per round by width (wide steps are slow on a CPU; 10 steps hold exactly one refresh)
STEPS = {256: 60, 512: 30, 1024: 20, 2048: 10}
WARMUP = 10  # one refresh, so every K-FAC step after it preconditions
KFAC_VARIANTS: dict[str, Callable[[], kronfac.InverseConfig]] = {
    "kfac": lambda: kronfac.CholeskyConfig(),  # the default: factored damping
    "kfac-eigh": lambda: kronfac.EighConfig(),
    "kfac-warm": lambda: kronfac.EighConfig(refresh="warm"),
}
#: K-FAC's products per cheap step by backend: Cholesky G⁻¹ V A⁻¹ (2), eigenbasis Q_G (Q_Gᵀ V Q_A ⊙ S) Q_Aᵀ (4)
FLOOR_VARIANTS = ("kfac", "kfac-eigh")
PHASES = ("forward_backward", "statistics", "refresh", "precondition", "update")


class _HookClock:
    """A capture listener that does nothing: with one set, the capture measures the time of its hooks."""

    def statistics_complete(self, layer: Any) -> None:
        pass


class Timed:
    """One method's training step, with the K-FAC phases timed by wrapping the optimizer's own methods."""

    def __init__(self, name: str, model: nn.Module, optimizer: Any, extra: list[Any] | None = None) -> None:
        self.name, self.model, self.optimizer, self.extra = name, model, optimizer, extra or []
        self.split: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.kron = isinstance(optimizer, kronfac.optim.base.KronOptimizer)
        if self.kron:
            optimizer.capture.listener = _HookClock()  # the capture times its hooks only with a listener
            for attr, phase in (
                ("commit_curvature", "statistics"),
                ("scheduled_refresh", "refresh"),
                ("_group_step", "precondition"),
                ("update", "update"),
            ):
                setattr(optimizer, attr, self._wrap(getattr(optimizer, attr), phase))

    def _wrap(self, fn: Callable[..., Any], phase: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.split[phase] += time.perf_counter() - start

        return timed

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        for opt in [self.optimizer, *self.extra]:
            opt.zero_grad(set_to_none=True)
        start = time.perf_counter()
        nn.functional.cross_entropy(self.model(x), y).backward()
        elapsed = time.perf_counter() - start
        if self.kron:
            hooks = self.optimizer.capture.factor_seconds
            self.optimizer.capture.factor_seconds = 0.0
            self.split["statistics"] += hooks
            elapsed -= hooks
        self.split["forward_backward"] += elapsed
        for opt in [self.optimizer, *self.extra]:
            opt.step()

    def state(self) -> int:
        curvature = getattr(self.optimizer, "curvature_state_dict", None)
        objects = [opt.state_dict() for opt in [self.optimizer, *self.extra]]
        return state_bytes([*objects, curvature() if curvature is not None else None])

    def close(self) -> None:
        close = getattr(self.optimizer, "close", None)
        if close is not None:
            close()


def _quiet(build: Callable[[], Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build()


def make(name: str, model: nn.Module) -> Timed:
    if name == "adamw":
        return Timed(name, model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01))
    if name in KFAC_VARIANTS:
        opt = _quiet(lambda: kronfac.KFAC(model, lr=0.1, inverse=KFAC_VARIANTS[name](), **KFAC_BENCH_OPTIONS))
        return Timed(name, model, opt)
    if name == "kfac-async":  # the default with the refresh in a background thread (one interval stale)
        opt = _quiet(lambda: kronfac.KFAC(model, lr=0.1, async_refresh=True, **KFAC_BENCH_OPTIONS))
        return Timed(name, model, opt)
    if name == "singd":
        return Timed(name, model, _quiet(lambda: kronfac.SINGD(model, lr=0.03, **SINGD_BENCH_OPTIONS)))
    if name == "adafisher":
        return Timed(name, model, _quiet(lambda: kronfac.AdaFisher(model, lr=1e-2, factor_every=10)))
    if name == "soap":
        import pytorch_optimizer

        return Timed(name, model, pytorch_optimizer.SOAP(model.parameters(), lr=3e-3, precondition_frequency=10))
    if name == "muon":
        hidden = [p for p in model.parameters() if p.ndim == 2]
        rest = [p for p in model.parameters() if p.ndim != 2]
        return Timed(name, model, torch.optim.Muon(hidden, lr=0.02), [torch.optim.AdamW(rest, lr=1e-3)])
    raise KeyError(name)


class PeerTimed(Timed):
    """A peer from kronfac.bench (singd package, ASDL): its own trainer step, timed as a whole."""

    def __init__(self, name: str, model: nn.Module) -> None:
        self.name, self.model = name, model
        self.trainer = METHODS[name].make(model, 0.1 if name == "singd-ikfac" else 0.01, TASKS["mlp-mnist1d"])
        self.split, self.kron = dict.fromkeys(PHASES, 0.0), False

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.trainer.step(x, y)

    def state(self) -> int:
        return state_bytes(self.trainer.state_objects())

    def close(self) -> None:
        self.trainer.close()


def available(methods: list[str]) -> list[str]:
    out = []
    for name in methods:
        if name == "soap":
            try:
                import pytorch_optimizer  # noqa: F401
            except ImportError:
                continue
        if name == "muon" and not hasattr(torch.optim, "Muon"):
            continue
        if name in ("singd-ikfac", "asdl-kfac") and not METHODS[name].available():
            continue
        out.append(name)
    return out


def time_method(name: str, width: int, steps: int) -> dict[str, Any]:
    split = TASKS["mlp-mnist1d"].load()
    torch.manual_seed(0)
    model = mlp([40, width, width, 10])
    timed = PeerTimed(name, model) if name in ("singd-ikfac", "asdl-kfac") else make(name, model)
    generator = torch.Generator().manual_seed(0)
    times = []
    for step in range(WARMUP + steps):
        if step == WARMUP:
            timed.split = dict.fromkeys(PHASES, 0.0)
        idx = torch.randint(0, len(split.x_train), (BATCH,), generator=generator)
        start = time.perf_counter()
        timed.step(split.x_train[idx], split.y_train[idx])
        if step >= WARMUP:
            times.append(1e3 * (time.perf_counter() - start))
    out = {"times": times, "split_ms": {k: 1e3 * v / steps for k, v in timed.split.items()}, "state": timed.state()}
    timed.close()
    return out


def floor_ms(width: int, variant: str) -> dict[str, float]:
    """The floor of the algorithm a K-FAC variant runs on this model, from its primitives timed alone (ms):
    forward+backward without hooks, the preconditioning products of one step, and per curvature step
    (amortised over ``inverse_every`` = 10) the factor products ``aᵀa``, ``gᵀg`` and the factorizations
    (Cholesky and its inverse, or ``eigh``) of every factor."""
    split = TASKS["mlp-mnist1d"].load()
    torch.manual_seed(0)
    model = mlp([40, width, width, 10])
    x, y = split.x_train[:BATCH], split.y_train[:BATCH]
    repeats = max(3, STEPS.get(width, 10) // 2)

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()

    layers = [(m.in_features + 1, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    grads = [torch.randn(d_o, d_i) for d_i, d_o in layers]
    rows_a = [torch.randn(BATCH, d_i) for d_i, _ in layers]
    rows_g = [torch.randn(BATCH, d_o) for _, d_o in layers]
    factors = [(r.T @ r / BATCH + 1e-2 * torch.eye(r.shape[1])) for pair in zip(rows_a, rows_g) for r in pair]
    if variant == "kfac":
        mats = [(torch.linalg.inv(f_g), torch.linalg.inv(f_a)) for f_a, f_g in zip(factors[::2], factors[1::2])]

        def products() -> None:
            for (g_inv, a_inv), v in zip(mats, grads):
                g_inv @ v @ a_inv

        def factorize() -> None:
            for f in factors:
                torch.cholesky_inverse(torch.linalg.cholesky(f))
    else:
        bases = [
            (torch.linalg.eigh(f_g)[1], torch.linalg.eigh(f_a)[1]) for f_a, f_g in zip(factors[::2], factors[1::2])
        ]
        scales = [torch.rand(v.shape) for v in grads]

        def products() -> None:
            for (q_g, q_a), v, scale in zip(bases, grads, scales):
                q_g @ ((q_g.T @ v @ q_a) * scale) @ q_a.T

        def factorize() -> None:
            for f in factors:
                torch.linalg.eigh(f)

    def statistics_products() -> None:
        for a, g in zip(rows_a, rows_g):
            a.T @ a
            g.T @ g

    out = median_ms(
        {
            "forward_backward": forward_backward,
            "products": products,
            "statistics": statistics_products,
            "refresh": factorize,
        },
        repeats,
    )
    out["statistics"] /= 10  # once per curvature step, every 10 steps
    out["refresh"] /= 10
    out["total"] = sum(out.values())
    return out


DEFAULT_METHODS = [
    "adamw", "kfac", "kfac-async", "kfac-eigh", "kfac-warm", "singd", "adafisher", "soap", "muon", "singd-ikfac",
    "asdl-kfac",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    methods = available(args.methods)
    load_before = os.getloadavg()
    widths: dict[str, Any] = {}
    for width in args.widths:
        samples: dict[str, list[float]] = {m: [] for m in methods}
        splits: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
        states: dict[str, int] = {}
        floors: dict[str, list[dict[str, float]]] = {m: [] for m in methods if m in FLOOR_VARIANTS}
        for _ in range(args.rounds):
            for name in floors:
                floors[name].append(floor_ms(width, name))
            for name in methods:
                result = time_method(name, width, STEPS.get(width, 10))
                samples[name] += result["times"]
                splits[name].append(result["split_ms"])
                states[name] = result["state"]
                print(width, name, f"median {statistics.median(result['times']):.2f} ms", flush=True)
        medians = {m: statistics.median(t) for m, t in samples.items()}
        means = {m: statistics.fmean(t) for m, t in samples.items()}
        rows = {}
        for name in methods:
            row: dict[str, Any] = {
                "median_ms": medians[name],
                "mean_ms": means[name],
                "median_vs_adamw": medians[name] / medians["adamw"],
                "mean_vs_adamw": means[name] / means["adamw"],
                "state_bytes": states[name],
            }
            for peer in ("soap", "muon", "singd-ikfac", "asdl-kfac"):
                if peer in medians:
                    row[f"mean_vs_{peer}"] = means[name] / means[peer]
            if any(splits[name][0].values()):
                row["split_ms"] = {k: statistics.fmean(s[k] for s in splits[name]) for k in PHASES}
                refresh = row["split_ms"]["refresh"]
                row["refresh_share_of_mean"] = refresh / means[name]
            if name == "kfac-async" and "kfac" in floors:  # the default's floor with the refresh off the path
                floor = {k: statistics.median(f[k] for f in floors["kfac"]) for k in floors["kfac"][0]}
                floor["total"] -= floor["refresh"]
                floor["refresh"] = 0.0
                row["floor_ms"] = floor
                row["mean_vs_floor"] = means[name] / floor["total"]
            if name in floors:
                floor = {k: statistics.median(f[k] for f in floors[name]) for k in floors[name][0]}
                row["floor_ms"] = floor
                row["mean_vs_floor"] = means[name] / floor["total"]
            rows[name] = row
        widths[str(width)] = {"steps_per_round": STEPS.get(width, 10), "methods": rows}
    result = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared with other jobs (see load averages)",
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "torch": torch.__version__,
            "threads": 1,
            "flush_denormal": True,
            "rounds": args.rounds,
            "warmup_steps": WARMUP,
            "model": f"MLP 40-d-d-10, batch {BATCH}, mnist1d",
            "curvature_every": 10,
        },
        "widths": widths,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    (args.out / "results.md").write_text(report(result))
    print(report(result))


def report(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        "# Step time vs AdamW and peers, by width",
        "",
        f"{meta['model']}; curvature and inverses every {meta['curvature_every']} steps; {meta['rounds']} interleaved "
        f"rounds; {meta['threads']} thread, flushed subnormals; {meta['date']}, {meta['machine']}, torch "
        f"{meta['torch']}. Load averages (1/5/15 min) {'/'.join(f'{x:.1f}' for x in meta['load_average_before'])} "
        f"before, {'/'.join(f'{x:.1f}' for x in meta['load_average_after'])} after: the machine was shared, so "
        "absolute times are noisy; the ratios are from the same interleaved rounds. Generated by "
        "`benchmarks/speed/run.py`. `kfac` is K-FAC's default (`CholeskyConfig`, factored damping), `kfac-eigh` "
        "exact eigen-damping, `kfac-warm` eigen-damping with warm-started refreshes, `kfac-async` the default with "
        "`async_refresh=True` (inverses built in a background thread, one refresh interval stale; its floor is the "
        "default's without the refresh, and its refresh column is the main thread's wait for the job). "
        "The floor of a K-FAC variant is "
        "the sum of its primitives timed alone on this model: forward+backward without hooks, the preconditioning "
        "products of one step (2 per layer with Cholesky, 4 with eigh), and per curvature step (amortised over 10 "
        "steps) the factor products aᵀa, gᵀg and the factorizations.",
        "",
    ]
    for width, entry in result["widths"].items():
        rows = entry["methods"]
        peers = [p for p in ("soap", "muon", "singd-ikfac", "asdl-kfac") if p in rows]
        lines += [
            f"## width {width} ({entry['steps_per_round']} timed steps per round)",
            "",
            "| method | median ms | mean ms | median / AdamW | mean / AdamW | "
            + " | ".join(f"mean / {p}" for p in peers)
            + " | state MiB |",
            "|---|---|---|---|---|" + "---|" * len(peers) + "---|",
        ]
        for name, row in rows.items():
            ratios = " | ".join(f"{row[f'mean_vs_{p}']:.2f}x" for p in peers)
            lines.append(
                f"| {name} | {row['median_ms']:.2f} | {row['mean_ms']:.2f} | {row['median_vs_adamw']:.2f}x "
                f"| {row['mean_vs_adamw']:.2f}x | {ratios} | {row['state_bytes'] / 2**20:.1f} |"
            )
        split_rows = {n: r["split_ms"] for n, r in rows.items() if "split_ms" in r and n.startswith("kfac")}
        if split_rows:
            lines += [
                "",
                "Time split of the K-FAC variants, ms per step (mean over the timed steps):",
                "",
                "| method | " + " | ".join(PHASES) + " | refresh share of the mean step | floor ms (fwd+bwd + "
                "products + statistics + refresh) | mean / floor |",
                "|---|" + "---|" * len(PHASES) + "---|---|---|",
            ]
            for name, split in split_rows.items():
                row = rows[name]
                floor = row.get("floor_ms")
                floor_text = (
                    f"{floor['total']:.2f} ({floor['forward_backward']:.2f} + {floor['products']:.2f} + "
                    f"{floor['statistics']:.2f} + {floor['refresh']:.2f}) | {row['mean_vs_floor']:.2f}x"
                    if floor
                    else "— | —"
                )
                lines.append(
                    f"| {name} | "
                    + " | ".join(f"{split[k]:.2f}" for k in PHASES)
                    + f" | {row['refresh_share_of_mean']:.0%} | {floor_text} |"
                )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
