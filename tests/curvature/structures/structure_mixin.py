"""Test mixin that every SINGD structure's test class inherits.

A test class names the structure and gives an independent dense reference of its orthogonal projection ``P_S``
(a mask, or the mean along the allowed diagonals for Toeplitz structures) and its parameter-count formula. The
mixin then checks every operation against its dense counterpart after projection, in float32 and float64, the
SINGD projection ``Π(M) = P_S(M + M^T) - P_S(P_S(M^T)^T)``, closure under products and under the SINGD update,
and the state_dict round trip.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor

from kronfac.curvature.singd_update import SINGDFactors, precondition, singd_step
from kronfac.curvature.structures import STRUCTURES, StructuredMatrix, make_structure, structure_from_state
from kronfac.curvature.structures.base import all_finite

DTYPES = (torch.float32, torch.float64)


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-11}


def assert_close(actual: Tensor, expected: Tensor) -> None:
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, **tolerances(expected.dtype))


def mask_projection(mat: Tensor, mask: Tensor) -> Tensor:
    return mat * mask.to(mat.dtype)


def diagonal_mean_projection(mat: Tensor, offsets: range) -> Tensor:
    """Replace each allowed diagonal (offset ``j - i``) by its mean; zero the others."""
    dim = mat.shape[0]
    out = torch.zeros_like(mat)
    for k in offsets:
        if abs(k) >= dim:
            continue
        diag = torch.diagonal(mat, offset=k)
        out += torch.diag(diag.mean().expand_as(diag), diagonal=k)
    return out


class StructureTestMixin:
    """Inherit and set ``NAME`` (registry name) and ``PARAMS``; implement ``reference_projection`` and
    ``expected_num_params``."""

    NAME: ClassVar[str]
    PARAMS: ClassVar[dict[str, int]] = {}
    DIMS: ClassVar[tuple[int, ...]] = (1, 2, 5, 8)

    # ------------------------------------------------------------------ to implement
    def reference_projection(self, mat: Tensor) -> Tensor:
        """Dense ``P_S(mat)``, written independently of the implementation."""
        raise NotImplementedError

    def expected_num_params(self, dim: int) -> int:
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    def reference_singd_projection(self, sym: Tensor) -> Tensor:
        P = self.reference_projection
        return P(sym + sym.T) - P(P(sym.T).T)

    def make(self, dim: int, dtype: torch.dtype, fill: str = "identity") -> StructuredMatrix:
        return make_structure(self.NAME, dim, dtype=dtype, fill=fill, **self.PARAMS)

    def random(self, dim: int, dtype: torch.dtype) -> StructuredMatrix:
        cls = STRUCTURES[self.NAME]
        return cls.from_dense(torch.randn(dim, dim, dtype=dtype), **self.PARAMS)

    @staticmethod
    def random_sym(dim: int, dtype: torch.dtype) -> Tensor:
        mat = torch.randn(dim, dim, dtype=dtype)
        return mat + mat.T

    @staticmethod
    def random_spd(dim: int, dtype: torch.dtype) -> Tensor:
        mat = torch.randn(dim, 2 * dim, dtype=dtype)
        return mat @ mat.T / (2 * dim)

    # ------------------------------------------------------------------ tests
    @pytest.fixture(params=DTYPES, ids=["fp32", "fp64"])
    def dtype(self, request: Any) -> torch.dtype:
        return request.param

    @classmethod
    def pytest_generate_tests(cls, metafunc: Any) -> None:
        """Parametrize ``dim`` over the structure's ``DIMS``."""
        if "dim" in metafunc.fixturenames:
            metafunc.parametrize("dim", cls.DIMS)

    def test_registry_name(self) -> None:
        assert STRUCTURES[self.NAME].name == self.NAME

    def test_identity_and_zeros(self, dim: int, dtype: torch.dtype) -> None:
        assert_close(self.make(dim, dtype).to_dense(), torch.eye(dim, dtype=dtype))
        assert_close(self.make(dim, dtype, fill="zeros").to_dense(), torch.zeros(dim, dim, dtype=dtype))

    def test_from_dense_is_the_orthogonal_projection(self, dim: int, dtype: torch.dtype) -> None:
        mat = torch.randn(dim, dim, dtype=dtype)
        projected = STRUCTURES[self.NAME].from_dense(mat, **self.PARAMS)
        assert projected.dim == dim
        assert_close(projected.to_dense(), self.reference_projection(mat))
        # identity on the structure
        assert_close(projected.like(projected.to_dense()).to_dense(), projected.to_dense())

    def test_project_symmetric(self, dim: int, dtype: torch.dtype) -> None:
        sym = self.random_sym(dim, dtype)
        assert_close(self.make(dim, dtype).project(sym).to_dense(), self.reference_singd_projection(sym))

    def test_matmul_variants(self, dim: int, dtype: torch.dtype) -> None:
        K = self.random(dim, dtype)
        dense, X = K.to_dense(), torch.randn(dim, 3, dtype=dtype)
        assert_close(K.matmul(X), dense @ X)
        assert_close(K @ X, dense @ X)
        assert_close(K.matmul_t(X), dense.T @ X)
        assert_close(K.rmatmul(X.T), X.T @ dense)

    def test_structured_product(self, dim: int, dtype: torch.dtype) -> None:
        K, M = self.random(dim, dtype), self.random(dim, dtype)
        product = K.to_dense() @ M.to_dense()
        assert_close(K.mm(M).to_dense(), self.reference_projection(product))
        assert_close((K @ M).to_dense(), self.reference_projection(product))
        if STRUCTURES[self.NAME].closed_under_product:
            assert_close(self.reference_projection(product), product)

    def test_from_inner(self, dim: int, dtype: torch.dtype) -> None:
        K = self.random(dim, dtype)
        dense, X = K.to_dense(), torch.randn(dim, 4, dtype=dtype)
        expected = self.reference_singd_projection(dense.T @ X @ X.T @ dense)
        assert_close(K.from_inner(X).to_dense(), expected)
        assert_close(K.from_inner().to_dense(), self.reference_singd_projection(dense.T @ dense))

    def test_from_inner_matrix(self, dim: int, dtype: torch.dtype) -> None:
        K = self.random(dim, dtype)
        dense, A = K.to_dense(), self.random_spd(dim, dtype)
        assert_close(K.from_inner_matrix(A).to_dense(), self.reference_singd_projection(dense.T @ A @ dense))
        diag = torch.rand(dim, dtype=dtype)
        expected = self.reference_singd_projection(dense.T @ torch.diag(diag) @ dense)
        assert_close(K.from_inner_matrix(diag).to_dense(), expected)

    def test_trace_and_add_diagonal(self, dim: int, dtype: torch.dtype) -> None:
        K = self.random(dim, dtype)
        dense = K.to_dense()
        assert_close(K.trace(), dense.trace())
        assert_close(K.add_diagonal(0.25).to_dense(), dense + 0.25 * torch.eye(dim, dtype=dtype))

    def test_linear_combinations(self, dim: int, dtype: torch.dtype) -> None:
        K, M = self.random(dim, dtype), self.random(dim, dtype)
        Kd, Md = K.to_dense(), M.to_dense()
        assert_close(K.scale(-1.5).to_dense(), -1.5 * Kd)
        assert_close((2.0 * K).to_dense(), 2.0 * Kd)
        assert_close(K.add(M, alpha=0.3).to_dense(), Kd + 0.3 * Md)
        assert_close((K - M).to_dense(), Kd - Md)
        assert_close((-K + M).to_dense(), Md - Kd)

    def test_num_params(self, dim: int, dtype: torch.dtype) -> None:
        K = self.make(dim, dtype)
        assert K.num_params() == self.expected_num_params(dim)
        assert K.num_params() == sum(t.numel() for t in K.tensors().values())

    def test_state_dict_round_trip(self, dim: int, dtype: torch.dtype) -> None:
        K = self.random(dim, dtype)
        restored = structure_from_state(K.state_dict())
        assert type(restored) is type(K)
        assert restored.structure_params() == K.structure_params()
        for name, tensor in K.tensors().items():
            assert torch.equal(restored.tensors()[name], tensor)

    def test_dtype_conversion(self, dim: int, dtype: torch.dtype) -> None:
        K = self.random(dim, dtype)
        other = torch.float64 if dtype == torch.float32 else torch.float32
        assert K.to(other).dtype == other
        assert_close(K.to(other).to_dense(), K.to_dense().to(other))

    def test_mismatched_structures_raise(self, dtype: torch.dtype) -> None:
        K = self.make(5, dtype)
        with pytest.raises(ValueError, match="Structure mismatch"):
            K.add(self.make(6, dtype))

    def test_closed_under_singd_update(self, dim: int, dtype: torch.dtype) -> None:
        """One SINGD step from batch matrices equals the dense formula with ``Π`` and stays in ``S``."""
        d_o = max(1, dim - 1)
        K, m_K = self.random(dim, dtype).add_diagonal(2.0), self.random(dim, dtype).scale(0.1)
        C = STRUCTURES["dense"].from_dense(torch.eye(d_o, dtype=dtype) + 0.1 * torch.randn(d_o, d_o, dtype=dtype))
        m_C = STRUCTURES["dense"].from_dense(0.1 * self.random_sym(d_o, dtype))
        a, g = torch.randn(7, dim, dtype=dtype), torch.randn(7, d_o, dtype=dtype)
        hyper = {"damping": 0.1, "alpha1": 0.5, "lr_cov": 0.05}
        new = singd_step(SINGDFactors(K, C, m_K, m_C), a=a, g=g, **hyper)

        Pi = self.reference_singd_projection
        Kd, Cd = K.to_dense(), C.to_dense()
        H_K, H_C = Pi(Kd.T @ (a.T @ a / 7) @ Kd), Cd.T @ (g.T @ g / 7) @ Cd
        KtK, CtC = Pi(Kd.T @ Kd), Cd.T @ Cd
        inner = H_C.trace() / d_o * H_K + 0.1 * CtC.trace() / d_o * KtK - torch.eye(dim, dtype=dtype)
        m_K_ref = 0.5 * m_K.to_dense() + 0.5 * inner
        K_ref = Kd - 0.05 * self.reference_projection(Kd @ m_K_ref)
        assert_close(new.m_K.to_dense(), m_K_ref)
        assert_close(new.K.to_dense(), K_ref)
        for matrix in (new.K, new.m_K):
            assert type(matrix) is type(K) and matrix.num_params() == K.num_params()
            assert_close(self.reference_projection(matrix.to_dense()), matrix.to_dense())

    def test_precondition(self, dim: int, dtype: torch.dtype) -> None:
        K, C = self.random(dim, dtype), self.random(3, dtype) if dim != 3 else self.random(4, dtype)
        grad = torch.randn(C.dim, dim, dtype=dtype)
        Kd, Cd = K.to_dense(), C.to_dense()
        assert_close(precondition(K, C, grad), Cd @ Cd.T @ grad @ Kd @ Kd.T)

    def test_outer(self, dim: int, dtype: torch.dtype) -> None:
        """``outer()`` is ``K K^T`` (applied from either side), and preconditioning with it changes nothing."""
        K, C = self.random(dim, dtype), self.random(dim + 1, dtype)
        outer_K, outer_C = K.outer(), C.outer()
        if outer_K is None:
            assert K.outer_cost() is None and outer_C is None
            return
        cost = K.outer_cost()
        assert isinstance(cost, int) and cost >= 1
        Kd = K.to_dense()
        assert_close(outer_K.to_dense(), Kd @ Kd.T)
        grad = torch.randn(C.dim, dim, dtype=dtype)
        assert_close(outer_K.rmatmul(grad), grad @ Kd @ Kd.T)
        assert_close(precondition(K, C, grad, outer_K, outer_C), precondition(K, C, grad))
        assert_close(precondition(K, C, grad, outer_K, None), precondition(K, C, grad))
        assert_close(precondition(K, C, grad, None, outer_C), precondition(K, C, grad))

    def test_scale_add_and_add_mm(self, dim: int, dtype: torch.dtype) -> None:
        """The fused combinations equal the chained ones and leave their inputs alone."""
        K, M, N = self.random(dim, dtype), self.random(dim, dtype), self.random(dim, dtype)
        before = [m.to_dense().clone() for m in (K, M, N)]
        coeff = torch.tensor(0.7, dtype=dtype)
        fused = K.scale_add(-1.5, [(M, 0.3), (N, coeff)], diagonal=-0.5)
        chained = K.scale(-1.5).add(M, alpha=0.3).add(N, alpha=coeff).add_diagonal(-0.5)
        assert type(fused) is type(K)
        assert_close(fused.to_dense(), chained.to_dense())
        assert_close(K.add_mm(M, N, alpha=-0.2).to_dense(), K.add(M.mm(N), alpha=-0.2).to_dense())
        for m, old in zip((K, M, N), before):
            assert torch.equal(m.to_dense(), old)

    def test_all_finite(self, dim: int, dtype: torch.dtype) -> None:
        """One NaN or Inf anywhere is found; huge finite entries whose sum overflows are still finite."""
        K = self.random(dim, dtype)
        assert K.is_finite() and all_finite([K, self.make(dim, dtype)])
        name, tensor = next((n, t) for n, t in K.tensors().items() if t.numel())
        for bad in (float("nan"), float("inf"), -float("inf")):
            broken = tensor.clone()
            broken.view(-1)[-1] = bad
            assert not K.with_tensors({**K.tensors(), name: broken}).is_finite()
            assert not all_finite([self.make(dim, dtype), K.with_tensors({**K.tensors(), name: broken})])
        huge = torch.full_like(tensor, torch.finfo(dtype).max / 2)
        assert K.with_tensors({**K.tensors(), name: huge}).is_finite()
