"""Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2's attention and MLP projections): a linear layer
``y = x W + b`` whose weight is stored transposed, ``(d_in, d_out)``; any number of leading dimensions.

Registered by qualified class name, so kronfac does not import transformers (an optional dependency). The
gradient matrix is ``∇Wᵀ`` (``d_o x d_i``, bias as the last column), the convention of every other helper.
"""

from __future__ import annotations

from torch import Tensor, nn

from kronfac.layers.base import register_helper
from kronfac.layers.linear import LinearHelper

__all__ = ["Conv1DHelper"]


class Conv1DHelper(LinearHelper):
    """transformers' ``Conv1D``: a Linear whose weight is stored ``(d_in, d_out)``, matched by class name."""

    module_types = ()
    module_names = ("transformers.pytorch_utils.Conv1D",)

    def dims(self, module: nn.Module) -> tuple[int, int]:
        weight = module.weight
        assert isinstance(weight, Tensor)
        d_in, d_out = weight.shape
        return d_in + self.has_bias(module), d_out

    def orient(self, weight: Tensor) -> Tensor:
        return weight.T


register_helper(Conv1DHelper())
