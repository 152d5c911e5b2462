"""K-FAC's curvature block: EMA Kronecker factors plus their damped inverse from an inverse backend."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from kronfac.curvature.block import CurvatureBlock
from kronfac.curvature.factors import KroneckerFactors
from kronfac.linalg.base import (
    InverseConfig,
    InverseRequest,
    KroneckerInverse,
    build_inverse,
    build_inverses,
    inverse_from_state,
    inverse_to_state,
)

__all__ = ["KFACBlock"]


class KFACBlock(KroneckerFactors, CurvatureBlock):
    """Factors ``A``, ``G`` and ``(G ⊗ A + λI)^{-1}`` as given by ``inverse`` (refreshed every few steps)."""

    def __init__(self, d_in: int, d_out: int, *, name: str, inverse: InverseConfig, **kwargs: Any) -> None:
        super().__init__(d_in, d_out, **kwargs)
        self.name, self.inverse_config = name, inverse
        self.inverse: KroneckerInverse | None = None

    def refresh(self, damping: float) -> None:
        """Rebuild the inverse with damping ``λ`` (kept unchanged until factors exist)."""
        if self.a_factor is None or self.g_factor is None:
            return
        self.inverse = build_inverse(
            self.inverse_config, self.a_factor, self.g_factor, float(damping), previous=self.inverse, layer=self.name
        )

    @classmethod
    def refresh_many(cls, work: list[tuple[CurvatureBlock, float]]) -> None:
        """Refresh blocks that share an inverse config in one ``kronfac.linalg.build_inverses`` call, so
        that the backend can batch factors of equal shape."""
        by_config: dict[int, list[KFACBlock]] = {}
        dampings: dict[int, float] = {}
        for block, damping in work:
            assert isinstance(block, KFACBlock)
            if block.a_factor is None or block.g_factor is None:
                continue
            by_config.setdefault(id(block.inverse_config), []).append(block)
            dampings[id(block)] = float(damping)
        for blocks in by_config.values():
            requests = [
                InverseRequest(b.a_factor, b.g_factor, dampings[id(b)], b.inverse, b.name)  # type: ignore[arg-type]
                for b in blocks
            ]
            for block, inverse in zip(blocks, build_inverses(blocks[0].inverse_config, requests)):
                block.inverse = inverse

    def adopt_inverse(self, inverse: KroneckerInverse) -> None:
        """Take an inverse computed elsewhere (distributed placement: another rank's pieces, assembled here)."""
        self.inverse = inverse

    def precondition(self, grad: Tensor) -> Tensor:
        return grad if self.inverse is None else self.inverse.precondition(grad)

    def release(self) -> None:
        """Drop the factors and inverse (another rank owns this layer's curvature)."""
        self.a_factor = self.g_factor = None
        self.inverse = None
        self.discard_pending()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["inverse"] = None if self.inverse is None else inverse_to_state(self.inverse)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.inverse = None if state["inverse"] is None else inverse_from_state(state["inverse"])
