"""The factors of a KronA adapter (:class:`kronfac.nn.adapters.KronFactor`) as layers of the curvature core.

An adapter computes ``ΔW x = s (A ⊗ B) x`` as ``Y = s A X Bᵀ`` with ``X`` the input reshaped ``(n1, n2)`` and
``y = vec(Y)`` (row-major), ``A`` ``(m1, n1)``, ``B`` ``(m2, n2)``. With ``Ȳ = ∂L/∂Y`` (``(m1, m2)``):

- ``A`` is a linear map applied to the ``m2`` columns of ``U = s X Bᵀ`` (``(n1, m2)``): column ``k`` of ``Y``
  is ``A u_k``. So ``∇A = Ȳ Uᵀ = Σ_k ȳ_k u_kᵀ``: input rows ``u_k`` (``d_i = n1``), output gradients ``ȳ_k``
  (column ``k`` of ``Ȳ``, ``d_o = m1``), ``m2`` weight-sharing positions per sequence entry.
- ``B`` is a linear map applied to the ``m1`` rows of ``Z = s A X`` (``(m1, n2)``): row ``j`` of ``Y`` is
  ``B z_j``. So ``∇B = Ȳᵀ Z = Σ_j ȳ_j z_jᵀ``: input rows ``z_j`` (``d_i = n2``), output gradients ``ȳ_j``
  (row ``j`` of ``Ȳ``, ``d_o = m2``), ``m1`` positions.

K-FAC then keeps, per factor, ``A_F = E[u uᵀ]`` over all rows and ``G_F = E_n[Σ_k ȳ_k ȳ_kᵀ]`` (summed over the
positions of a sample, as for any layer with weight sharing, K-FAC-expand; Eschenhagen et al. 2023), and
``F ≈ G_F ⊗ A_F``. Both factors read ``Ȳ`` itself: each is the last map before the output, so the positions are
never mixed after it, which is the setting in which K-FAC-expand is exact: for a linear model whose output is
``y`` and the square loss, ``G_F ⊗ A_F`` equals the exact GGN block of the factor (e.g. for ``B``:
``J = I ⊗ Z`` and ``JᵀJ = I ⊗ ZᵀZ``), which ``tests/layers/test_krona.py`` checks against torch.func. (Hooking the
first of two sequential products instead would give ``B`` the gradient ``Aᵀ Ȳ`` mixed over positions, whose
K-FAC factor ``‖A‖²_F I ⊗ XᵀX`` is not that block.) The adapter's forward evaluates both views only while a
hook watches a factor (curvature steps), see :class:`kronfac.nn.adapters.KronAdapter`; the scale ``s`` reaches
the statistics through the output gradients (``∂L/∂(A U) = s Ȳ``), so ``∇A`` and ``∇B`` come out exactly.

Rows are ``(N, L, P, d)``: batch, sequence entries (1 without), the ``P`` positions above, features. The
capture counts samples over the first two dimensions (``loss_average="batch"``: ``N``; ``"batch+sequence"``:
``N L``), so a token-averaged loss scales ``G_F`` as it does for every other layer of the model.

Registered by qualified class name: the layer helpers do not import :mod:`kronfac.nn`.

Reference:
    A. Edalati et al., "KronA: Parameter efficient tuning with Kronecker adapter", arXiv:2212.10650 (2022).
    R. Eschenhagen et al., "Kronecker-factored approximate curvature for modern neural network architectures",
    NeurIPS 2023.
"""

from __future__ import annotations

from torch import Tensor, nn

from kronfac.layers.base import register_helper
from kronfac.layers.linear import LinearHelper

__all__ = ["KronFactorHelper"]


class KronFactorHelper(LinearHelper):
    """One KronA factor: a bias-free linear map ``(d_i, d_o) = (in_features, out_features)`` whose rows keep
    their ``(N, L, P, d)`` layout."""

    module_types = ()
    module_names = ("kronfac.nn.adapters.KronFactor",)
    shareable = False

    def dims(self, module: nn.Module) -> tuple[int, int]:
        weight = module.weight
        assert isinstance(weight, Tensor)
        d_out, d_in = weight.shape
        return int(d_in), int(d_out)

    def input_rows(self, module: nn.Module, x: Tensor) -> Tensor:
        return x if x.ndim == 4 else super().input_rows(module, x)

    def output_grad_rows(self, module: nn.Module, grad_out: Tensor) -> Tensor:
        return grad_out if grad_out.ndim == 4 else super().output_grad_rows(module, grad_out)


register_helper(KronFactorHelper())
