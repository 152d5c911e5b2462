"""CG-FAC's curvature block: the last batches' rows ``a``, ``g`` and a matrix-free CG solve (Chen 2021).

Chen, "An iterative K-FAC algorithm for Deep Learning", arXiv:2101.00218, 2021. The block never forms ``A``,
``G`` or the Fisher: it keeps the sample rows of the last ``history`` curvature batches and solves
``(Ḡ ⊗ Ā + λI) vec(U) = vec(∇W)`` by conjugate gradient through :func:`~kronfac.linalg.cg.batch_operator`.

Averaging choice: with ``history = H`` the factors are the EMA of K-FAC truncated to the last ``H`` batches,
``Ā = Σ_b w_b A_b`` and ``Ḡ = Σ_b w_b G_b`` with ``w_b ∝ ρ^b`` (``b = 0`` newest, weights normalised to 1),
evaluated by stacking the rows of every stored batch scaled by ``sqrt(w_b / n_b)``. ``H = 1`` (the default) is
Chen's form: the curvature of the last batch only. Memory is ``O(H N (d_i + d_o))``, plus the warm-start
solution (``d_o x d_i``, the size of the gradient) when ``warm_start`` is on.

Operator. ``G U A`` is applied from the rows (``2 d_o d_i (N_a + N_g)`` per CG iteration, never forming a
factor) or from ``Ā`` and ``Ḡ`` formed once per curvature batch (``d_o d_i (d_o + d_i)`` per iteration, plus the
formation): the same map, so the same solve to round-off. ``operator="auto"`` (the default) takes the cheaper by
:func:`~kronfac.linalg.cg.operator_costs`, per layer and curvature batch: the rows when the batch is small against
the widths (an MLP of width 2048 at batch 32), the factors when it is not (sequence models, whose rows are
batch x positions), with the rows' count weighted by ``ROWS_PENALTY`` for their thin products. The formed
factors are a cache, rebuilt after each commit, not part of the checkpoint.

Row normalisation follows :class:`~kronfac.curvature.factors.KroneckerFactors` exactly, so with ``history = 1``
and the same batch the solve equals K-FAC's with factor decay 0 and exact (eigen) damping.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from kronfac.curvature.block import (
    Approximation,
    CurvatureBlock,
    PendingStatistics,
    all_finite,
    reduce_input_rows,
    reduce_output_grad_rows,
)
from kronfac.linalg.cg import batch_operator, cg_solve, factor_operator, operator_costs
from kronfac.validation import check_choice

__all__ = ["CGBlock", "CGOperator"]


#: How much slower per multiply-add the rows operator's products run than the factor operator's: its products
#: have the batch's N as a thin dimension, which MKL runs below the square-product rate. Measured on this
#: repository's 2-core CPU box (benchmarks/cgfac/operators.md, a loaded machine): 6-8x at N = 32, 1.3-3.7x at
#: N = 128 (where the two operators' costs cross for a 512-wide layer); ``auto`` compares ``ROWS_PENALTY x`` the
#: rows' count with the factors'.
ROWS_PENALTY = 2.0


class CGOperator(str, Enum):
    """How :class:`CGBlock` applies ``G U A``: the cheaper of the two (``auto``), from the rows, from the factors."""

    AUTO = "auto"
    ROWS = "rows"
    FACTORS = "factors"


class CGBlock(CurvatureBlock):
    """Stored batch rows of one layer and the CG solve of its damped Kronecker system.

    Args:
        d_in: input dimension ``d_i`` (with the bias column).
        d_out: output dimension ``d_o``.
        max_iters: CG iterations per step at most.
        tol: CG stops at this relative residual.
        history: number of curvature batches kept (``H``).
        warm_start: start CG from the previous solution.
        diagonal_a: inputs are indices (Embedding); ``A`` is kept as token counts.
        approx: ``expand`` or ``reduce`` for weight-sharing positions.
        dtype: storage dtype of the rows.
        operator: ``auto`` (the cheaper of the two), ``rows`` or ``factors`` (see the module docstring).
        steps_per_batch: steps that precondition with one curvature batch (``factor_every``), over which
            ``auto`` spreads the cost of forming the factors.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        max_iters: int,
        tol: float,
        history: int = 1,
        warm_start: bool = False,
        diagonal_a: bool = False,
        approx: Approximation = Approximation.EXPAND,
        dtype: torch.dtype = torch.float32,
        operator: str | CGOperator = "auto",
        steps_per_batch: int = 1,
    ) -> None:
        self.operator = check_choice(CGOperator, "operator", operator)
        self.steps_per_batch = max(1, int(steps_per_batch))
        self.d_in, self.d_out = d_in, d_out
        self.max_iters, self.tol, self.history, self.warm_start = max_iters, tol, history, warm_start
        self.diagonal_a, self.approx, self.dtype = diagonal_a, approx, dtype
        self.damping = 1e-3
        self.decay = 0.95
        #: newest first: (a rows or counts, a count, g rows scaled by sqrt(scale), g count)
        self.batches: list[tuple[Tensor, int, Tensor, int]] = []
        self.solution: Tensor | None = None
        self.last_iterations = 0
        self.last_residual = 0.0
        self._a: list[Tensor] = []
        self._g: list[Tensor] = []
        self._a_count = 0
        self._g_count = 0
        #: the operator chosen for the stored batches and, with ``factors``, the formed ``(Ā, Ḡ)``: both derived
        #: from the batches, so dropped whenever the batches change and rebuilt on the next solve
        self._chosen: str | None = None
        self._factors: tuple[Tensor, Tensor] | None = None
        #: the operator the last solve used (``rows`` or ``factors``)
        self.last_operator = ""

    # -- batch statistics -------------------------------------------------------------------------------
    def add_inputs(self, rows: Tensor) -> None:
        if self.diagonal_a:
            flat = rows.reshape(-1)
            self._a.append(torch.bincount(flat, minlength=self.d_in).to(self.dtype))
            self._a_count += flat.numel()
            return
        samples = reduce_input_rows(rows.to(self.dtype), self.approx)
        self._a.append(samples)
        self._a_count += samples.shape[0]

    def add_output_grads(self, rows: Tensor, scale: float, count: int) -> None:
        samples = reduce_output_grad_rows(rows.to(self.dtype), self.approx)
        self._g.append(samples * math.sqrt(scale))
        self._g_count += count

    def add_input_factor(self, factor: Tensor, count: int) -> None:
        factor = factor.to(self.dtype)
        if self.diagonal_a:
            self._a.append((factor.diagonal() if factor.ndim == 2 else factor) * count)
        else:
            self._a.append(_root_rows(torch.diag(factor) if factor.ndim == 1 else factor) * math.sqrt(count))
        self._a_count += count

    def add_output_grad_factor(self, factor: Tensor, count: int) -> None:
        factor = factor.to(self.dtype)
        self._g.append(_root_rows(torch.diag(factor) if factor.ndim == 1 else factor) * math.sqrt(count))
        self._g_count += count

    def has_pending(self) -> bool:
        return bool(self._a) and bool(self._g) and self._g_count > 0

    def pending_nonfinite(self) -> str | None:
        if not all(all_finite(t) for t in self._a):
            return "A"
        if not all(all_finite(t) for t in self._g):
            return "G"
        return None

    def discard_pending(self) -> None:
        self._a, self._g = [], []
        self._a_count = self._g_count = 0

    def pending_counts(self) -> tuple[int, int]:
        return self._a_count, self._g_count

    def pending_statistics(self) -> PendingStatistics:
        """Rows travel as rows (concatenated over ranks); an Embedding's token counts as a sum."""
        kw: dict[str, Any] = {"dtype": self.dtype}
        g = torch.cat(self._g) if self._g else torch.zeros(0, self.d_out, **kw)
        counts = (self._a_count, self._g_count) if self.has_pending() else (0, 0)
        if self.diagonal_a:
            a = torch.stack(self._a).sum(0) if self._a else torch.zeros(self.d_in, **kw)
            return PendingStatistics(*counts, sums={"a": a}, rows={"g": g})
        a = torch.cat(self._a) if self._a else torch.zeros(0, self.d_in, **kw)
        return PendingStatistics(*counts, rows={"a": a, "g": g})

    def set_pending_statistics(self, statistics: PendingStatistics) -> None:
        self.discard_pending()
        if statistics.a_count <= 0 or statistics.g_count <= 0:
            return
        self._a = [statistics.sums["a"] if self.diagonal_a else statistics.rows["a"]]
        self._g = [statistics.rows["g"]]
        self._a_count, self._g_count = statistics.a_count, statistics.g_count

    commit_keys = ("factor_decay",)

    def commit(self, *, factor_decay: float) -> None:
        """Push the pending batch (newest first) and drop batches beyond ``history``."""
        if not self.has_pending():
            raise RuntimeError("no curvature statistics were captured for this layer")
        a = torch.stack(self._a).sum(0) if self.diagonal_a else torch.cat(self._a)
        self.batches.insert(0, (a, self._a_count, torch.cat(self._g), self._g_count))
        del self.batches[self.history :]
        self.decay = float(factor_decay)
        self._stored_changed()
        self.discard_pending()

    # -- the solve --------------------------------------------------------------------------------------
    def refresh(self, damping: float) -> None:
        """Take the current damping (CG needs no other refresh)."""
        self.damping = float(damping)

    def stacked_rows(self) -> tuple[Tensor, Tensor]:
        """Rows whose Gram matrices are ``Ā`` and ``Ḡ``: ``Ā = a^T a`` (or ``diag(a)`` for a vector), ``Ḡ = g^T g``."""
        weights = [self.decay**b for b in range(len(self.batches))]
        total = sum(weights)
        a_parts, g_parts = [], []
        for w, (a, a_count, g, g_count) in zip(weights, self.batches):
            w = w / total
            a_parts.append(a * (w / a_count) if self.diagonal_a else a * math.sqrt(w / a_count))
            g_parts.append(g * math.sqrt(w / g_count))
        a_rows = torch.stack(a_parts).sum(0) if self.diagonal_a else torch.cat(a_parts)
        return a_rows, torch.cat(g_parts)

    def chosen_operator(self) -> str:
        """``rows`` or ``factors``: the configured one, or under ``auto`` the cheaper for the stored batches
        (the cost of forming the factors spread over the ``steps_per_batch`` solves that use them)."""
        if self.operator is not CGOperator.AUTO:
            return self.operator.value
        a_rows = 0 if self.diagonal_a else sum(a.shape[0] for a, _, _, _ in self.batches)
        g_rows = sum(g.shape[0] for _, _, g, _ in self.batches)
        rows, factors, formation = operator_costs(
            self.d_in,
            self.d_out,
            a_rows,
            g_rows,
            iterations=self.max_iters,  # not the last solve's count: a resumed run must choose as the first did
            diagonal_a=self.diagonal_a,
        )
        return "factors" if factors + formation / self.steps_per_batch < ROWS_PENALTY * rows else "rows"

    def _stored_changed(self) -> None:
        self._chosen = self._factors = None

    def _operator(self) -> Any:
        if self._chosen is None:
            self._chosen = self.chosen_operator()
        kind = self.last_operator = self._chosen
        if kind == "factors":
            if self._factors is None:
                a_rows, g_rows = self.stacked_rows()
                self._factors = (a_rows if self.diagonal_a else a_rows.T @ a_rows, g_rows.T @ g_rows)
            return factor_operator(*self._factors, self.damping)
        return batch_operator(*self.stacked_rows(), self.damping)

    def precondition(self, grad: Tensor) -> Tensor:
        if not self.batches:
            return grad
        operator = self._operator()
        rhs = grad.to(self.dtype)
        x0 = self.solution if self.warm_start and self.solution is not None else None
        result = cg_solve(operator, rhs, x0=x0, max_iters=self.max_iters, tol=self.tol)
        self.last_iterations, self.last_residual = result.iterations, result.relative_residual
        if self.warm_start:
            self.solution = result.solution
        return result.solution.to(grad.dtype)

    def release(self) -> None:
        """Drop the stored rows and the warm start (another rank owns this layer's curvature)."""
        self.batches, self.solution = [], None
        self._stored_changed()
        self.discard_pending()

    # -- checkpointing ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "batches": [(a.clone(), na, g.clone(), ng) for a, na, g, ng in self.batches],
            "solution": None if self.solution is None else self.solution.clone(),
            "damping": self.damping,
            "decay": self.decay,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches = [(a.clone(), int(na), g.clone(), int(ng)) for a, na, g, ng in state["batches"]]
        solution = state["solution"]
        self.solution = None if solution is None else solution.clone()
        self.damping, self.decay = float(state["damping"]), float(state["decay"])
        self._stored_changed()
        self.discard_pending()

    def state_bytes(self) -> int:
        """Bytes held between steps: the stored rows, the formed factors when the solve uses them, and the
        warm-start solution."""
        tensors = [t for a, _, g, _ in self.batches for t in (a, g)]
        if self._factors is not None:
            tensors += list(self._factors)
        if self.solution is not None:
            tensors.append(self.solution)
        return sum(t.numel() * t.element_size() for t in tensors)


def _root_rows(factor: Tensor) -> Tensor:
    """Rows ``R`` with ``R^T R = factor`` for a symmetric PSD matrix (its scaled eigenvectors), so a fitted factor
    travels through the row-based solve like captured rows do."""
    values, vectors = torch.linalg.eigh(factor)
    return (vectors * values.clamp_min(0).sqrt()).T
