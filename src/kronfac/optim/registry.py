"""Registry of every kronfac optimizer, used by the generic test suite and the benchmarks.

Each entry builds the optimizer for a model with settings that make it act on a tiny model in a few steps.
Later methods add themselves with :func:`register_optimizer`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.optim import Optimizer

__all__ = ["OPTIMIZERS", "register_optimizer"]

OptimizerFactory = Callable[..., Optimizer]

#: name -> factory(model, **overrides)
OPTIMIZERS: dict[str, OptimizerFactory] = {}


def register_optimizer(name: str) -> Callable[[OptimizerFactory], OptimizerFactory]:
    def wrap(factory: OptimizerFactory) -> OptimizerFactory:
        OPTIMIZERS[name] = factory
        return factory

    return wrap


@register_optimizer("kfac")
def _kfac(model: nn.Module, **overrides: Any) -> Optimizer:
    from kronfac.optim.kfac import KFAC

    options: dict[str, Any] = {"lr": 0.05, "damping": 1e-2, "factor_every": 1, "inverse_every": 2}
    return KFAC(model, **{**options, **overrides})


@register_optimizer("kfac-cholesky")
def _kfac_cholesky(model: nn.Module, **overrides: Any) -> Optimizer:
    from kronfac.linalg.cholesky import CholeskyConfig
    from kronfac.optim.kfac import KFAC

    options: dict[str, Any] = {"lr": 0.05, "damping": 1e-2, "inverse_every": 3, "inverse": CholeskyConfig()}
    return KFAC(model, **{**options, **overrides})


@register_optimizer("kfac-mc")
def _kfac_mc(model: nn.Module, **overrides: Any) -> Optimizer:
    from kronfac.optim.kfac import KFAC

    options: dict[str, Any] = {"lr": 0.05, "damping": 1e-2, "factor_every": 2, "fisher_type": "mc"}
    return KFAC(model, **{**options, **overrides})


@register_optimizer("adafisher")
def _adafisher(model: nn.Module, **overrides: Any) -> Optimizer:
    from kronfac.optim.adafisher import AdaFisher

    options: dict[str, Any] = {"lr": 1e-3, "update_every": 2, "weight_decay": 1e-4}
    return AdaFisher(model, **{**options, **overrides})


@register_optimizer("adafisherw")
def _adafisherw(model: nn.Module, **overrides: Any) -> Optimizer:
    from kronfac.optim.adafisher import AdaFisherW

    options: dict[str, Any] = {"lr": 1e-3, "update_every": 3, "weight_decay": 1e-2, "averaging": "reference"}
    return AdaFisherW(model, **{**options, **overrides})


def _kldwrm_factory(variant: str) -> OptimizerFactory:
    def factory(model: nn.Module, **overrides: Any) -> Optimizer:
        from kronfac.optim.kfac import KFAC
        from kronfac.optim.kldwrm import KLDWRM

        options: dict[str, Any] = {"lr": 0.05, "damping": 1e-2, "inverse_every": 2, "factor_decay": 0.5}
        return KFAC(model, correction=KLDWRM(variant, inner_steps=2), **{**options, **overrides})

    return factory


for _variant in ("so", "q", "qe"):
    register_optimizer(f"kfac-kldwrm-{_variant}")(_kldwrm_factory(_variant))


@register_optimizer("cgfac")
def _cgfac(model: nn.Module, **overrides: Any) -> Optimizer:
    from kronfac.optim.cgfac import CGFAC

    options: dict[str, Any] = {"lr": 0.05, "damping": 1e-2, "max_iters": 10, "history": 2}
    return CGFAC(model, **{**options, **overrides})


@register_optimizer("kfac-cg")
def _kfac_cg(model: nn.Module, **overrides: Any) -> Optimizer:
    from kronfac.linalg.cg import CGConfig
    from kronfac.optim.kfac import KFAC

    options: dict[str, Any] = {"lr": 0.05, "damping": 1e-2, "inverse_every": 1, "inverse": CGConfig(max_iters=20)}
    return KFAC(model, **{**options, **overrides})
