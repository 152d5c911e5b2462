"""Optimization methods the benchmark compares, each with its recommended setting and its search space.

A method turns ``(model, lr, task, **hyperparameters)`` into a :class:`Trainer` whose ``step(x, y)`` does one
full training step and returns the loss. Built-in: SGD with momentum, AdamW and every kronfac method (K-FAC,
thermodynamic K-FAC, each KLD-WRM variant, SINGD and its structures, IKFAC, AdaFisher(W), CG-FAC); peers
(Muon, SOAP, Shampoo, PSGD Kron, ``singd``, ASDL, kfac-pytorch) in :mod:`kronfac.bench.peers`, when installed.
Later methods add themselves with :func:`register_method`.

The tuning protocol (:mod:`kronfac.bench.protocol`) draws a method's trials from ``space`` (plus the shared
warmup range) starting at ``recommended``; ``lr_grid`` and ``grid`` are the older grid sweep's, kept for the
studies under ``benchmarks/`` that call :func:`kronfac.bench.runner.sweep`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kronfac.bench.space import WARMUP, Range, trials
from kronfac.bench.tasks import Task

__all__ = ["METHODS", "Method", "MultiOptimizerTrainer", "OptimizerTrainer", "Trainer", "register_method"]


class Trainer:
    """One training step of a method; ``state_objects`` are measured for optimizer-state bytes, ``optimizers``
    get the run's learning-rate schedule."""

    def step(self, x: Tensor, y: Tensor) -> float:
        raise NotImplementedError

    def state_objects(self) -> list[Any]:
        return []

    def optimizers(self) -> list[torch.optim.Optimizer]:
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

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]

    def close(self) -> None:
        close = getattr(self.optimizer, "close", None)
        if close is not None:
            close()


class MultiOptimizerTrainer(Trainer):
    """Several optimizers over disjoint parameters stepped together (Muon for the matrices, AdamW for the rest)."""

    def __init__(self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], task: Task) -> None:
        self.model, self.task, self._optimizers = model, task, list(optimizers)

    def step(self, x: Tensor, y: Tensor) -> float:
        for opt in self._optimizers:
            opt.zero_grad(set_to_none=True)
        loss = self.task.loss(self.model(x), y)
        loss.backward()
        for opt in self._optimizers:
            opt.step()
        return loss.item()

    def state_objects(self) -> list[Any]:
        return [opt.state_dict() for opt in self._optimizers]

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return list(self._optimizers)


@dataclass
class Method:
    """A named method: ``make(model, lr, task, **hyperparameters) -> Trainer``, its recommended setting and
    search space.

    Args:
        name: identifier on the command line.
        make: builds the trainer; keyword arguments are the hyperparameters of ``space`` other than ``lr`` and
            ``warmup`` (the runner applies the schedule).
        lr_grid: learning rates of the older grid sweep; also the fallback space when ``space`` is empty.
        description: one line for ``--list`` and the report.
        available: whether its packages are importable.
        grid: further hyperparameters of the grid sweep.
        space: the ranges the tuning protocol searches (warmup is added for every method).
        recommended: the authors' recommended setting (the first trial); keys outside ``space`` stay fixed.
        cost: expected step time relative to AdamW's, which weighs the progress bar.
        family: ``"kronfac"`` (ours), ``"peer"`` (another library's second-order or matrix method) or
            ``"baseline"`` (SGD, AdamW); the report compares our best with the best of the others.
    """

    name: str
    make: Callable[..., Trainer]
    lr_grid: Sequence[float]
    description: str = ""
    available: Callable[[], bool] = lambda: True
    #: Further hyperparameters swept together with the learning rate (passed to ``make`` as keywords).
    grid: Sequence[dict[str, Any]] = ({},)
    space: Mapping[str, Range] = field(default_factory=dict)
    recommended: Mapping[str, Any] = field(default_factory=dict)
    cost: float = 1.0
    family: str = "kronfac"

    def configurations(self) -> list[dict[str, Any]]:
        """Every point of the grid sweep: ``{"lr": ..., **extra}``."""
        return [{"lr": lr, **extra} for extra in self.grid for lr in self.lr_grid]

    def search_space(self) -> dict[str, Range]:
        space = dict(self.space) or {"lr": Range(min(self.lr_grid), max(self.lr_grid))}
        return {**space, "warmup": WARMUP}

    def trials(self, n: int, seed: int = 0) -> list[dict[str, Any]]:
        """The protocol's ``n`` trials: the recommended setting, then quasi-random points of the space."""
        lrs = sorted(self.lr_grid)
        recommended = {"lr": lrs[len(lrs) // 2], "warmup": 0.05, **self.recommended}
        return trials(self.search_space(), recommended, n, seed)


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def _sgd(model: nn.Module, lr: float, task: Task, weight_decay: float = 0.0) -> Trainer:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    return OptimizerTrainer(model, opt, task)


def _adamw(model: nn.Module, lr: float, task: Task, weight_decay: float = 0.01, eps: float = 1e-8) -> Trainer:
    return OptimizerTrainer(
        model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, eps=eps), task
    )


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


def _kfac_thermodynamic(model: nn.Module, lr: float, task: Task, **extra: Any) -> Trainer:
    from kronfac.linalg.thermodynamic import ThermodynamicConfig
    from kronfac.optim.kfac import KFAC

    # method 1: the simulated device inverts the damped factors every inverse_every steps (ideal hardware)
    options = {**KFAC_BENCH_OPTIONS, **extra}
    return kronfac_trainer(model, task, KFAC, lr=lr, inverse=ThermodynamicConfig(method=1), **options)


def _adafisher(weight_decay: float, decoupled: bool) -> Callable[..., Trainer]:
    def make(model: nn.Module, lr: float, task: Task, **extra: Any) -> Trainer:
        from kronfac.optim.adafisher import AdaFisher, AdaFisherW

        cls = AdaFisherW if decoupled else AdaFisher
        options = {"weight_decay": weight_decay, **ADAFISHER_BENCH_OPTIONS, **extra}
        return kronfac_trainer(model, task, cls, lr=lr, **options)

    return make


def _kfac_kldwrm(variant: str, decay: float) -> Callable[..., Trainer]:
    """K-FAC's benchmark platform plus a KLD-WRM correction (Puiu 2022); the wake decay ρ is tied to the factor
    decay as in the paper (0.33 for SO, 0.5 for Q/QE); QE takes 3 inner steps against 3 stored networks."""

    def make(model: nn.Module, lr: float, task: Task, **extra: Any) -> Trainer:
        from kronfac.optim.corrections import KLDWRM
        from kronfac.optim.kfac import KFAC

        rule = KLDWRM(variant, inner_steps=3, networks=3)
        options = {**KFAC_BENCH_OPTIONS, "factor_decay": decay, **extra}
        return kronfac_trainer(model, task, KFAC, lr=lr, correction=rule, **options)

    return make


def _cgfac(model: nn.Module, lr: float, task: Task, **extra: Any) -> Trainer:
    from kronfac.optim.cgfac import CGFAC

    # rows of the current batch every step (Chen 2021): stale rows leave the gradient outside their span
    options = {**{key: KFAC_BENCH_OPTIONS[key] for key in ("momentum", "damping", "kl_clip")}, **extra}
    return kronfac_trainer(model, task, CGFAC, lr=lr, max_iters=10, factor_every=1, **options)


def _singd(structures: tuple[Any, Any], kfac_like: bool = False) -> Callable[..., Trainer]:
    def make(model: nn.Module, lr: float, task: Task, **extra: Any) -> Trainer:
        from kronfac.optim.singd import SINGD

        options = {**SINGD_BENCH_OPTIONS, **extra}
        return kronfac_trainer(model, task, SINGD, lr=lr, structures=structures, kfac_like=kfac_like, **options)

    return make


# Search spaces shared by the methods below (every method also searches warmup, kronfac.bench.space.WARMUP).
#: Decoupled weight decay (AdamW and the peers that follow it: the step shrinks θ by lr·η·θ).
WD_DECOUPLED = Range(1e-4, 0.3)
#: L2 weight decay added to the gradient (SGD, K-FAC and the kronfac methods built on it).
WD_COUPLED = Range(1e-6, 1e-3)
#: Tikhonov damping λ of the curvature (K-FAC, SINGD, CG-FAC, ASDL).
DAMPING = Range(1e-4, 1e-1)
#: Adam-style ε (AdamW, SOAP).
EPS = Range(1e-10, 1e-6)
_KFAC_SPACE = {"lr": Range(0.01, 1.0), "damping": DAMPING, "weight_decay": WD_COUPLED}
_KFAC_RECOMMENDED = {"lr": 0.1, "damping": 1e-3, "weight_decay": 0.0}

register_method(
    Method(
        "sgd",
        _sgd,
        (0.03, 0.1, 0.3),
        "SGD, momentum 0.9",
        space={"lr": Range(0.01, 1.0), "weight_decay": WD_COUPLED},
        recommended={"lr": 0.1, "weight_decay": 0.0},
        family="baseline",
    )
)
register_method(
    Method(
        "adamw",
        _adamw,
        (3e-4, 1e-3, 3e-3),
        "AdamW (torch), betas (0.9, 0.999)",
        space={"lr": Range(1e-4, 1e-2), "weight_decay": WD_DECOUPLED, "eps": EPS},
        recommended={"lr": 1e-3, "weight_decay": 0.01, "eps": 1e-8},
        family="baseline",
    )
)
register_method(
    Method(
        "kfac",
        _kfac,
        (0.03, 0.1, 0.3),
        "kronfac.KFAC, factors and inverses every 10 steps, KL clip 1e-3, momentum 0.9",
        grid=({"damping": 1e-3}, {"damping": 1e-2}),
        space=_KFAC_SPACE,
        recommended=_KFAC_RECOMMENDED,
        cost=1.7,
    )
)
register_method(
    Method(
        "kfac-thermo",
        _kfac_thermodynamic,
        (0.03, 0.1, 0.3),
        "kronfac.KFAC with ThermodynamicConfig(method=1): inverses by the simulated OU device, otherwise as kfac",
        space=_KFAC_SPACE,
        recommended=_KFAC_RECOMMENDED,
        cost=5.0,
    )
)
_ADAFISHER_SPACE = {"lr": Range(1e-3, 1e-1), "damping": DAMPING}
register_method(
    Method(
        "adafisher",
        _adafisher(0.0, False),
        (3e-3, 1e-2, 3e-2),
        "kronfac.AdaFisher, statistics every 10 steps",
        space={**_ADAFISHER_SPACE, "weight_decay": WD_COUPLED},
        recommended={"lr": 1e-2, "damping": 1e-3},
        cost=1.1,
    )
)
register_method(
    Method(
        "adafisherw",
        _adafisher(0.01, True),
        (3e-3, 1e-2, 3e-2),
        "kronfac.AdaFisherW, decoupled weight decay (as AdamW), statistics every 10 steps",
        space={**_ADAFISHER_SPACE, "weight_decay": WD_DECOUPLED},
        recommended={"lr": 1e-2, "damping": 1e-3, "weight_decay": 0.01},
        cost=1.1,
    )
)
for _variant, _decay in (("so", 0.33), ("q", 0.5), ("qe", 0.5)):
    register_method(
        Method(
            f"kfac-kldwrm-{_variant}",
            _kfac_kldwrm(_variant, _decay),
            (0.03, 0.1, 0.3),
            f"kronfac.KFAC + KLDWRM('{_variant}'), ρ = factor decay {_decay}, otherwise as kfac",
            space=_KFAC_SPACE,
            recommended=_KFAC_RECOMMENDED,
            cost=4.0 if _variant == "qe" else 2.0,
        )
    )
register_method(
    Method(
        "cgfac",
        _cgfac,
        (0.03, 0.1, 0.3),
        "kronfac.CGFAC, 10 CG iterations on the current batch's rows",
        space=_KFAC_SPACE,
        recommended=_KFAC_RECOMMENDED,
        cost=6.0,
    )
)
_SINGD_STRUCTURES: dict[str, tuple[Any, Any]] = {
    "singd": ("dense", "dense"),
    "singd-diagonal": ("diagonal", "diagonal"),
    "singd-block": (("block_diagonal", {"block_size": 8}), ("block_diagonal", {"block_size": 8})),
    "singd-tril": ("lower_triangular", "lower_triangular"),
}
_SINGD_SPACE = {"lr": Range(3e-3, 0.3), "damping": DAMPING, "weight_decay": WD_COUPLED}
_SINGD_RECOMMENDED = {"lr": 0.03, "damping": 1e-3, "weight_decay": 0.0}
for _name, _structures in _SINGD_STRUCTURES.items():
    register_method(
        Method(
            _name,
            _singd(_structures),
            (0.01, 0.03, 0.1),
            f"kronfac.SINGD {_structures}, T=10, λ=1e-3",
            space=_SINGD_SPACE,
            recommended=_SINGD_RECOMMENDED,
            cost=2.0,
        )
    )
register_method(
    Method(
        "ikfac",
        _singd(("dense", "dense"), True),
        (0.01, 0.03, 0.1),
        "kronfac.SINGD IKFAC (kfac_like), T=10",
        space=_SINGD_SPACE,
        recommended=_SINGD_RECOMMENDED,
        cost=1.7,
    )
)
