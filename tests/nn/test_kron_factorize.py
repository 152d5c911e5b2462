from __future__ import annotations

import pytest
import torch

from kronfac.nn import kron_shapes, nearest_kronecker
from kronfac.nn.factorize import divisor_pairs, kron_shape_options, rearrange


def _params(shape: tuple[tuple[int, int], tuple[int, int]]) -> int:
    (m1, n1), (m2, n2) = shape
    return m1 * n1 + m2 * n2


def test_divisor_pairs() -> None:
    assert divisor_pairs(12) == [(1, 12), (2, 6), (3, 4), (4, 3), (6, 2), (12, 1)]
    with pytest.raises(ValueError, match="size"):
        divisor_pairs(0)


@pytest.mark.parametrize(("m", "n", "target"), [(256, 64, 16), (512, 128, 38), (64, 16, 4), (100, 60, 10)])
def test_kron_shapes_close_to_target_and_consistent(m: int, n: int, target: float) -> None:
    shape = kron_shapes(m, n, target)
    (m1, n1), (m2, n2) = shape
    assert m1 * m2 == m and n1 * n2 == n
    achieved = m * n / _params(shape)
    # Nothing achievable is more than 10% closer (in log ratio) than the chosen split.
    import math

    best = min(abs(math.log(o.compression / target)) for o in kron_shape_options(m, n))
    assert abs(math.log(achieved / target)) <= best + math.log(1.1) + 1e-12


def test_kron_shapes_errors() -> None:
    with pytest.raises(ValueError, match="achievable compressions range"):
        kron_shapes(64, 16, 38)
    with pytest.raises(ValueError, match="non-trivial"):
        kron_shapes(7, 1, 2)
    with pytest.raises(ValueError, match="compression"):
        kron_shapes(16, 16, 1.0)


def test_rearrange_maps_kron_to_outer_product() -> None:
    a, b = torch.randn(3, 2, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    r = rearrange(torch.kron(a, b), ((3, 2), (4, 5)))
    torch.testing.assert_close(r, torch.outer(a.flatten(), b.flatten()))


def test_nearest_kronecker_recovers_exact_product() -> None:
    a, b = torch.randn(4, 3, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    w = torch.kron(a, b)
    a_hat, b_hat, err = nearest_kronecker(w, ((4, 3), (5, 6)))
    assert err < 1e-6
    torch.testing.assert_close(torch.kron(a_hat, b_hat), w, rtol=1e-6, atol=1e-6)


def test_nearest_kronecker_is_optimal_and_error_is_exact() -> None:
    w = torch.randn(12, 10, dtype=torch.float64)
    shape = ((3, 5), (4, 2))
    a, b, err = nearest_kronecker(w, shape)
    direct = float((w - torch.kron(a, b)).norm() / w.norm())
    assert err == pytest.approx(direct, rel=1e-10)
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        ra = torch.randn(3, 5, dtype=torch.float64, generator=gen)
        rb = torch.randn(4, 2, dtype=torch.float64, generator=gen)
        # Even the best scaling of random factors is worse than the nearest Kronecker product.
        k = torch.kron(ra, rb)
        alpha = float((w * k).sum() / (k * k).sum())
        assert float((w - alpha * k).norm() / w.norm()) > err
    # Local optimality: small perturbations of the factors never help.
    base = float((w - torch.kron(a, b)).norm())
    for _ in range(10):
        da, db = 1e-3 * torch.randn_like(a), 1e-3 * torch.randn_like(b)
        assert float((w - torch.kron(a + da, b + db)).norm()) >= base - 1e-12


def test_nearest_kronecker_shape_errors() -> None:
    with pytest.raises(ValueError, match="m1\\*m2 = out_features"):
        nearest_kronecker(torch.randn(12, 10), ((3, 5), (3, 2)))
