"""Parameters used by several layers: a tied embedding and output head, one weight in two modules.

A parameter ``W`` used by layers ``u = 1..k`` receives one gradient (autograd sums the uses' contributions)
and gets one update per step from one curvature block. Each use has its own Kronecker factors, captured as
for any layer: an input side ``I_u`` and an output side ``O_u``, in the use's own orientation of ``W``
(``nn.Embedding`` stores ``W`` as ``vocab x d``, the ``d_o x d_i`` matrix of a lookup is its transpose, while a
tied ``nn.Linear(d, vocab)`` head stores the same tensor as its ``d_o x d_i``). In the orientation of one
*canonical* use (the first whose factors are both dense), use ``u`` contributes ``O'_u ⊗ I'_u`` with
``(I'_u, O'_u) = (I_u, O_u)`` when it is oriented like the canonical use and ``(O_u, I_u)`` when transposed.

The rule: the block's factors are the Kronecker product nearest, in Frobenius norm, to the sum of the uses'
blocks,

    (A, G) = argmin ‖ Σ_u O'_u ⊗ I'_u  −  G ⊗ A ‖_F .

Van Loan & Pitsianis (1993): the rearrangement ``G ⊗ A -> vec(G) vec(A)^T`` is an isometry, so this is the best
rank-one approximation of ``M = Σ_u vec(O'_u) vec(I'_u)^T``, whose singular vectors lie in the spans of the
``O'_u`` and of the ``I'_u``: ``A = Σ_u α_u I'_u``, ``G = Σ_u β_u O'_u`` with ``α`` the top eigenvector of
``Γ_O Γ_I`` (the ``k x k`` Gram matrices ``Γ_I[u, v] = <I'_u, I'_v>``, ``Γ_O[u, v] = <O'_u, O'_v>``) and
``β = Γ_I α / (α^T Γ_I α)``. The factors are positive semi-definite, so the Gram matrices have non-negative
entries, ``α, β >= 0`` (Perron-Frobenius) and ``A``, ``G`` are PSD again. ``α`` is normalised to sum to 1: ``A``
is a weighted mean of the input sides and ``G`` carries the scale. One use gives its own factors back exactly,
and so do uses whose factors are proportional. The cost is that of the inner products (``O(k² d²)``) and one
``d x d`` sum per side, once per curvature step.

Like K-FAC's cross-layer terms, the cross terms between uses (``E[vec(g_1 a_1^T) vec(g_2 a_2^T)^T]``) are left
out: the rule fits the sum of the per-use blocks, which is the Fisher block of ``W`` when the uses' gradients
are uncorrelated. A module called twice in one forward pass is a single layer, not a shared parameter: its
calls are weight-sharing positions of one block (the ``approx`` option).

Under data parallelism each rank fits its own uses and the ranks average the fitted factors (weighted by their
rows), like any layer's batch statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from kronfac.curvature.block import CurvatureBlock
from kronfac.curvature.factors import KroneckerFactors

__all__ = ["SharedParameter", "SharedUse", "UseStatistics", "nearest_kronecker"]


def _inner(x: Tensor, y: Tensor) -> Tensor:
    """Frobenius inner product of two factors, each a matrix or a diagonal kept as a vector."""
    if x.ndim == 2 and y.ndim == 2:
        return (x * y).sum()
    if x.ndim == 1 and y.ndim == 1:
        return x @ y
    vector, matrix = (x, y) if x.ndim == 1 else (y, x)
    return vector @ matrix.diagonal()


def _combine(weights: Tensor, factors: list[Tensor]) -> Tensor:
    """``Σ_u w_u F_u``; a diagonal kept as a vector is placed on the diagonal when any factor is dense."""
    dense = any(f.ndim == 2 for f in factors)
    total: Tensor | None = None
    for w, f in zip(weights.tolist(), factors):
        term = (torch.diag(f) if dense and f.ndim == 1 else f) * w
        total = term if total is None else total + term
    assert total is not None
    return total


def nearest_kronecker(terms: list[tuple[Tensor, Tensor]], *, iterations: int = 100) -> tuple[Tensor, Tensor]:
    """The Kronecker product ``G ⊗ A`` nearest in Frobenius norm to ``Σ_u G_u ⊗ A_u`` (see the module docstring).

    Args:
        terms: ``(A_u, G_u)`` pairs, each factor a symmetric PSD matrix or a diagonal kept as a vector; all
            ``A_u`` of one size, all ``G_u`` of one size.
        iterations: power iterations on the ``k x k`` problem at most (it converges at the ratio of its two
            largest eigenvalues, and stops once ``α`` no longer moves).

    Returns:
        ``(A, G)`` with ``A = Σ α_u A_u`` (``Σ α_u = 1``, ``α >= 0``) and ``G = Σ β_u G_u``, in the dtype of the
        first term (computed in float64). A diagonal side stays a vector only if it is a vector in every term.
    """
    if not terms:
        raise ValueError("nearest_kronecker needs at least one (A, G) term")
    a_terms = [a.double() for a, _ in terms]
    g_terms = [g.double() for _, g in terms]
    dtype = terms[0][0].dtype
    k = len(terms)
    gram_a = torch.stack([torch.stack([_inner(x, y) for y in a_terms]) for x in a_terms])
    gram_g = torch.stack([torch.stack([_inner(x, y) for y in g_terms]) for x in g_terms])
    alpha = torch.full((k,), 1.0 / k, dtype=torch.float64, device=gram_a.device)
    if k > 1:
        product = gram_g @ gram_a
        for _ in range(iterations):
            nxt = product @ alpha
            total = nxt.sum()
            if not bool(total > 0):
                break  # every term is zero on one side: nothing to fit, keep the even weights
            nxt = nxt / total
            done = bool((nxt - alpha).abs().max() <= 1e-12)
            alpha = nxt
            if done:
                break
    norm = alpha @ gram_a @ alpha
    beta = gram_a @ alpha / norm if bool(norm > 0) else torch.zeros_like(alpha)
    return _combine(alpha, a_terms).to(dtype), _combine(beta, g_terms).to(dtype)


class UseStatistics(KroneckerFactors, CurvatureBlock):
    """The batch factors of one use of a shared parameter, in that use's own orientation; folded into the shared
    block by :meth:`SharedParameter.combine` and never preconditioning anything itself."""

    def precondition(self, grad: Tensor) -> Tensor:
        raise RuntimeError("a shared parameter's use has no preconditioner: its statistics feed the shared block")


@dataclass(eq=False)
class SharedUse:
    """One layer using the shared parameter: its name, its statistics and its orientation against the canonical
    use (``transposed``: its ``d_o x d_i`` matrix is the canonical one's transpose)."""

    name: str
    statistics: UseStatistics
    transposed: bool


@dataclass(eq=False)
class SharedParameter:
    """A parameter's uses and the block they feed.

    Attributes:
        parameter: the parameter's name.
        block: the method's curvature block of the canonical use (the only one that preconditions).
        uses: every use, the canonical one first.
    """

    parameter: str
    block: CurvatureBlock
    uses: list[SharedUse] = field(default_factory=list)

    def has_pending(self) -> bool:
        return any(use.statistics.has_pending() for use in self.uses)

    def discard_pending(self) -> None:
        for use in self.uses:
            use.statistics.discard_pending()

    def combine(self) -> None:
        """Fit one Kronecker product to the uses' pending batch factors and add it to the block's pending
        statistics (with the rows and samples of the uses that had data); clears the uses."""
        fed = [use for use in self.uses if use.statistics.has_pending()]
        if not fed:
            self.discard_pending()
            return
        terms = []
        for use in fed:
            a_batch, g_batch = use.statistics.batch_factors()
            terms.append((g_batch, a_batch) if use.transposed else (a_batch, g_batch))
        a_fit, g_fit = nearest_kronecker(terms)
        a_count, g_count = fed[0].statistics.pending_counts()
        self.block.add_input_factor(a_fit, a_count)
        self.block.add_output_grad_factor(g_fit, g_count)
        self.discard_pending()
