"""Test settings of every kronfac optimizer: the registry the generic suite (tests/optim/test_generic.py) and the
DDP replica tests run over.

Each entry builds an optimizer for a model with settings that make it act on a tiny model within a few steps
(curvature and refreshes every step or two). A new method adds itself here and inherits the whole suite.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

import kronfac
from kronfac.linalg.thermodynamic import SolverSchedule, ThermodynamicConfig

__all__ = ["DETERMINISTIC", "OPTIMIZERS", "register_optimizer", "tiny_model"]

OptimizerFactory = Callable[..., Optimizer]


def tiny_model() -> nn.Module:
    """The model the registry's settings are made for: Conv2d, Linear, a LayerNorm (first-order for most methods)
    and a Linear head, on ``(N, 1, 6, 6)`` inputs and 3 classes; seeded."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, 8),
        nn.LayerNorm(8),
        nn.Tanh(),
        nn.Linear(8, 3),
    )


#: name -> factory(model, **overrides)
OPTIMIZERS: dict[str, OptimizerFactory] = {}
#: Names whose result is a deterministic function of the global batch (no sampled labels or device noise): under
#: DDP they equal one process on the global batch.
DETERMINISTIC: set[str] = set()


def register_optimizer(
    name: str, cls: Callable[..., Optimizer], *, deterministic: bool = True, **settings: Any
) -> OptimizerFactory:
    def factory(model: nn.Module, **overrides: Any) -> Optimizer:
        return cls(model, **{**settings, **overrides})

    OPTIMIZERS[name] = factory
    if deterministic:
        DETERMINISTIC.add(name)
    return factory


KFAC_TINY: dict[str, Any] = {"lr": 0.05, "damping": 1e-2, "inverse_every": 2}

register_optimizer("kfac", kronfac.KFAC, **KFAC_TINY, factor_every=1)
register_optimizer(
    "kfac-cholesky", kronfac.KFAC, lr=0.05, damping=1e-2, inverse_every=3, inverse=kronfac.CholeskyConfig()
)
register_optimizer("kfac-mc", kronfac.KFAC, deterministic=False, **KFAC_TINY, factor_every=2, fisher_type="mc")
register_optimizer("adafisher", kronfac.AdaFisher, lr=1e-3, factor_every=2, weight_decay=1e-4)
register_optimizer("adafisherw", kronfac.AdaFisherW, lr=1e-3, factor_every=3, weight_decay=1e-2, averaging="reference")
register_optimizer("cgfac", kronfac.CGFAC, lr=0.05, damping=1e-2, max_iters=10, history=2)
register_optimizer("singd", kronfac.SINGD, lr=0.05, damping=1e-2, lr_cov=0.05, factor_every=2)
register_optimizer(
    "singd-structured",
    kronfac.SINGD,
    lr=0.05,
    damping=1e-2,
    factor_every=1,
    structures=(("block_diagonal", {"block_size": 4}), "diagonal"),
)
register_optimizer("ikfac", kronfac.SINGD, lr=0.05, damping=1e-2, lr_cov=0.1, factor_every=1, kfac_like=True)
_FAST_DEVICE = SolverSchedule(dt=0.5, burn_in=5.0, num_samples=32, num_chains=8)
register_optimizer(
    "kfac-thermodynamic",
    kronfac.KFAC,
    deterministic=False,
    **KFAC_TINY,
    inverse=ThermodynamicConfig(method=1, schedule=_FAST_DEVICE),
)


def _kldwrm(variant: str) -> OptimizerFactory:
    def factory(model: nn.Module, **overrides: Any) -> Optimizer:
        options: dict[str, Any] = {"lr": 0.05, "damping": 1e-2, "inverse_every": 2, "factor_decay": 0.5}
        return kronfac.KFAC(model, correction=kronfac.KLDWRM(variant, inner_steps=2), **{**options, **overrides})

    return factory


for _variant in ("so", "q", "qe"):
    OPTIMIZERS[f"kfac-kldwrm-{_variant}"] = _kldwrm(_variant)
    DETERMINISTIC.add(f"kfac-kldwrm-{_variant}")
