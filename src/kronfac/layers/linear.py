"""``nn.Linear``, with any number of leading dimensions (sequence entries become weight-sharing positions)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from kronfac.layers.base import LayerHelper, param_values, register_helper, require_grads

__all__ = ["LinearHelper"]


def append_ones(x: Tensor) -> Tensor:
    """Append a column of ones on the last dimension (the bias input)."""
    return torch.cat([x, x.new_ones((*x.shape[:-1], 1))], dim=-1)


class LinearHelper(LayerHelper):
    """``nn.Linear``, with any number of leading dimensions (weight-sharing positions).

    The base to subclass for your own module that is a linear map (docs/architecture.md, "Add a layer type").
    """

    module_types: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear,)

    def dims(self, module: nn.Module) -> tuple[int, int]:
        assert isinstance(module, nn.Linear)
        return module.in_features + self.has_bias(module), module.out_features

    def input_rows(self, module: nn.Module, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0] if x.ndim > 1 else 1, -1, x.shape[-1])
        return append_ones(x) if self.has_bias(module) else x

    def output_grad_rows(self, module: nn.Module, grad_out: Tensor) -> Tensor:
        return grad_out.reshape(grad_out.shape[0] if grad_out.ndim > 1 else 1, -1, grad_out.shape[-1])

    def orient(self, weight: Tensor) -> Tensor:
        """The stored weight (or its gradient) as ``d_o x d_i``, and back: an involution (identity here; a
        transpose for layers that store ``d_i x d_o``)."""
        return weight

    def grad_matrix(self, module: nn.Module) -> Tensor:
        grads = require_grads(self.params(module))
        weight = self.orient(grads[0])
        if len(grads) == 1:
            return weight
        return torch.cat([weight, grads[1].unsqueeze(1)], dim=1)

    def split(self, module: nn.Module, matrix: Tensor) -> list[Tensor]:
        if self.has_bias(module):
            return [self.orient(matrix[:, :-1]), matrix[:, -1]]
        return [self.orient(matrix)]

    def param_matrix(self, module: nn.Module) -> Tensor:
        params = param_values(self.params(module))
        weight = self.orient(params[0])
        if len(params) == 1:
            return weight
        return torch.cat([weight, params[1].unsqueeze(1)], dim=1)


register_helper(LinearHelper())
