"""KLD-WRM: K-FAC regularised toward the wake of past iterates (Puiu 2022), as a correction composed into K-FAC.

Puiu, "Rethinking Exponential Averaging of the Fisher", ECML PKDD 2022 (arXiv:2204.04718).

EMA K-FAC steps to ``argmin_s g_k^T s + (λ_k/2) Σ_j w_kj s^T F_j s``: every past curvature is centred at the
*current* iterate. KLD-WRM instead penalises the distance to the past *networks*,

    θ_{k+1} = argmin_θ  L_k(θ) + λ_k Σ_{j<=k} w_kj KL(p_{θ_j} || p_θ),     λ_k = 1 / lr_k,

with the EMA weights ``w_kj`` of decay ρ (``w_kj = (1-ρ) ρ^{k-j}``, the oldest term taking the rest, so
``w_kj = ρ w_{k-1,j}``). The three practical variants of the paper, here as a correction :class:`~kronfac.KFAC` composes
into its step (``KFAC(model, correction=KLDWRM(...))``), not as copies of K-FAC:

* ``"so"`` (second-order KL, linear loss): with ``KL_j ≈ ½ (θ-θ_j)^T (F_j + δI) (θ-θ_j)`` the optimality
  conditions of steps ``k`` and ``k-1`` telescope: ``ĝ_k = g_k - ρ (λ_k/λ_{k-1}) g_{k-1}`` and
  ``s_k = -lr_k (F̄_k + δI)^{-1} ĝ_k``: EMA K-FAC applied to the corrected gradient.
* ``"q"`` (plus a quadratic loss model ``½ s^T F_k s``): the recursion carries
  ``c_{k-1} = g_{k-1} - ĝ_{k-1} + (F̄_{k-1} + δI) u_{k-1}`` (``u`` the preconditioned direction) and
  ``ĝ_k = g_k - ρ (λ_k/λ_{k-1}) c_{k-1}``; the system matrix ``F̄ + F_k/λ`` is approximated by the augmented
  factors ``(Ḡ + lr G_k) ⊗ (Ā + lr A_k)`` (``A_k``, ``G_k`` the batch factors), inverted with K-FAC's backend.
* ``"qe"``: the Q step refined by ``inner_steps`` steps (preconditioned by the augmented K-FAC inverse, monotone
  in the objective, then KL-clipped in the Fisher norm) on the *exact* wake objective
  ``g_k^T s + ½ s^T F_k s + λ_k Σ_j w_j [KL(p_{θ_j}(x) || p_θ(x)) + (δ/2) ||θ - θ_j||²]`` on the current batch
  ``x``, against the last ``networks`` stored parameter snapshots (KL of the softmax for cross-entropy, squared
  distance of the outputs for MSE). The batch is the positional input of the model's last forward pass. This
  refinement stage lives in :mod:`kronfac.optim.corrections.wake`.

``ρ`` defaults to the group's ``factor_decay`` (the paper ties the two; its MNIST runs use 0.33 for SO). With
``rho == factor_decay``, exact factors and no momentum or KL clip, the SO step *is* the minimiser of the wake
objective with quadratic KL terms (tested densely). Parameters without a Kronecker block get the SO correction
with identity curvature. Under :class:`~kronfac.KFACPreconditioner` the ratio ``λ_k/λ_{k-1}`` uses its nominal lr.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from torch import Tensor

from kronfac.curvature.capture import TrackedLayer
from kronfac.curvature.kfac_block import KFACBlock
from kronfac.distributed import sharded
from kronfac.linalg.base import KroneckerInverse, build_inverse, inverse_from_state, inverse_to_state
from kronfac.optim.corrections.base import Correction, CorrectionContext
from kronfac.optim.corrections.wake import WakeRefinement, clone_state
from kronfac.optim.types import GroupStep
from kronfac.validation import check_bool, check_int, check_positive_int, check_range

__all__ = ["KLDWRM", "KLDWRMVariant"]


class KLDWRMVariant(str, Enum):
    SO = "so"
    Q = "q"
    QE = "qe"


def _kfac_block(layer: TrackedLayer) -> KFACBlock:
    if not isinstance(layer.block, KFACBlock):
        raise TypeError(f"KLDWRM needs K-FAC's factors; layer {layer.name!r} has a {type(layer.block).__name__}")
    return layer.block


class KLDWRM(Correction):
    """KL-divergence wake-regularised models on the K-FAC platform (see the module docstring).

    Args:
        variant: ``"so"``, ``"q"`` or ``"qe"``.
        rho: wake decay ρ in [0, 1); ``None`` uses each group's ``factor_decay``.
        inner_steps: QE: gradient steps on the exact wake objective.
        inner_lr: QE: inner step size as a fraction of the group's lr (the paper's ``inner_lr_factor``).
        networks: QE: parameter snapshots kept (the current one included).
        inner_preconditioned: QE: precondition the inner gradient with the (augmented) K-FAC inverse, a
            Newton-like step on the wake objective; ``False`` takes the paper's plain gradient steps, which
            diverge unless ``inner_lr`` is below ``1 / λ_max(F)``.

    Raises:
        ValueError: naming the argument that is out of range.
    """

    def __init__(
        self,
        variant: str = "so",
        rho: float | None = None,
        *,
        inner_steps: int = 5,
        inner_lr: float = 1.0,
        networks: int = 3,
        inner_preconditioned: bool = True,
    ) -> None:
        try:
            self.variant = KLDWRMVariant(variant)
        except ValueError:
            raise ValueError(f"Invalid variant: {variant!r} (must be one of 'so', 'q', 'qe')") from None
        rho = None if rho is None else check_range("rho", rho, 0.0, 1.0, high_open=True)
        inner_steps = check_int("inner_steps", inner_steps, 0)
        inner_lr = check_range("inner_lr", inner_lr, 0.0, low_open=True)
        inner_preconditioned = check_bool("inner_preconditioned", inner_preconditioned)
        networks = check_positive_int("networks", networks)
        self.rho = rho
        self.carry: dict[str, tuple[Tensor, float]] = {}  # key -> (c_{k-1}, lr_{k-1})
        self.batch: dict[str, tuple[Tensor, Tensor]] = {}  # layer -> (A_k, G_k) batch factors (Q, QE)
        self.inverses: dict[str, KroneckerInverse] = {}  # layer -> augmented inverse (Q, QE)
        self.refreshed: dict[str, tuple[Tensor, Tensor]] = {}  # layer -> (Ā, Ḡ) at the last refresh (Q, QE)
        self._pending: dict[str, tuple[Tensor, Tensor]] = {}
        self.wake: WakeRefinement | None = None
        if self.variant is KLDWRMVariant.QE:
            self.wake = WakeRefinement(
                steps=inner_steps,
                lr=float(inner_lr),
                networks=networks,
                preconditioned=inner_preconditioned,
                rho=self.rho_of,
                batch=self.batch,
                precondition=self._precondition_matrix,
            )

    def __repr__(self) -> str:
        return f"KLDWRM(variant={self.variant.value!r}, rho={self.rho})"

    def bind(self, context: CorrectionContext) -> None:
        super().bind(context)
        for layer in context.layers.values():
            _kfac_block(layer)
        if self.wake is not None:
            self.wake.bind(context)

    def close(self) -> None:
        """Remove the QE input hook."""
        if self.wake is not None:
            self.wake.close()

    def rho_of(self, hyper: dict[str, Any]) -> float:
        """ρ of a group: the correction's own, else the group's ``factor_decay``."""
        return self.rho if self.rho is not None else float(hyper["factor_decay"])

    # -- the SO / Q recursion ----------------------------------------------------------------------------
    def transform(self, key: str, grad: Tensor, hyper: dict[str, Any]) -> Tensor:
        lr = float(hyper["lr"])
        corrected = grad
        if key in self.carry:
            carry, lr_prev = self.carry[key]
            ratio = lr_prev / lr if lr > 0 else 0.0  # λ_k / λ_{k-1}; lr = 0 takes no step anyway
            corrected = grad - (self.rho_of(hyper) * ratio) * carry.to(grad.dtype)
        self.carry[key] = (grad.detach().clone(), lr)  # SO's c = g; Q overwrites it in observe()
        if self.variant is not KLDWRMVariant.SO:
            self._pending[key] = (grad.detach(), corrected.detach())
        return corrected

    def observe(self, key: str, direction: Tensor, hyper: dict[str, Any]) -> None:
        if self.variant is KLDWRMVariant.SO or key not in self._pending:
            return
        grad, corrected = self._pending.pop(key)
        if key not in self.refreshed:
            return
        # the factors the augmented inverse was built from: then (F̄ + δI) H_aug^{-1} has eigenvalues in (0, 1]
        # and the recursion cannot amplify (the current EMA factors may have moved since the last refresh)
        a_factor, g_factor = self.refreshed[key]
        u = direction.detach().to(g_factor.dtype)
        hu = g_factor @ u
        hu = hu * a_factor if a_factor.ndim == 1 else hu @ a_factor
        hu = hu + float(hyper["damping"]) * u
        layer = self.context.layers[key]
        # u preconditions ĝ + ηW (weight decay), so (F̄ + δI) u ≈ ĝ + ηW: take ηW out of the carried term
        decay = float(hyper.get("weight_decay", 0.0)) * layer.helper.param_matrix(layer.module)
        carry = grad - corrected - decay.to(grad.dtype) + hu.to(grad.dtype)
        self.carry[key] = (carry.clone(), float(hyper["lr"]))

    # -- augmented factors (Q, QE) ---------------------------------------------------------------------------
    def before_commit(self) -> None:
        if self.variant is KLDWRMVariant.SO:
            return
        for name, layer in self.context.layers.items():
            block = _kfac_block(layer)
            if block.has_pending() and block.pending_nonfinite() is None:
                a_batch, g_batch = block.batch_factors()
                self.batch[name] = (a_batch.clone(), g_batch.clone())

    def after_refresh(self, layers: list[tuple[TrackedLayer, dict[str, Any]]]) -> None:
        if self.variant is KLDWRMVariant.SO:
            return
        for layer, hyper in layers:
            block = _kfac_block(layer)
            if block.a_factor is None or block.g_factor is None or layer.name not in self.batch:
                continue
            lr = float(hyper["lr"])
            a_batch, g_batch = self.batch[layer.name]
            inverse = build_inverse(
                block.inverse_config,
                block.a_factor + lr * a_batch,
                block.g_factor + lr * g_batch,
                float(hyper["damping"]),
                previous=self.inverses.get(layer.name),
                layer=layer.name,
            )
            if inverse is not None:
                self.inverses[layer.name] = inverse
                self.refreshed[layer.name] = (block.a_factor.clone(), block.g_factor.clone())

    def precondition(self, layer: TrackedLayer, grad: Tensor) -> Tensor | None:
        inverse = self.inverses.get(layer.name)
        return None if inverse is None else inverse.precondition(grad)

    def _precondition_matrix(self, layer: TrackedLayer, grad: Tensor) -> Tensor:
        direction = self.precondition(layer, grad)
        return layer.block.precondition(grad) if direction is None else direction

    # -- QE ----------------------------------------------------------------------------------------------
    def refine(self, steps: list[GroupStep]) -> list[GroupStep]:
        return steps if self.wake is None else self.wake.refine(steps)

    # -- checkpointing ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            # full tensors (a sharded parameter's carry is gathered), so the state does not depend on the ranks
            "carry": {k: (sharded.full(c.detach()).clone(), lr) for k, (c, lr) in self.carry.items()},
            "batch": clone_state(self.batch),
            "inverses": {k: inverse_to_state(v) for k, v in self.inverses.items()},
            "refreshed": clone_state(self.refreshed),
            "snapshots": clone_state(self.wake.snapshots) if self.wake is not None else [],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        params = {name: p for p, name in self.context.param_names.items()} if self._context is not None else {}
        self.carry = {
            k: (sharded.shard_like(v[0].clone(), params[k]) if k in params else v[0].clone(), float(v[1]))
            for k, v in state.get("carry", {}).items()
        }
        self.batch.clear()
        self.batch.update(clone_state(state.get("batch", {})))
        self.inverses = {k: inverse_from_state(v) for k, v in state.get("inverses", {}).items()}
        self.refreshed = clone_state(state.get("refreshed", {}))
        if self.wake is not None:
            self.wake.snapshots = clone_state(state.get("snapshots", []))
        self._pending.clear()
