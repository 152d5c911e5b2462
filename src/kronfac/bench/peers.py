"""Peer libraries run in the same harness (only when installed): ``singd`` (its IKFAC, SINGD's K-FAC-like
inverse-free variant) and ASDL (``asdfghjkl``, imported as ``asdl``, its K-FAC with the empirical Fisher).

Both use the curvature and preconditioner intervals of the K-FAC bench method. ASDL calls NVTX ranges, which a
CPU-only torch cannot run: the harness replaces them by no-ops, and ASDL needs damping >= 1e-2 here.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import Tensor, nn

from kronfac.bench.methods import KFAC_BENCH_OPTIONS, Method, OptimizerTrainer, Trainer, register_method
from kronfac.bench.tasks import Task

__all__ = ["AsdlKfacTrainer"]

INTERVAL = KFAC_BENCH_OPTIONS["inverse_every"]


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _singd_ikfac(model: nn.Module, lr: float, task: Task) -> Trainer:
    from singd.optim.optimizer import SINGD

    loss_average = task.curvature_options.get("loss_average", "batch")
    opt = SINGD(
        model, lr=lr, momentum=0.9, damping=1e-3, T=INTERVAL, kfac_like=True, warn_unsupported=False,
        loss_average=loss_average,
    )  # fmt: skip
    return OptimizerTrainer(model, opt, task)


def _stub_nvtx() -> None:
    if not torch.cuda.is_available():
        torch.cuda.nvtx.range_push = lambda *args, **kwargs: 0
        torch.cuda.nvtx.range_pop = lambda *args, **kwargs: 0


def _flat_cross_entropy(output: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy over the last dimension with the ``reduction`` option ASDL requires."""
    flat = output.reshape(-1, output.shape[-1])
    return nn.functional.cross_entropy(flat, target.reshape(-1), reduction=reduction)


class AsdlKfacTrainer(Trainer):
    """ASDL's ``KfacGradientMaker`` (empirical Fisher) preconditioning ``.grad`` for SGD with momentum."""

    def __init__(self, model: nn.Module, lr: float, task: Task) -> None:
        _stub_nvtx()
        import asdl

        config = asdl.PreconditioningConfig(
            data_size=task.batch_size, damping=1e-2, preconditioner_upd_interval=INTERVAL,
            curvature_upd_interval=INTERVAL, ema_decay=0.05,
        )  # fmt: skip
        self.model, self.task = model, task
        self.maker = asdl.KfacGradientMaker(model, config, fisher_type="fisher_emp")
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def step(self, x: Tensor, y: Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        dummy = self.maker.setup_model_call(self.model, x)
        self.maker.setup_loss_call(_flat_cross_entropy, dummy, y)
        _, loss = self.maker.forward_and_backward()
        self.optimizer.step()
        return loss.item()

    def state_objects(self) -> list[Any]:
        # ASDL keeps its curvature on the modules (``module.fisher``: SymMatrix -> Kron -> A, B, inverses).
        return [self.optimizer.state_dict(), [getattr(m, "fisher", None) for m in self.model.modules()]]


register_method(
    Method(
        "singd-ikfac",
        _singd_ikfac,
        (0.03, 0.1, 0.3),
        f"PyPI singd, IKFAC (kfac_like=True), dense, T={INTERVAL}",
        available=lambda: _installed("singd"),
    )
)
register_method(
    Method(
        "asdl-kfac",
        AsdlKfacTrainer,
        (0.001, 0.003, 0.01),
        f"PyPI asdfghjkl (ASDL), K-FAC empirical Fisher, damping 1e-2, intervals {INTERVAL}",
        available=lambda: _installed("asdl"),
    )
)
