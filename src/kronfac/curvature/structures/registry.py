"""Registry of the SINGD structures: name -> class, and constructors from a name and a dimension.

A structure is named by a string (``"dense"``, ``"diagonal"``, ``"block_diagonal"``, ``"lower_triangular"``,
``"upper_triangular"``, ``"hierarchical"``, ``"toeplitz"``, ``"lower_toeplitz"``, ``"upper_toeplitz"``), optionally
with its structural parameters as a ``(name, {"block_size": 16})`` pair. The names of the reference package
``singd`` are understood too (``"block30diagonal"``, ``"hierarchical15_15"``, ``"triltoeplitz"``,
``"triutoeplitz"``), as are the short forms ``"diag"``, ``"tril"`` and ``"triu"``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from kronfac.curvature.structures.base import StructuredMatrix
from kronfac.curvature.structures.block_diagonal import BlockDiagonalMatrix
from kronfac.curvature.structures.dense import DenseMatrix
from kronfac.curvature.structures.diagonal import DiagonalMatrix
from kronfac.curvature.structures.hierarchical import HierarchicalMatrix
from kronfac.curvature.structures.lower_toeplitz import LowerToeplitzMatrix
from kronfac.curvature.structures.lower_triangular import LowerTriangularMatrix
from kronfac.curvature.structures.toeplitz import ToeplitzMatrix
from kronfac.curvature.structures.upper_toeplitz import UpperToeplitzMatrix
from kronfac.curvature.structures.upper_triangular import UpperTriangularMatrix

__all__ = [
    "DEFAULT_STRUCTURE_PARAMS",
    "STRUCTURES",
    "StructureSpec",
    "make_structure",
    "parse_structure",
    "structure_from_state",
]

STRUCTURES: dict[str, type[StructuredMatrix]] = {
    cls.name: cls
    for cls in (
        DenseMatrix,
        DiagonalMatrix,
        BlockDiagonalMatrix,
        LowerTriangularMatrix,
        UpperTriangularMatrix,
        HierarchicalMatrix,
        ToeplitzMatrix,
        LowerToeplitzMatrix,
        UpperToeplitzMatrix,
    )
}

#: Structural parameters used when none are given. Source: the structures registered by the reference
#: implementation of SINGD (``singd``: ``Block30DiagonalMatrix``, ``Hierarchical15_15Matrix``).
DEFAULT_STRUCTURE_PARAMS: dict[str, dict[str, int]] = {
    "block_diagonal": {"block_size": 30},
    "hierarchical": {"k1": 15, "k2": 15},
}

_ALIASES = {
    "diag": "diagonal",
    "tril": "lower_triangular",
    "triu": "upper_triangular",
    "triltoeplitz": "lower_toeplitz",
    "triutoeplitz": "upper_toeplitz",
    "blockdiagonal": "block_diagonal",
}

StructureSpec = str | tuple[str, Mapping[str, int]]


def parse_structure(spec: StructureSpec) -> tuple[type[StructuredMatrix], dict[str, int]]:
    """Class and structural parameters (defaults filled in) of a structure spec.

    Raises:
        ValueError: If the name is unknown or a parameter does not belong to the structure.
    """
    name, given = (spec, {}) if isinstance(spec, str) else (spec[0], dict(spec[1]))
    key = name.lower().replace("-", "_")
    params: dict[str, int] = {}
    if match := re.fullmatch(r"block_?(\d+)_?diagonal", key):
        key, params = "block_diagonal", {"block_size": int(match.group(1))}
    elif match := re.fullmatch(r"hierarchical_?(\d+)_(\d+)", key):
        key, params = "hierarchical", {"k1": int(match.group(1)), "k2": int(match.group(2))}
    key = _ALIASES.get(key, key)
    if key not in STRUCTURES:
        raise ValueError(f"Invalid structure: {name!r} (allowed: {', '.join(sorted(STRUCTURES))})")
    defaults = DEFAULT_STRUCTURE_PARAMS.get(key, {})
    unknown = set(given) - set(defaults)
    if unknown:
        raise ValueError(
            f"Invalid parameters {sorted(unknown)} for structure {key!r} (allowed: {sorted(defaults) or 'none'})"
        )
    return STRUCTURES[key], {**defaults, **params, **given}


def make_structure(
    spec: StructureSpec,
    dim: int,
    *,
    dtype: torch.dtype | None = None,
    device: Any = None,
    fill: str = "identity",
    **params: int,
) -> StructuredMatrix:
    """Build the identity (``fill="identity"``) or zero (``fill="zeros"``) matrix of a structure.

    Example:
        >>> make_structure("block_diagonal", 5, block_size=2).to_dense()
        tensor([[1., 0., 0., 0., 0.],
                [0., 1., 0., 0., 0.],
                [0., 0., 1., 0., 0.],
                [0., 0., 0., 1., 0.],
                [0., 0., 0., 0., 1.]])
    """
    if params:
        name = spec if isinstance(spec, str) else spec[0]
        extra = {} if isinstance(spec, str) else dict(spec[1])
        spec = (name, {**extra, **params})
    cls, full = parse_structure(spec)
    if fill == "identity":
        return cls.identity(dim, dtype=dtype, device=device, **full)
    if fill == "zeros":
        return cls.zeros(dim, dtype=dtype, device=device, **full)
    raise ValueError(f"Invalid fill: {fill!r} (allowed: 'identity', 'zeros')")


def structure_from_state(state: Mapping[str, Any]) -> StructuredMatrix:
    """Inverse of :meth:`StructuredMatrix.state_dict`."""
    cls, params = parse_structure((state["structure"], state["params"]))
    matrix = cls.from_tensors(dict(state["tensors"]), **params)
    if matrix.dim != state["dim"]:
        raise ValueError(f"Invalid state: tensors give dim {matrix.dim}, state says {state['dim']}")
    return matrix
