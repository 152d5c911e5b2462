"""Flat payloads of one layer's batch statistics: ``[rows, samples, A, G]`` with the symmetric factors packed
as upper triangles (SPD-KFAC sends ``d (d + 1) / 2`` numbers per factor instead of ``d^2``)."""

from __future__ import annotations

import torch
from torch import Tensor

from kronfac.curvature.factors import KroneckerFactors

__all__ = ["StatisticsPayload"]

#: Flat indices of the upper triangle per (dim, device), shared by all layers (int32 halves their memory).
_TRIU: dict[tuple[int, torch.device], Tensor] = {}


def _triu_index(dim: int, device: torch.device) -> Tensor:
    key = (dim, device)
    if key not in _TRIU:
        rows, cols = torch.triu_indices(dim, dim, device=device)
        dtype = torch.int32 if dim * dim < 2**31 else torch.int64
        _TRIU[key] = (rows * dim + cols).to(dtype)
    return _TRIU[key]


class StatisticsPayload:
    """Packs and unpacks the pending sums of one :class:`KroneckerFactors` into a flat vector.

    Sums (not means) travel, with their counts, so that the reduced statistics are the means over every row
    of every rank, also when a layer saw no data on some ranks.

    Args:
        block: the layer's factors.
        triangular: pack symmetric factors as upper triangles (else as full matrices).
    """

    COUNTS = 2

    def __init__(self, block: KroneckerFactors, *, triangular: bool) -> None:
        self.block, self.triangular = block, triangular
        self.a_numel = block.d_in if block.diagonal_a else self._numel(block.d_in)
        self.g_numel = self._numel(block.d_out)
        self.numel = self.COUNTS + self.a_numel + self.g_numel

    def _numel(self, dim: int) -> int:
        return dim * (dim + 1) // 2 if self.triangular else dim * dim

    def _pack(self, matrix: Tensor) -> Tensor:
        if matrix.ndim == 1 or not self.triangular:
            return matrix.reshape(-1)
        # index_select on the flat matrix is several times faster than a boolean-mask gather
        return matrix.reshape(-1).index_select(0, _triu_index(matrix.shape[0], matrix.device))

    def _unpack(self, flat: Tensor, dim: int, diagonal: bool) -> Tensor:
        if diagonal:
            return flat.clone()
        if not self.triangular:
            return flat.reshape(dim, dim).clone()
        upper = flat.new_zeros(dim * dim).index_put_((_triu_index(dim, flat.device),), flat).view(dim, dim)
        full = upper + upper.T
        full.diagonal().mul_(0.5)  # the diagonal was counted twice (exact: x + x then / 2)
        return full

    def has_data(self) -> bool:
        a_sum, _, g_sum, g_count = self.block.pending_sums()
        return a_sum is not None and g_sum is not None and g_count > 0

    def counts(self) -> tuple[int, int]:
        _, a_count, _, g_count = self.block.pending_sums()
        return a_count, g_count

    def write(self, out: Tensor) -> None:
        """Write the pending sums into ``out`` (zeros when the layer has no complete statistics)."""
        if not self.has_data():
            out.zero_()
            return
        a_sum, a_count, g_sum, g_count = self.block.pending_sums()
        assert a_sum is not None and g_sum is not None
        out[0], out[1] = float(a_count), float(g_count)
        out[self.COUNTS : self.COUNTS + self.a_numel].copy_(self._pack(a_sum))
        out[self.COUNTS + self.a_numel :].copy_(self._pack(g_sum))

    def read(self, flat: Tensor) -> None:
        """Replace the pending statistics by the reduced sums in ``flat`` (or drop them if no rank had any)."""
        a_count, g_count = round(float(flat[0])), round(float(flat[1]))
        if a_count <= 0 or g_count <= 0:
            self.block.discard_pending()
            return
        block = self.block
        a_sum = self._unpack(flat[self.COUNTS : self.COUNTS + self.a_numel], block.d_in, block.diagonal_a)
        g_sum = self._unpack(flat[self.COUNTS + self.a_numel :], block.d_out, False)
        block.set_pending_sums(a_sum, a_count, g_sum, g_count)
