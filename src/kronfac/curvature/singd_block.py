"""SINGD's curvature block: structured inverse-free factors ``K``, ``C`` and their momenta for one layer.

SINGD (Lin, Dangel, Eschenhagen et al., ICML 2024). Unlike K-FAC's block, it never stores ``A`` or ``G``: the
capture hooks feed each batch straight into ``Π(K^T a^T a K)`` and ``Π(C^T g^T g C)`` in the structures of
``K`` and ``C``, so the per-layer memory is O(structure). On a due step, :meth:`SINGDBlock.commit` applies the
update of :mod:`kronfac.curvature.singd_update`. Statistics are normalised exactly like K-FAC's factors
(:mod:`kronfac.curvature.factors`): ``A`` is the mean over sample rows, ``G`` is scaled as for a summed loss.

Between updates ``K`` and ``C`` do not change, so the block may keep ``K K^T`` and ``C C^T`` (formed at the first
step after an update) and precondition with two products instead of four. It does so for a side only where that
saves work over the ``T`` steps the product serves (:meth:`StructuredMatrix.outer_cost`): e.g. a dense ``K`` of
a ``d_i x d_o`` layer costs ``d_i^3`` to square and saves ``d_o d_i^2`` a step, so it is kept when
``d_i < T d_o``. The kept products are derived state (rebuilt from ``K``, ``C``; not in the checkpoint); they cost
memory (``d^2`` for a dense or triangular side), which ``cache_outer=False`` saves.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kronfac.curvature.block import (
    Approximation,
    CurvatureBlock,
    PendingStatistics,
    reduce_input_rows,
    reduce_output_grad_rows,
)
from kronfac.curvature.singd_update import SINGDFactors, precondition, update_factors
from kronfac.curvature.structures import StructuredMatrix, StructureSpec, make_structure, structure_from_state
from kronfac.curvature.structures.base import all_finite

__all__ = ["SINGDBlock"]


class SINGDBlock(CurvatureBlock):
    """``K`` (input side, ``d_i``), ``C`` (output side, ``d_o``) and momenta, plus the pending batch terms.

    Args:
        d_in: ``d_i`` (with the bias column).
        d_out: ``d_o``.
        name: layer name (for messages).
        structures: structure specs of ``K`` and ``C`` (see :func:`~kronfac.curvature.structures.parse_structure`).
        diagonal_a: the inputs are indices and ``A`` is diagonal (Embedding): ``K`` is then kept diagonal.
        approx: ``expand`` or ``reduce`` for weight-sharing positions.
        dtype: dtype of ``K, C, m_K, m_C`` and of the computations with them.
        device: their device.
        cache_outer: keep ``K K^T`` and ``C C^T`` between updates where that saves work (module docstring).
        factor_every: ``T``, the steps each kept product serves (the optimizer's update interval).
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        name: str,
        structures: tuple[StructureSpec, StructureSpec],
        diagonal_a: bool = False,
        approx: Approximation = Approximation.EXPAND,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
        cache_outer: bool = True,
        factor_every: int = 1,
    ) -> None:
        self.name, self.diagonal_a, self.approx = name, diagonal_a, approx
        self.cache_outer, self.factor_every = cache_outer, factor_every
        spec_K = "diagonal" if diagonal_a else structures[0]
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        # the momenta start at zero, i.e. None: IKFAC and α1 = 0 never allocate them
        self.factors = SINGDFactors(make_structure(spec_K, d_in, **kw), make_structure(structures[1], d_out, **kw))
        self._reset_pending()

    @property
    def factors(self) -> SINGDFactors:
        """``K, C, m_K, m_C``; setting them drops the kept ``K K^T``, ``C C^T``."""
        return self._factors

    @factors.setter
    def factors(self, factors: SINGDFactors) -> None:
        self._factors = factors
        self._outer: tuple[StructuredMatrix | None, StructuredMatrix | None] | None = None

    def _kept_outer(self, factor: StructuredMatrix, columns: int) -> StructuredMatrix | None:
        """``factor factor^T`` if it serves more than :meth:`~StructuredMatrix.outer_cost` columns in ``T`` steps."""
        cost = factor.outer_cost() if self.cache_outer else None
        return factor.outer() if cost is not None and cost < self.factor_every * columns else None

    def outer_products(self) -> tuple[StructuredMatrix | None, StructuredMatrix | None]:
        """The kept ``K K^T`` and ``C C^T`` (``None`` for a side that applies its factor twice), formed on first use
        after an update."""
        if self._outer is None:
            K, C = self._factors.K, self._factors.C
            self._outer = (self._kept_outer(K, C.dim), self._kept_outer(C, K.dim))
        return self._outer

    def _reset_pending(self) -> None:
        self._h_K: StructuredMatrix | None = None
        self._h_C: StructuredMatrix | None = None
        self._a_count = 0
        self._g_count = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.factors.K.dtype

    # -- batch statistics -------------------------------------------------------------------------------
    def add_inputs(self, rows: Tensor) -> None:
        K = self.factors.K
        if self.diagonal_a:
            flat = rows.reshape(-1)
            counts = torch.bincount(flat, minlength=K.dim).to(self.dtype)
            term, count = K.from_inner_matrix(counts), flat.numel()
        else:
            samples = reduce_input_rows(rows.to(self.dtype), self.approx)
            term, count = K.from_inner(samples.T), samples.shape[0]
        self._h_K = term if self._h_K is None else self._h_K.add(term)
        self._a_count += count

    def add_output_grads(self, rows: Tensor, scale: float, count: int) -> None:
        samples = reduce_output_grad_rows(rows.to(self.dtype), self.approx)
        term = self.factors.C.from_inner(samples.T).scale(scale)
        self._h_C = term if self._h_C is None else self._h_C.add(term)
        self._g_count += count

    def add_input_factor(self, factor: Tensor, count: int) -> None:
        term = self.factors.K.from_inner_matrix(factor.to(self.dtype) * count)
        self._h_K = term if self._h_K is None else self._h_K.add(term)
        self._a_count += count

    def add_output_grad_factor(self, factor: Tensor, count: int) -> None:
        term = self.factors.C.from_inner_matrix(factor.to(self.dtype) * count)
        self._h_C = term if self._h_C is None else self._h_C.add(term)
        self._g_count += count

    def has_pending(self) -> bool:
        return self._h_K is not None and self._h_C is not None and self._a_count > 0 and self._g_count > 0

    def pending_nonfinite(self) -> str | None:
        """Always ``None``: non-finite statistics are found (and named) after the update, in :meth:`commit`,
        which saves a pass over ``H_K`` and ``H_C`` on every update."""
        return None

    def discard_pending(self) -> None:
        self._reset_pending()

    def pending_counts(self) -> tuple[int, int]:
        return self._a_count, self._g_count

    def pending_statistics(self) -> PendingStatistics:
        """``H_K`` and ``H_C`` are linear in the summed outer products, so their tensors add up over ranks."""
        h_K = self._h_K if self._h_K is not None else self.factors.K.zeros_like()
        h_C = self._h_C if self._h_C is not None else self.factors.C.zeros_like()
        sums = {f"K.{k}": t for k, t in h_K.tensors().items()} | {f"C.{k}": t for k, t in h_C.tensors().items()}
        counts = (self._a_count, self._g_count) if self.has_pending() else (0, 0)
        return PendingStatistics(*counts, sums=sums)

    def set_pending_statistics(self, statistics: PendingStatistics) -> None:
        self._reset_pending()
        if statistics.a_count <= 0 or statistics.g_count <= 0:
            return
        parts: dict[str, dict[str, Tensor]] = {"K": {}, "C": {}}
        for key, tensor in statistics.sums.items():
            side, name = key.split(".", 1)
            parts[side][name] = tensor
        self._h_K = self.factors.K.with_tensors(parts["K"])
        self._h_C = self.factors.C.with_tensors(parts["C"])
        self._a_count, self._g_count = statistics.a_count, statistics.g_count

    commit_keys = ("damping", "alpha1", "lr_cov", "kfac_like")

    def commit(self, *, damping: float, alpha1: float, lr_cov: float, kfac_like: bool) -> str | None:
        """Apply one SINGD update with the pending ``H_K``, ``H_C``; keep the old state if it turns non-finite
        and return what did (``"A statistics"``, ``"K"``, ...), for the optimizer to report."""
        if not self.has_pending():
            raise RuntimeError(f"no curvature statistics were captured for layer {self.name!r}")
        assert self._h_K is not None and self._h_C is not None
        H_K, H_C = self._h_K, self._h_C
        scales = (1.0 / self._a_count, 1.0 / self._g_count)
        self._reset_pending()
        new = update_factors(
            self.factors,
            H_K,
            H_C,
            damping=float(damping),
            alpha1=float(alpha1),
            lr_cov=float(lr_cov),
            kfac_like=bool(kfac_like),
            h_scales=scales,
        )
        # Non-finite statistics or momenta always reach K or C, so checking these two is enough: one reduction
        # per tensor; the diagnosis below runs only when something is wrong.
        if all_finite([new.K, new.C]):
            self.factors = new
            return None
        if not H_K.is_finite() or not H_C.is_finite():
            return "A statistics" if not H_K.is_finite() else "G statistics"
        return "K" if not new.K.is_finite() else "C"

    def precondition(self, grad: Tensor) -> Tensor:
        """``C C^T ∇W K K^T`` (in the block's dtype, returned in ``grad``'s dtype), with the kept products."""
        outer_K, outer_C = self.outer_products()
        return precondition(self._factors.K, self._factors.C, grad, outer_K, outer_C)

    def num_state_elements(self) -> int:
        """Scalars held by ``K, C`` and the momenta that are kept (the memory of this layer's optimizer state, in
        elements; the kept ``K K^T``, ``C C^T`` are :meth:`num_cache_elements`)."""
        return sum(m.num_params() for m in self.factors if m is not None)

    def num_cache_elements(self) -> int:
        """Scalars held by the kept ``K K^T`` and ``C C^T`` (derived from ``K``, ``C``; not checkpointed)."""
        return sum(m.num_params() for m in self._outer or () if m is not None)

    def state_dict(self) -> dict[str, Any]:
        return {name: m.state_dict() for name, m in zip(self.factors._fields, self.factors) if m is not None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Loads ``K``, ``C`` and the momenta the state has (a missing or ``None`` momentum is zero)."""
        K, C = self.factors.K, self.factors.C
        loaded: list[StructuredMatrix | None] = []
        for name, like in zip(SINGDFactors._fields, (K, C, K, C)):
            entry = state.get(name)
            if entry is None:
                if name in ("K", "C"):
                    raise ValueError(f"Invalid state for layer {self.name!r}: no {name}")
                loaded.append(None)
                continue
            new = structure_from_state(entry).clone()
            if type(like) is not type(new) or like.dim != new.dim:
                raise ValueError(f"Invalid state for layer {self.name!r}: {new!r} does not match {like!r}")
            loaded.append(new.to(device=like.device))
        self.factors = SINGDFactors(*loaded)  # type: ignore[arg-type]
        self._reset_pending()
