"""The base class's naive fallbacks (a structure that implements only the required interface) and the registry."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import Tensor

from kronfac.curvature.structures import (
    STRUCTURES,
    BlockDiagonalMatrix,
    HierarchicalMatrix,
    StructuredMatrix,
    make_structure,
    parse_structure,
    structure_from_state,
)


class LowerBidiagonal(StructuredMatrix):
    """Diagonal plus first sub-diagonal: only the required interface, everything else is the naive fallback."""

    name = "lower_bidiagonal"
    symmetric_pattern = False
    closed_under_product = False

    def __init__(self, diag: Tensor, sub: Tensor) -> None:
        super().__init__(diag.shape[0])
        self.diag, self.sub = diag, sub

    @classmethod
    def from_dense(cls, mat: Tensor, **params: Any) -> LowerBidiagonal:
        return cls(mat.diagonal().clone(), mat.diagonal(-1).clone())

    def to_dense(self) -> Tensor:
        return torch.diag(self.diag) + torch.diag(self.sub, -1)

    def tensors(self) -> dict[str, Tensor]:
        return {"diag": self.diag, "sub": self.sub}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], **params: Any) -> LowerBidiagonal:
        return cls(tensors["diag"], tensors["sub"])

    @classmethod
    def identity(cls, dim: int, *, dtype: Any = None, device: Any = None, **params: Any) -> LowerBidiagonal:
        return cls(torch.ones(dim, dtype=dtype, device=device), torch.zeros(dim - 1, dtype=dtype, device=device))


def test_naive_fallbacks_are_correct_and_warn_once() -> None:
    K = LowerBidiagonal.from_dense(torch.randn(5, 5, dtype=torch.float64))
    Kd, X = K.to_dense(), torch.randn(5, 3, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="LowerBidiagonal.matmul uses the naive dense fallback"):
        torch.testing.assert_close(K.matmul(X), Kd @ X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call does not warn again
        torch.testing.assert_close(K.matmul(X), Kd @ X)
    with pytest.warns(RuntimeWarning, match="from_inner"):
        KtK = K.from_inner()
    sym = Kd.T @ Kd
    expected = torch.diag(sym.diagonal()) + 2 * torch.diag(sym.diagonal(-1), -1)
    torch.testing.assert_close(KtK.to_dense(), expected)
    torch.testing.assert_close(K.project(sym).to_dense(), expected)
    with pytest.warns(RuntimeWarning, match="trace"):
        torch.testing.assert_close(K.trace(), Kd.trace())
    with pytest.warns(RuntimeWarning, match="mm"):
        product = Kd @ Kd  # not bidiagonal: mm projects it
        expected_product = torch.diag(product.diagonal()) + torch.diag(product.diagonal(-1), -1)
        torch.testing.assert_close(K.mm(K).to_dense(), expected_product)
    torch.testing.assert_close(K.add_diagonal(1.0).to_dense(), Kd + torch.eye(5, dtype=torch.float64))
    assert K.zeros(4).num_params() == 7


def test_registry_names_aliases_and_defaults() -> None:
    assert len(STRUCTURES) == 9
    assert parse_structure("block30diagonal") == (BlockDiagonalMatrix, {"block_size": 30})
    assert parse_structure("hierarchical15_15") == (HierarchicalMatrix, {"k1": 15, "k2": 15})
    assert parse_structure(("block_diagonal", {"block_size": 4}))[1] == {"block_size": 4}
    assert parse_structure("block_diagonal")[1] == {"block_size": 30}
    assert parse_structure("triltoeplitz")[0].name == "lower_toeplitz"
    assert parse_structure("tril")[0].name == "lower_triangular"
    assert make_structure("hierarchical", 40, k1=5).structure_params() == {"k1": 5, "k2": 15}


def test_registry_rejects_bad_specs() -> None:
    with pytest.raises(ValueError, match="Invalid structure: 'banded'"):
        parse_structure("banded")
    with pytest.raises(ValueError, match=r"Invalid parameters \['block_size'\] for structure 'dense'"):
        parse_structure(("dense", {"block_size": 3}))
    with pytest.raises(ValueError, match="Invalid block_size"):
        make_structure("block_diagonal", 5, block_size=0)
    with pytest.raises(ValueError, match="Invalid fill"):
        make_structure("dense", 5, fill="ones")
    state = make_structure("diagonal", 3).state_dict()
    state["dim"] = 4
    with pytest.raises(ValueError, match="Invalid state"):
        structure_from_state(state)
