"""SINGD: structured inverse-free natural gradient descent (Lin, Dangel, Eschenhagen, Bae, Turner, Makhzani,
"Structured Inverse-Free Natural Gradient Descent: Memory-Efficient & Numerically-Stable KFAC", ICML 2024).

IKFAC (``kfac_like=True``) is the inverse-free K-FAC of the same paper. The update of the factors is the
functional kernel :mod:`kronfac.curvature.singd_update`; the structures live in
:mod:`kronfac.curvature.structures`; this class only wires them into the shared :class:`KronOptimizer`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kronfac.curvature.block import CurvatureBlock
from kronfac.curvature.singd_block import SINGDBlock
from kronfac.curvature.structures import StructureSpec, parse_structure
from kronfac.distributed.config import DistributedConfig
from kronfac.layers import LayerHelper
from kronfac.optim.base import KronOptimizer, WeightDecay
from kronfac.optim.functional import momentum_state, momentum_update_
from kronfac.optim.options import CaptureOptions, Schedule, check_bool, check_float_dtype, check_range
from kronfac.optim.types import GroupStep

__all__ = ["SINGD", "SINGD_DEFAULTS"]

#: SINGD's defaults and their source. The paper's (Lin et al. 2024, and its reference code ``singd``):
#: λ = 1e-3, β1 = 1e-2, α1 = 0.5, momentum α2 = 0.9, T = 10. The paper's β2 = 1e-3 barely moves a small model in
#: a few hundred steps (0.46 test accuracy on the digits MLP where AdamW reaches 0.975); lr = 0.03 is what our
#: benchmark sweep picks on the MLP tasks (benchmarks/bench_all: 0.03 digits, 0.01 mnist1d, 0.1 CNN).
SINGD_DEFAULTS: dict[str, Any] = {
    "lr": 0.03,  # β2
    "momentum": 0.9,  # α2
    "weight_decay": 0.0,  # γ
    "damping": 1e-3,  # λ
    "lr_cov": 1e-2,  # β1
    "alpha1": 0.5,  # α1
    "factor_every": 10,  # T
}


class SINGD(KronOptimizer):
    r"""SINGD (and IKFAC) as a ``torch.optim.Optimizer``.

    Per supported layer (Linear, Conv2d, Embedding) with gradient matrix ``∇W`` (``d_o x d_i``), SINGD keeps
    ``K`` (``d_i x d_i``, ``K K^T ≈ A^{-1}``), ``C`` (``d_o x d_o``, ``C C^T ≈ G^{-1}``) and momenta ``m_K, m_C``
    in the chosen structures, initialised to ``I`` and ``0`` (the momenta are kept only with ``α1 > 0``: IKFAC
    holds none). Every ``factor_every`` (``T``) steps, with
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
        factor_every: ``T``, statistics are captured and the factors updated every this many steps.
        structures: structures of ``K`` and ``C``, e.g. ``("diagonal", "dense")`` or
            ``(("block_diagonal", {"block_size": 16}), "lower_triangular")``; per param group too. Embedding
            layers always keep a diagonal ``K`` (their ``A`` is diagonal).
        kfac_like: IKFAC instead of SINGD.
        preconditioner_dtype: dtype of ``K, C, m_K, m_C``; ``None`` uses each layer's parameter dtype.
        cache_outer: keep ``K K^T`` and ``C C^T`` from one update of the factors to the next, so that a step
            preconditions with two products instead of four, on each side where that saves work over the
            ``factor_every`` steps it serves (dense, diagonal, block-diagonal and triangular structures; e.g. a
            dense ``K`` of a ``d_o x d_i`` layer when ``d_i < factor_every · d_o``). The same update to round-off;
            memory: up to ``d^2`` more per dense or triangular factor, which ``False`` saves.
        distributed: as for :class:`~kronfac.KFAC` (``H_K``, ``H_C`` are summed over the ranks).
        param_groups, fisher_type, loss, loss_average, approx, mc_samples, seed, grad_scaler, output_fn, on_nonfinite,
            max_skipped, accumulation_steps, include, exclude, factor_dtype: the shared capture options
            (:class:`~kronfac.optim.options.CaptureOptions`;
            ``factor_dtype`` is ignored: SINGD keeps no factors, ``preconditioner_dtype`` sets its state's).

    Example:
        >>> import torch, kronfac
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> opt = kronfac.SINGD(model, lr=1e-2, structures=("diagonal", "dense"), factor_every=1)
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> torch.nn.functional.cross_entropy(model(x), y).backward()
        >>> opt.step(); opt.zero_grad()
    """

    weight_decay_mode = WeightDecay.DIRECTION

    def __init__(
        self,
        model: nn.Module,
        lr: Schedule = SINGD_DEFAULTS["lr"],
        momentum: float = SINGD_DEFAULTS["momentum"],
        weight_decay: float = SINGD_DEFAULTS["weight_decay"],
        damping: Schedule = SINGD_DEFAULTS["damping"],
        lr_cov: Schedule = SINGD_DEFAULTS["lr_cov"],
        alpha1: float = SINGD_DEFAULTS["alpha1"],
        factor_every: int = SINGD_DEFAULTS["factor_every"],
        structures: tuple[StructureSpec, StructureSpec] = ("dense", "dense"),
        kfac_like: bool = False,
        preconditioner_dtype: torch.dtype | None = None,
        cache_outer: bool = True,
        *,
        distributed: DistributedConfig | bool | None = None,
        param_groups: Iterable[dict[str, Any]] | None = None,
        fisher_type: str = "empirical",
        loss: str = "cross_entropy",
        loss_average: str | None = "batch",
        approx: str = "expand",
        mc_samples: int = 1,
        seed: int = 0,
        grad_scaler: Any = None,
        output_fn: Callable[[Any], Tensor] | None = None,
        on_nonfinite: str = "raise",
        max_skipped: int = 10,
        accumulation_steps: int = 1,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        factor_dtype: torch.dtype | None = None,
    ) -> None:
        options = CaptureOptions.pick(locals())
        lr = check_range("lr", lr, 0.0)
        momentum = check_range("momentum", momentum, 0.0, 1.0)
        weight_decay = check_range("weight_decay", weight_decay, 0.0)
        damping = check_range("damping", damping, 0.0, low_open=True)
        lr_cov = check_range("lr_cov", lr_cov, 0.0)
        alpha1 = check_range("alpha1", alpha1, 0.0, 1.0)
        if alpha1 >= 1.0:
            raise ValueError(f"Invalid alpha1: {alpha1!r} (must be in [0, 1))")
        _check_structures(structures)
        for group in options.param_groups or []:
            if "structures" in group:
                _check_structures(group["structures"])
        self.preconditioner_dtype = check_float_dtype("preconditioner_dtype", preconditioner_dtype)
        self.cache_outer = check_bool("cache_outer", cache_outer)
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "damping": damping,
            "lr_cov": lr_cov,
            "alpha1": alpha1,
            "kfac_like": check_bool("kfac_like", kfac_like),
            "structures": tuple(structures),
        }
        super().__init__(model, defaults, options, factor_every=factor_every, distributed=distributed)

    def make_block(self, name: str, module: nn.Module, helper: LayerHelper, group: dict[str, Any]) -> CurvatureBlock:
        d_in, d_out = helper.dims(module)
        weight = helper.params(module)[0]
        return SINGDBlock(
            d_in,
            d_out,
            name=name,
            structures=group["structures"],
            diagonal_a=helper.diagonal_a,
            approx=self.options.approx,
            dtype=self.preconditioner_dtype or weight.dtype,
            device=weight.device,
            cache_outer=self.cache_outer,
            factor_every=self.factor_every,
        )

    def initial_state(self, param: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        return momentum_state(param, float(group["momentum"]))

    def update(self, step: GroupStep) -> None:
        momentum_update_(
            step.params,
            step.directions,
            self.state,
            lr=float(step.hyper["lr"]),
            momentum=float(step.hyper["momentum"]),
        )

    def state_bytes(self) -> int:
        """Bytes of optimizer state: ``K, C`` and the kept momenta ``m_K, m_C`` of every layer, the kept products
        ``K K^T``, ``C C^T`` (``cache_outer``) and the momentum buffers."""
        total = 0
        for layer in self.layers.values():
            block = layer.block
            assert isinstance(block, SINGDBlock)
            total += (block.num_state_elements() + block.num_cache_elements()) * block.dtype.itemsize
        for pstate in self.state.values():
            buf = pstate.get("momentum_buffer")
            if buf is not None:
                total += buf.numel() * buf.element_size()
        return total


def _check_structures(structures: Any) -> None:
    if not isinstance(structures, (tuple, list)) or len(structures) != 2:
        raise ValueError(f"Invalid structures: {structures!r} (must be a pair: (structure of K, structure of C))")
    for spec in structures:
        parse_structure(spec)
