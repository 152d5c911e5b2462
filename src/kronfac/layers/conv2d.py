"""``nn.Conv2d`` via unfold (Grosse & Martens 2016): patches are the layer inputs, output locations are
weight-sharing positions ("expand" treats them as extra samples, "reduce" aggregates them; Eschenhagen et al.
2023). Supports stride, padding (numbers, tuples, "valid", and "same" where symmetric) and dilation; groups=1
and zero padding only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kronfac.layers.base import LayerHelper, UnsupportedModuleError, param_values, register_helper, require_grads
from kronfac.layers.linear import append_ones

__all__ = ["Conv2dHelper"]


def _padding(module: nn.Conv2d) -> tuple[int, int]:
    if module.padding == "valid":
        return (0, 0)
    if module.padding == "same":
        pads = []
        for k, d in zip(module.kernel_size, module.dilation):
            total = d * (k - 1)
            if total % 2:
                raise UnsupportedModuleError(
                    f"Conv2d with padding='same' and asymmetric padding (kernel {module.kernel_size}, "
                    f"dilation {module.dilation}) is not supported; use explicit padding"
                )
            pads.append(total // 2)
        return (pads[0], pads[1])
    return module.padding  # type: ignore[return-value]


class Conv2dHelper(LayerHelper):
    """``nn.Conv2d``: unfolded patches are the input rows, output locations the weight-sharing positions."""

    module_types = (nn.Conv2d,)

    def check(self, module: nn.Module) -> None:
        assert isinstance(module, nn.Conv2d)
        if module.groups != 1:
            raise UnsupportedModuleError(f"Conv2d with groups={module.groups} is not supported (groups=1 only)")
        if module.padding_mode != "zeros":
            raise UnsupportedModuleError(
                f"Conv2d with padding_mode={module.padding_mode!r} is not supported (only 'zeros')"
            )
        _padding(module)

    def dims(self, module: nn.Module) -> tuple[int, int]:
        assert isinstance(module, nn.Conv2d)
        d_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        return d_in + self.has_bias(module), module.out_channels

    def input_rows(self, module: nn.Module, x: Tensor) -> Tensor:
        assert isinstance(module, nn.Conv2d)
        if x.ndim == 3:
            x = x.unsqueeze(0)
        patches = F.unfold(
            x, module.kernel_size, dilation=module.dilation, padding=_padding(module), stride=module.stride
        )  # (N, C k_h k_w, L)
        patches = patches.transpose(1, 2)
        return append_ones(patches) if self.has_bias(module) else patches

    def output_grad_rows(self, module: nn.Module, grad_out: Tensor) -> Tensor:
        if grad_out.ndim == 3:
            grad_out = grad_out.unsqueeze(0)
        return grad_out.flatten(2).transpose(1, 2)

    def grad_matrix(self, module: nn.Module) -> Tensor:
        grads = require_grads(self.params(module))
        weight = grads[0].flatten(1)
        if len(grads) == 1:
            return weight
        return torch.cat([weight, grads[1].unsqueeze(1)], dim=1)

    def split(self, module: nn.Module, matrix: Tensor) -> list[Tensor]:
        assert isinstance(module, nn.Conv2d)
        weight_shape = module.weight.shape
        if self.has_bias(module):
            return [matrix[:, :-1].reshape(weight_shape), matrix[:, -1]]
        return [matrix.reshape(weight_shape)]

    def param_matrix(self, module: nn.Module) -> Tensor:
        params = param_values(self.params(module))
        weight = params[0].flatten(1)
        if len(params) == 1:
            return weight
        return torch.cat([weight, params[1].unsqueeze(1)], dim=1)


register_helper(Conv2dHelper())
