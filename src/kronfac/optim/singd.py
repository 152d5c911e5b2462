"""SINGD: structured inverse-free natural gradient descent (Lin, Dangel, Eschenhagen, Bae, Turner, Makhzani,
"Structured Inverse-Free Natural Gradient Descent: Memory-Efficient & Numerically-Stable KFAC", ICML 2024).

IKFAC (``kfac_like=True``) is the inverse-free K-FAC of the same paper. The update of the factors is the
functional kernel :mod:`kronfac.curvature.singd_update`; the structures live in
:mod:`kronfac.curvature.structures`; this class only wires them into the shared :class:`KronOptimizer`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from kronfac.curvature.block import CurvatureBlock
from kronfac.curvature.singd_block import SINGDBlock
from kronfac.curvature.structures import StructureSpec, parse_structure
from kronfac.optim.base import KronOptimizer, Schedule, check_positive_int, check_range
from kronfac.optim.functional import momentum_update_
from kronfac.optim.registry import register_optimizer

__all__ = ["SINGD"]

#: Defaults of the SINGD paper (Lin et al. 2024, Table of hyperparameters / reference implementation ``singd``).
SINGD_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,  # β2
    "momentum": 0.9,  # α2
    "weight_decay": 0.0,  # γ
    "damping": 1e-3,  # λ
    "lr_cov": 1e-2,  # β1
    "alpha1": 0.5,  # α1
    "update_every": 10,  # T
}


class SINGD(KronOptimizer):
    r"""SINGD (and IKFAC) as a ``torch.optim.Optimizer``.

    Per supported layer (Linear, Conv2d, Embedding) with gradient matrix ``∇W`` (``d_o x d_i``), SINGD keeps
    ``K`` (``d_i x d_i``, ``K K^T ≈ A^{-1}``), ``C`` (``d_o x d_o``, ``C C^T ≈ G^{-1}``) and momenta ``m_K, m_C``
    in the chosen structures, initialised to ``I`` and ``0``. Every ``update_every`` (``T``) steps, with
    ``H_K = Π(K^T A K)``, ``H_C = Π(C^T G C)`` of the current batch::

        m_K <- α1 m_K + ½ [(tr H_C / d_o) H_K + λ (tr Π(C^T C) / d_o) Π(K^T K) - I],   K <- K - β1 K m_K

    and symmetrically for ``C``. Every step: ``Δ = C C^T ∇W K K^T + γ W``, ``b <- α2 b + Δ``, ``W <- W - β2 b``.
    IKFAC (``kfac_like=True``) drops the trace factors and the Riemannian momentum (``α1 = 0``); its fixed point
    is ``K K^T = (A + λI)^{-1}``. No matrix is ever inverted, so the method runs in bfloat16. Parameters of
    other modules get ``b <- α2 b + ∇θ + γ θ``, ``θ <- θ - β2 b``.

    Args:
        model: the model.
        lr: ``β2``, learning rate of the parameters (float or callable of the step).
        momentum: ``α2``, heavy-ball momentum of the parameters.
        weight_decay: ``γ``, added to the preconditioned update (as in the paper).
        damping: ``λ`` (float or callable of the step).
        lr_cov: ``β1``, step size of ``K`` and ``C`` (float or callable of the step).
        alpha1: ``α1``, Riemannian momentum of ``m_K``, ``m_C`` (ignored when ``kfac_like``).
        update_every: ``T``, the factors are updated every this many steps.
        structures: structures of ``K`` and ``C``, e.g. ``("diagonal", "dense")`` or
            ``(("block_diagonal", {"block_size": 16}), "lower_triangular")``; per param group too. Embedding
            layers always keep a diagonal ``K`` (their ``A`` is diagonal).
        kfac_like: IKFAC instead of SINGD.
        preconditioner_dtype: dtype of ``K, C, m_K, m_C``; ``None`` uses each layer's parameter dtype.
        **kwargs: curvature options of :class:`~kronfac.optim.base.KronOptimizer` (``fisher_type``, ``loss``,
            ``loss_average``, ``approx``, ``grad_scaler``, ``on_nonfinite``, ``param_groups``, ...).

    Example:
        >>> import torch, kronfac
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> opt = kronfac.SINGD(model, lr=1e-2, structures=("diagonal", "dense"), update_every=1)
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> torch.nn.functional.cross_entropy(model(x), y).backward()
        >>> opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        model: nn.Module,
        lr: Schedule = SINGD_DEFAULTS["lr"],
        momentum: float = SINGD_DEFAULTS["momentum"],
        weight_decay: float = SINGD_DEFAULTS["weight_decay"],
        damping: Schedule = SINGD_DEFAULTS["damping"],
        lr_cov: Schedule = SINGD_DEFAULTS["lr_cov"],
        alpha1: float = SINGD_DEFAULTS["alpha1"],
        update_every: int = SINGD_DEFAULTS["update_every"],
        structures: tuple[StructureSpec, StructureSpec] = ("dense", "dense"),
        kfac_like: bool = False,
        preconditioner_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        check_range("lr", lr, 0.0)
        check_range("momentum", momentum, 0.0, 1.0)
        check_range("weight_decay", weight_decay, 0.0)
        check_range("damping", damping, 0.0, low_open=True)
        check_range("lr_cov", lr_cov, 0.0)
        check_range("alpha1", alpha1, 0.0, 1.0)
        if alpha1 >= 1.0:
            raise ValueError(f"Invalid alpha1: {alpha1!r} (must be in [0, 1))")
        check_positive_int("update_every", update_every)
        if "factor_every" in kwargs:
            raise ValueError("SINGD takes update_every (T), not factor_every")
        _check_structures(structures)
        for group in kwargs.get("param_groups") or []:
            if "structures" in group:
                _check_structures(group["structures"])
        self.preconditioner_dtype = preconditioner_dtype
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "damping": damping,
            "lr_cov": lr_cov,
            "alpha1": alpha1,
            "kfac_like": bool(kfac_like),
            "structures": tuple(structures),
        }
        super().__init__(model, defaults, factor_every=update_every, **kwargs)

    @property
    def update_every(self) -> int:
        return self.factor_every

    def make_block(self, name: str, module: nn.Module, d_in: int, d_out: int, diagonal_a: bool) -> CurvatureBlock:
        weight = module.weight
        assert isinstance(weight, Tensor)
        group = next(g for g in self.param_groups if any(p is weight for p in g["params"]))
        return SINGDBlock(
            d_in,
            d_out,
            name=name,
            structures=group["structures"],
            diagonal_a=diagonal_a,
            approx=self.approx,
            dtype=self.preconditioner_dtype or weight.dtype,
            device=weight.device,
        )

    def state_bytes(self) -> int:
        """Bytes of optimizer state: ``K, C, m_K, m_C`` of every layer plus the momentum buffers."""
        total = 0
        for layer in self.layers.values():
            block = layer.block
            assert isinstance(block, SINGDBlock)
            total += block.num_state_elements() * block.dtype.itemsize
        for pstate in self.state.values():
            buf = pstate.get("momentum_buffer")
            if buf is not None:
                total += buf.numel() * buf.element_size()
        return total

    def _check_factor_updates(self) -> bool:
        for name, layer in self.layers.items():
            block = layer.block
            if isinstance(block, SINGDBlock) and block.failed is not None:
                failed, block.failed = block.failed, None
                return self._nonfinite(f"non-finite {failed} in the SINGD update of layer {name!r}")
        return True

    def _group_updates(self, group: dict[str, Any], layers: list, plain: list[nn.Parameter]) -> tuple[list, list]:
        weight_decay = self.group_value(group, "weight_decay")
        params: list[Tensor] = []
        updates: list[Tensor] = []
        for layer in layers:
            if any(p.grad is None for p in layer.params):
                continue
            update = layer.block.precondition(layer.helper.grad_matrix(layer.module))
            if weight_decay:
                update = update + weight_decay * layer.helper.param_matrix(layer.module).to(update.dtype)
            params.extend(layer.params)
            updates.extend(u.to(p.dtype) for u, p in zip(layer.helper.split(layer.module, update), layer.params))
        for p in plain:
            if p.grad is None:
                continue
            params.append(p)
            updates.append(p.grad if not weight_decay else p.grad.add(p, alpha=weight_decay))
        return params, updates

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One SINGD step (the algorithm in the class docstring).

        Args:
            closure: re-evaluates the model and returns the loss (it runs under ``torch.enable_grad``).
        """
        loss = self.run_closure(closure)
        if not self.grads_finite():
            self.finish_step(skipped=True)
            return loss
        self.commit_curvature()
        if not self._check_factor_updates():
            self.finish_step(skipped=True)
            return loss
        for group, layers, plain in zip(self.param_groups, self.layer_groups, self._plain_params):
            params, updates = self._group_updates(group, layers, plain)
            momentum_update_(
                params,
                updates,
                self.state,
                lr=self.group_value(group, "lr"),
                momentum=self.group_value(group, "momentum"),
            )
        self.finish_step()
        return loss


def _check_structures(structures: Any) -> None:
    if not isinstance(structures, (tuple, list)) or len(structures) != 2:
        raise ValueError(f"Invalid structures: {structures!r} (must be a pair: (structure of K, structure of C))")
    for spec in structures:
        parse_structure(spec)


@register_optimizer("singd")
def _singd(model: nn.Module, **overrides: Any) -> SINGD:
    options: dict[str, Any] = {"lr": 0.05, "damping": 1e-2, "lr_cov": 0.05, "update_every": 2}
    return SINGD(model, **{**options, **overrides})


@register_optimizer("singd-structured")
def _singd_structured(model: nn.Module, **overrides: Any) -> SINGD:
    structures = (("block_diagonal", {"block_size": 4}), "diagonal")
    options: dict[str, Any] = {"lr": 0.05, "damping": 1e-2, "update_every": 1, "structures": structures}
    return SINGD(model, **{**options, **overrides})


@register_optimizer("ikfac")
def _ikfac(model: nn.Module, **overrides: Any) -> SINGD:
    options: dict[str, Any] = {"lr": 0.05, "damping": 1e-2, "lr_cov": 0.1, "update_every": 1, "kfac_like": True}
    return SINGD(model, **{**options, **overrides})
