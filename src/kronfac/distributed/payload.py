"""Flat payloads of one layer's batch statistics: ``[rows, samples, sums...]`` with symmetric matrices packed as
upper triangles (SPD-KFAC sends ``d (d + 1) / 2`` numbers per factor instead of ``d^2``).

The payload knows a block only through :class:`~kronfac.curvature.block.PendingStatistics`, so the same code
carries K-FAC's factors, AdaFisher's diagonals and SINGD's structured projections.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kronfac.curvature.block import CurvatureStatistics, PendingStatistics

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
    """Packs and unpacks the pending sums of one block into a flat vector.

    Sums (not means) travel, with their counts, so that the reduced statistics are the means over every row
    of every rank, also when a layer saw no data on some ranks.

    Args:
        block: the layer's statistics; they must be sums only (no rows), see :meth:`supports`.
        triangular: pack symmetric matrices as upper triangles (else as full matrices).
    """

    COUNTS = 2

    def __init__(self, block: CurvatureStatistics, *, triangular: bool) -> None:
        template = block.pending_statistics()
        if template.rows:
            raise TypeError(f"{type(block).__name__} keeps rows, which cannot travel in a fixed-size payload")
        self.block, self.triangular = block, triangular
        self.symmetric = template.symmetric if triangular else frozenset()
        self.layout = [(name, t.shape, self._numel(name, t), t.dtype) for name, t in template.sums.items()]
        self.numel = self.COUNTS + sum(entry[2] for entry in self.layout)

    @staticmethod
    def supports(block: CurvatureStatistics) -> bool:
        return not block.pending_statistics().rows

    def _numel(self, name: str, tensor: Tensor) -> int:
        if name in self.symmetric:
            dim = tensor.shape[0]
            return dim * (dim + 1) // 2
        return tensor.numel()

    def _pack(self, name: str, tensor: Tensor) -> Tensor:
        if name not in self.symmetric:
            return tensor.reshape(-1)
        # index_select on the flat matrix is several times faster than a boolean-mask gather
        return tensor.reshape(-1).index_select(0, _triu_index(tensor.shape[0], tensor.device))

    def _unpack(self, name: str, flat: Tensor, shape: torch.Size) -> Tensor:
        if name not in self.symmetric:
            return flat.reshape(shape).clone()
        dim = shape[0]
        upper = flat.new_zeros(dim * dim).index_put_((_triu_index(dim, flat.device),), flat).view(dim, dim)
        full = upper + upper.T
        full.diagonal().mul_(0.5)  # the diagonal was counted twice (exact: x + x then / 2)
        return full

    def has_data(self) -> bool:
        return self.block.has_pending()

    def counts(self) -> tuple[int, int]:
        return self.block.pending_counts()

    def write(self, out: Tensor) -> None:
        """Write the pending sums into ``out`` (zeros when the layer has no complete statistics)."""
        if not self.has_data():
            out.zero_()
            return
        statistics = self.block.pending_statistics()
        out[0], out[1] = float(statistics.a_count), float(statistics.g_count)
        offset = self.COUNTS
        for name, _, numel, _ in self.layout:
            out[offset : offset + numel].copy_(self._pack(name, statistics.sums[name]))
            offset += numel

    def read(self, flat: Tensor) -> None:
        """Replace the pending statistics by the reduced sums in ``flat`` (or drop them if no rank had any)."""
        a_count, g_count = round(float(flat[0])), round(float(flat[1]))
        sums: dict[str, Tensor] = {}
        if a_count > 0 and g_count > 0:
            offset = self.COUNTS
            for name, shape, numel, dtype in self.layout:
                sums[name] = self._unpack(name, flat[offset : offset + numel], shape).to(dtype)
                offset += numel
        self.block.set_pending_statistics(PendingStatistics(a_count, g_count, sums=sums))

    def spans(self) -> list[tuple[str, int, int]]:
        """``(statistic, start, end)`` of each statistic in the flat payload; the counts ride with the first."""
        spans, start = [], 0
        for index, (name, _, numel, _) in enumerate(self.layout):
            end = start + numel + (self.COUNTS if index == 0 else 0)
            spans.append((name, start, end))
            start = end
        return spans
