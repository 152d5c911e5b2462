"""Optimization methods the benchmark compares, each with the learning-rate grid of its sweep.

A method turns ``(model, lr, task)`` into a :class:`Trainer` whose ``step(x, y)`` does one full training step
and returns the loss. Built-in: SGD with momentum, AdamW, K-FAC; peers (``singd``, ASDL) when installed.
Later kronfac methods add themselves with :func:`register_method`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kronfac.bench.tasks import Task

__all__ = ["METHODS", "Method", "OptimizerTrainer", "Trainer", "register_method"]


class Trainer:
    """One training step of a method; ``state_objects`` are measured for optimizer-state bytes."""

    def step(self, x: Tensor, y: Tensor) -> float:
        raise NotImplementedError

    def state_objects(self) -> list[Any]:
        return []

    def close(self) -> None:
        pass


class OptimizerTrainer(Trainer):
    """zero_grad, forward, loss, backward, ``optimizer.step()``: any torch optimizer, kronfac's included."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, task: Task) -> None:
        self.model, self.optimizer, self.task = model, optimizer, task

    def step(self, x: Tensor, y: Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.task.loss(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def state_objects(self) -> list[Any]:
        # kronfac's state_dict carries its curvature as one serialized blob: count the live tensors instead
        curvature = getattr(self.optimizer, "curvature_state_dict", None)
        return [self.optimizer.state_dict(), curvature() if curvature is not None else None]

    def close(self) -> None:
        close = getattr(self.optimizer, "close", None)
        if close is not None:
            close()


@dataclass
class Method:
    """A named method: ``make(model, lr, task) -> Trainer`` and its learning-rate grid."""

    name: str
    make: Callable[..., Trainer]
    lr_grid: Sequence[float]
    description: str = ""
    available: Callable[[], bool] = lambda: True
    #: Further hyperparameters swept together with the learning rate (passed to ``make`` as keywords).
    grid: Sequence[dict[str, Any]] = ({},)

    def configurations(self) -> list[dict[str, Any]]:
        """Every point of the sweep: ``{"lr": ..., **extra}``."""
        return [{"lr": lr, **extra} for extra in self.grid for lr in self.lr_grid]


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def _sgd(model: nn.Module, lr: float, task: Task) -> Trainer:
    return OptimizerTrainer(model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), task)


def _adamw(model: nn.Module, lr: float, task: Task) -> Trainer:
    return OptimizerTrainer(model, torch.optim.AdamW(model.parameters(), lr=lr), task)


#: K-FAC's benchmark settings (curvature and inverses every 10 steps, the cheap regime of Martens & Grosse).
KFAC_BENCH_OPTIONS: dict[str, Any] = {
    "momentum": 0.9,
    "damping": 1e-3,
    "factor_every": 10,
    "inverse_every": 10,
    "kl_clip": 1e-3,
}

#: AdaFisher's benchmark settings: statistics every 10 steps (as K-FAC's above; the default T_cov = 100 would give
#: the short bench runs only a few updates), every other value its default (λ 1e-3, β 0.9, EMA decay 0.8).
ADAFISHER_BENCH_OPTIONS: dict[str, Any] = {"factor_every": 10}

#: SINGD's benchmark settings: T = 10 as K-FAC's above, β1 = 1e-2, λ = 1e-3 (the paper's defaults), momentum 0.9.
SINGD_BENCH_OPTIONS: dict[str, Any] = {"factor_every": 10, "lr_cov": 1e-2, "damping": 1e-3, "momentum": 0.9}


def kronfac_trainer(model: nn.Module, task: Task, optimizer: Callable[..., Any], **options: Any) -> Trainer:
    """A kronfac optimizer with the task's curvature options; the one-time first-order warning is silenced
    (every task has LayerNorms or such, and the report lists no warnings)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="kronfac.*first-order update")
        opt = optimizer(model, **options, **task.curvature_options)
    return OptimizerTrainer(model, opt, task)


def _kfac(model: nn.Module, lr: float, task: Task, **extra: Any) -> Trainer:
    from kronfac.optim.kfac import KFAC

    return kronfac_trainer(model, task, KFAC, lr=lr, **{**KFAC_BENCH_OPTIONS, **extra})


def _adafisher(weight_decay: float, decoupled: bool) -> Callable[..., Trainer]:
    def make(model: nn.Module, lr: float, task: Task) -> Trainer:
        from kronfac.optim.adafisher import AdaFisher, AdaFisherW

        cls = AdaFisherW if decoupled else AdaFisher
        return kronfac_trainer(model, task, cls, lr=lr, weight_decay=weight_decay, **ADAFISHER_BENCH_OPTIONS)

    return make


def _kfac_kldwrm(variant: str, decay: float) -> Callable[..., Trainer]:
    """K-FAC's benchmark platform plus a KLD-WRM correction (Puiu 2022); the wake decay ρ is tied to the factor
    decay as in the paper (0.33 for SO, 0.5 for Q/QE); QE takes 3 inner steps against 3 stored networks."""

    def make(model: nn.Module, lr: float, task: Task) -> Trainer:
        from kronfac.optim.corrections import KLDWRM
        from kronfac.optim.kfac import KFAC

        rule = KLDWRM(variant, inner_steps=3, networks=3)
        options = {**KFAC_BENCH_OPTIONS, "factor_decay": decay}
        return kronfac_trainer(model, task, KFAC, lr=lr, correction=rule, **options)

    return make


def _cgfac(model: nn.Module, lr: float, task: Task) -> Trainer:
    from kronfac.optim.cgfac import CGFAC

    # rows of the current batch every step (Chen 2021): stale rows leave the gradient outside their span
    options = {key: KFAC_BENCH_OPTIONS[key] for key in ("momentum", "damping", "kl_clip")}
    return kronfac_trainer(model, task, CGFAC, lr=lr, max_iters=10, factor_every=1, **options)


def _singd(structures: tuple[Any, Any], kfac_like: bool = False) -> Callable[..., Trainer]:
    def make(model: nn.Module, lr: float, task: Task) -> Trainer:
        from kronfac.optim.singd import SINGD

        return kronfac_trainer(
            model, task, SINGD, lr=lr, structures=structures, kfac_like=kfac_like, **SINGD_BENCH_OPTIONS
        )

    return make


register_method(Method("sgd", _sgd, (0.03, 0.1, 0.3), "SGD, momentum 0.9"))
register_method(Method("adamw", _adamw, (3e-4, 1e-3, 3e-3), "AdamW (torch), weight decay 0.01"))
register_method(
    Method(
        "kfac",
        _kfac,
        (0.03, 0.1, 0.3),
        "kronfac.KFAC, factors and inverses every 10 steps, KL clip 1e-3, damping swept over 1e-3 and 1e-2",
        grid=({"damping": 1e-3}, {"damping": 1e-2}),
    )
)
register_method(
    Method("adafisher", _adafisher(0.0, False), (3e-3, 1e-2, 3e-2), "kronfac.AdaFisher, statistics every 10 steps")
)
register_method(
    Method(
        "adafisherw",
        _adafisher(0.01, True),
        (3e-3, 1e-2, 3e-2),
        "kronfac.AdaFisherW, decoupled weight decay 0.01 (as AdamW), statistics every 10 steps",
    )
)
for _variant, _decay in (("so", 0.33), ("q", 0.5), ("qe", 0.5)):
    register_method(
        Method(
            f"kfac-kldwrm-{_variant}",
            _kfac_kldwrm(_variant, _decay),
            (0.03, 0.1, 0.3),
            f"kronfac.KFAC + KLDWRM('{_variant}'), ρ = factor decay {_decay}, otherwise as kfac",
        )
    )
register_method(
    Method("cgfac", _cgfac, (0.03, 0.1, 0.3), "kronfac.CGFAC, 10 CG iterations on the current batch's rows")
)
_SINGD_STRUCTURES: dict[str, tuple[Any, Any]] = {
    "singd": ("dense", "dense"),
    "singd-diagonal": ("diagonal", "diagonal"),
    "singd-block": (("block_diagonal", {"block_size": 8}), ("block_diagonal", {"block_size": 8})),
    "singd-tril": ("lower_triangular", "lower_triangular"),
}
for _name, _structures in _SINGD_STRUCTURES.items():
    register_method(Method(_name, _singd(_structures), (0.01, 0.03, 0.1), f"kronfac.SINGD {_structures}, T=10, λ=1e-3"))
register_method(
    Method("ikfac", _singd(("dense", "dense"), True), (0.01, 0.03, 0.1), "kronfac.SINGD IKFAC (kfac_like), T=10")
)
