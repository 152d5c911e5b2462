from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kronfac.nn import kron_cost, kron_matvec

dims = st.integers(min_value=1, max_value=5)
leading = st.lists(st.integers(min_value=1, max_value=3), min_size=0, max_size=3)
orders = st.sampled_from(["auto", "a_first", "b_first"])


@settings(max_examples=60, deadline=None)
@given(a1=dims, a2=dims, b1=dims, b2=dims, lead=leading, order=orders, seed=st.integers(0, 2**16))
def test_matches_dense_and_its_gradients(
    a1: int, a2: int, b1: int, b2: int, lead: list[int], order: str, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(a1, a2, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(b1, b2, dtype=torch.float64, generator=gen, requires_grad=True)
    x = torch.randn(*lead, a2 * b2, dtype=torch.float64, generator=gen, requires_grad=True)
    cot = torch.randn(*lead, a1 * b1, dtype=torch.float64, generator=gen)

    y = kron_matvec(a, b, x, order=order)  # type: ignore[arg-type]
    grads = torch.autograd.grad((y * cot).sum(), (a, b, x))
    y_ref = torch.matmul(torch.kron(a, b), x.unsqueeze(-1)).squeeze(-1)
    grads_ref = torch.autograd.grad((y_ref * cot).sum(), (a, b, x))

    assert y.shape == (*lead, a1 * b1)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


def test_gradcheck() -> None:
    a = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, x: kron_matvec(a, b, x), (a, b, x))


def test_auto_picks_cheaper_order() -> None:
    # A wide and short, B tall and narrow: a_first = a1 b2 (a2 + b1) = 2*2*(64+64) < b_first = 64*64*(2+2).
    cost = kron_cost((2, 64), (64, 2))
    assert cost["a_first"] < cost["b_first"]
    assert kron_cost((3, 4), (5, 6))["dense"] == 3 * 4 * 5 * 6
    a, b = torch.randn(2, 64), torch.randn(64, 2)
    x = torch.randn(7, 128)
    torch.testing.assert_close(kron_matvec(a, b, x), kron_matvec(a, b, x, order="a_first"))


def test_errors_name_the_problem() -> None:
    a, b = torch.randn(2, 3), torch.randn(4, 5)
    with pytest.raises(ValueError, match="a2\\*b2"):
        kron_matvec(a, b, torch.randn(10, 14))
    with pytest.raises(ValueError, match="order"):
        kron_matvec(a, b, torch.randn(15), order="sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2-D"):
        kron_matvec(a.flatten(), b, torch.randn(15))
