"""Peer methods run in the same harness, each only when its package is importable, with the settings its
authors recommend as the first trial of the tuning protocol:

* ``muon``: ``torch.optim.Muon`` (torch >= 2.9) for the 2-D hidden weights, AdamW for the rest (embeddings, the
  output head, biases, norms, convolution filters, which torch's Muon does not take) as Jordan et al. 2024
  recommend; Liu et al. 2025's (Moonshot) ``adjust_lr_fn="match_rms_adamw"``, so both share one learning rate
  and weight decay (0.1), momentum 0.95 with Nesterov, 5 Newton-Schulz steps.
* ``soap``, ``shampoo``, ``psgd-kron``: from ``pytorch-optimizer`` (pin in the ``bench`` extra). SOAP (Vyas et al.
  2024) with its paper's lr 3e-3, betas (0.95, 0.95), weight decay 0.01, preconditioner every 10 steps.
  Shampoo as ``ScalableShampoo`` (Anil et al. 2020) with the AlgoPerf-winning recipe of Shi et al. 2023 where the
  package has it: betas (0.95, 0.995), RMSProp grafting, decoupled weight decay, inverse roots every 10 steps
  (the recipe's 100 is sized for runs 100x longer than these) from step 10. PSGD Kron (Li 2018, 2024) with its
  defaults: momentum 0.9, the annealed preconditioner-update probability, lr 3e-4 (its authors: 3-10x below
  Adam's). ``pytorch-optimizer`` contracts PSGD's factors with ``torch.einsum``, which needs ``opt_einsum`` to
  pick a contraction order (without it a step takes 100x longer); the ``bench`` extra installs it.
* ``singd-ikfac`` (PyPI ``singd``, IKFAC) and ``asdl-kfac`` (``asdfghjkl``, imported as ``asdl``, K-FAC with the
  empirical Fisher), with the curvature and preconditioner intervals of the K-FAC bench method. ASDL calls NVTX
  ranges, which a CPU-only torch cannot run: the harness replaces them by no-ops, and ASDL needs damping >= 1e-2.
* ``kfac-pytorch`` (Pauloski et al. 2021, imported as ``kfac``; not on PyPI, so never a dependency) when a
  checkout of it is importable: its ``KFACPreconditioner`` on SGD with momentum, intervals as K-FAC's here.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import Tensor, nn

from kronfac.bench.methods import (
    DAMPING,
    EPS,
    KFAC_BENCH_OPTIONS,
    WD_COUPLED,
    WD_DECOUPLED,
    Method,
    MultiOptimizerTrainer,
    OptimizerTrainer,
    Trainer,
    register_method,
)
from kronfac.bench.space import Range
from kronfac.bench.tasks import Task

__all__ = ["AsdlKfacTrainer", "KfacPytorchTrainer", "muon_parameters"]

INTERVAL = KFAC_BENCH_OPTIONS["inverse_every"]


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _singd_ikfac(model: nn.Module, lr: float, task: Task, damping: float = 1e-3, weight_decay: float = 0.0) -> Trainer:
    from singd.optim.optimizer import SINGD

    loss_average = task.curvature_options.get("loss_average", "batch")
    opt = SINGD(
        model, lr=lr, momentum=0.9, damping=damping, T=INTERVAL, kfac_like=True, warn_unsupported=False,
        loss_average=loss_average, weight_decay=weight_decay,
    )  # fmt: skip
    return OptimizerTrainer(model, opt, task)


def muon_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(Muon's, AdamW's) parameters: the 2-D weights of every module except embeddings and the output head (the
    last ``nn.Linear`` registered), and everything else."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    head = linears[-1] if linears else None
    matrices: list[nn.Parameter] = []
    for module in model.modules():
        if module is head or isinstance(module, nn.Embedding):
            continue
        matrices += [p for p in module.parameters(recurse=False) if p.ndim == 2 and p.requires_grad]
    chosen = {id(p) for p in matrices}
    return matrices, [p for p in model.parameters() if id(p) not in chosen and p.requires_grad]


def _muon(model: nn.Module, lr: float, task: Task, weight_decay: float = 0.1) -> Trainer:
    matrices, rest = muon_parameters(model)
    optimizers: list[torch.optim.Optimizer] = []
    if matrices:  # a CNN whose only matrix is its head has none: it trains with AdamW alone
        optimizers.append(
            torch.optim.Muon(  # torch >= 2.9
                matrices,
                lr=lr,
                weight_decay=weight_decay,
                momentum=0.95,
                nesterov=True,
                ns_steps=5,
                adjust_lr_fn="match_rms_adamw",
            )
        )
    if rest:
        optimizers.append(torch.optim.AdamW(rest, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay))
    return MultiOptimizerTrainer(model, optimizers, task)


def _soap(model: nn.Module, lr: float, task: Task, weight_decay: float = 0.01, eps: float = 1e-8) -> Trainer:
    from pytorch_optimizer import SOAP

    opt = SOAP(model.parameters(), lr=lr, betas=(0.95, 0.95), weight_decay=weight_decay, eps=eps,
               precondition_frequency=INTERVAL)  # fmt: skip
    return OptimizerTrainer(model, opt, task)


def _shampoo(model: nn.Module, lr: float, task: Task, weight_decay: float = 1e-4, matrix_eps: float = 1e-6) -> Trainer:
    from pytorch_optimizer import ScalableShampoo
    from pytorch_optimizer.optimizer.utils.graft import LayerWiseGrafting

    opt = ScalableShampoo(
        model.parameters(), lr=lr, betas=(0.95, 0.995), weight_decay=weight_decay, decoupled_weight_decay=True,
        graft_type=LayerWiseGrafting.RMSPROP, start_preconditioning_step=INTERVAL,
        preconditioning_compute_steps=INTERVAL, matrix_eps=matrix_eps,
    )  # fmt: skip
    return OptimizerTrainer(model, opt, task)


def _psgd_kron(model: nn.Module, lr: float, task: Task, weight_decay: float = 0.0) -> Trainer:
    from pytorch_optimizer import Kron

    return OptimizerTrainer(model, Kron(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay), task)


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

    def __init__(
        self, model: nn.Module, lr: float, task: Task, damping: float = 1e-2, weight_decay: float = 0.0
    ) -> None:
        _stub_nvtx()
        import asdl

        config = asdl.PreconditioningConfig(
            data_size=task.batch_size, damping=damping, preconditioner_upd_interval=INTERVAL,
            curvature_upd_interval=INTERVAL, ema_decay=0.05,
        )  # fmt: skip
        self.model, self.task = model, task
        self.maker = asdl.KfacGradientMaker(model, config, fisher_type="fisher_emp")
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)

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

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]


class KfacPytorchTrainer(Trainer):
    """kfac-pytorch's ``KFACPreconditioner`` preconditioning ``.grad`` for SGD with momentum."""

    def __init__(self, model: nn.Module, lr: float, task: Task, damping: float = 1e-3) -> None:
        from kfac.preconditioner import KFACPreconditioner

        self.model, self.task = model, task
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        self.preconditioner = KFACPreconditioner(
            model, factor_update_steps=INTERVAL, inv_update_steps=INTERVAL, damping=damping,
            kl_clip=KFAC_BENCH_OPTIONS["kl_clip"], lr=lambda _: self.optimizer.param_groups[0]["lr"],
        )  # fmt: skip

    def step(self, x: Tensor, y: Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.task.loss(self.model(x), y)
        loss.backward()
        self.preconditioner.step()
        self.optimizer.step()
        return loss.item()

    def state_objects(self) -> list[Any]:
        return [self.optimizer.state_dict(), self.preconditioner.state_dict(include_factors=True)]

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]


def _has_muon() -> bool:
    return hasattr(torch.optim, "Muon")


register_method(
    Method(
        "muon",
        _muon,
        (3e-4, 1e-3, 3e-3),
        "torch.optim.Muon (2-D hidden weights, match_rms_adamw) + AdamW for the rest, shared lr, weight decay 0.1",
        available=_has_muon,
        space={"lr": Range(1e-4, 1e-2), "weight_decay": WD_DECOUPLED},
        recommended={"lr": 1e-3, "weight_decay": 0.1},
        cost=1.5,
        family="peer",
    )
)
register_method(
    Method(
        "soap",
        _soap,
        (1e-3, 3e-3, 1e-2),
        f"pytorch-optimizer SOAP, betas (0.95, 0.95), eigenbases every {INTERVAL} steps",
        available=lambda: _installed("pytorch_optimizer"),
        space={"lr": Range(3e-4, 3e-2), "weight_decay": WD_DECOUPLED, "eps": EPS},
        recommended={"lr": 3e-3, "weight_decay": 0.01, "eps": 1e-8},
        cost=3.0,
        family="peer",
    )
)
register_method(
    Method(
        "shampoo",
        _shampoo,
        (3e-4, 1e-3, 3e-3),
        f"pytorch-optimizer ScalableShampoo, betas (0.95, 0.995), RMSProp grafting, roots every {INTERVAL} steps",
        available=lambda: _installed("pytorch_optimizer"),
        space={"lr": Range(1e-4, 1e-2), "weight_decay": WD_DECOUPLED, "matrix_eps": Range(1e-8, 1e-4)},
        recommended={"lr": 1e-3, "weight_decay": 1e-4, "matrix_eps": 1e-6},
        cost=4.0,
        family="peer",
    )
)
register_method(
    Method(
        "psgd-kron",
        _psgd_kron,
        (1e-4, 3e-4, 1e-3),
        "pytorch-optimizer Kron (PSGD Kron), momentum 0.9, annealed preconditioner-update probability",
        available=lambda: _installed("pytorch_optimizer") and _installed("opt_einsum"),
        space={"lr": Range(3e-5, 3e-3), "weight_decay": WD_DECOUPLED},
        recommended={"lr": 3e-4, "weight_decay": 0.0},
        cost=6.0,
        family="peer",
    )
)
register_method(
    Method(
        "singd-ikfac",
        _singd_ikfac,
        (0.03, 0.1, 0.3),
        f"PyPI singd, IKFAC (kfac_like=True), dense, T={INTERVAL}",
        available=lambda: _installed("singd"),
        space={"lr": Range(0.01, 1.0), "damping": DAMPING, "weight_decay": WD_COUPLED},
        recommended={"lr": 0.1, "damping": 1e-3, "weight_decay": 0.0},
        cost=1.7,
        family="peer",
    )
)
register_method(
    Method(
        "asdl-kfac",
        AsdlKfacTrainer,
        (0.001, 0.003, 0.01),
        f"PyPI asdfghjkl (ASDL), K-FAC empirical Fisher, damping 1e-2, intervals {INTERVAL}",
        available=lambda: _installed("asdl"),
        space={"lr": Range(3e-4, 0.1), "damping": Range(1e-2, 1.0), "weight_decay": WD_COUPLED},
        recommended={"lr": 3e-3, "damping": 1e-2, "weight_decay": 0.0},
        cost=1.3,
        family="peer",
    )
)
register_method(
    Method(
        "kfac-pytorch",
        KfacPytorchTrainer,
        (0.03, 0.1, 0.3),
        f"kfac-pytorch KFACPreconditioner + SGD momentum 0.9, intervals {INTERVAL} (only when importable)",
        available=lambda: _installed("kfac") and _installed("kfac.preconditioner"),
        space={"lr": Range(0.01, 1.0), "damping": DAMPING},
        recommended={"lr": 0.1, "damping": 1e-3},
        cost=1.5,
        family="peer",
    )
)
