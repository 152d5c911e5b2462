"""Helpers for the affine part of normalisation layers (LayerNorm, BatchNorm1d/2d/3d), as AdaFisher treats them
(Gomes et al., ICLR 2025).

A normalisation layer with ``C`` normalised features computes ``y_c = γ_c x̂_c + β_c`` per feature ``c`` and
position (sequence entries, spatial locations). The helpers expose:

* ``input_rows``: the normalised input ``x̂`` (what the scale ``γ`` multiplies) as ``(N, R, C)``: one row per
  sample and position, one column per feature. ``x̂`` is recomputed from the layer input with the statistics the
  forward pass used (batch statistics in training, running statistics in eval mode for BatchNorm);
* ``output_grad_rows``: the output gradient in the same ``(N, R, C)`` layout;
* ``grad_matrix``: ``[∇γ, ∇β]`` as ``C x 2`` (``C x 1`` without a shift); ``dims`` is ``(2 or 1, C)``.

Unlike the Linear/Conv2d/Embedding helpers these rows are not the ``d_i`` columns of a Kronecker factor: they
are per-feature statistics, consumed by :class:`~kronfac.curvature.diagonal_fisher.ScaleShiftBlock`. They are therefore
not in the global helper registry (K-FAC keeps treating normalisation layers as first-order parameters); an
optimizer that wants them asks :func:`norm_helper_for`.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from kronfac.layers.base import LayerHelper, UnsupportedModuleError, param_values, require_grads

__all__ = ["BatchNormHelper", "LayerNormHelper", "ScaleShiftHelper", "norm_helper_for"]


class ScaleShiftHelper(LayerHelper):
    """Shared reshapes of a per-feature scale ``γ`` and shift ``β`` (the module's ``weight`` and ``bias``)."""

    shareable: ClassVar[bool] = False

    def check(self, module: nn.Module) -> None:
        if getattr(module, "weight", None) is None:
            raise UnsupportedModuleError(f"{type(module).__name__} without affine parameters has nothing to optimise")

    def channels(self, module: nn.Module) -> int:
        """The number of normalised features ``C``."""
        weight = module.weight
        assert isinstance(weight, Tensor)
        return weight.numel()

    def dims(self, module: nn.Module) -> tuple[int, int]:
        return 1 + self.has_bias(module), self.channels(module)

    @abstractmethod
    def normalized_input(self, module: nn.Module, x: Tensor) -> Tensor:
        """``x̂``, the layer input normalised as in the forward pass, in the input's layout."""

    @abstractmethod
    def to_rows(self, module: nn.Module, t: Tensor) -> Tensor:
        """A tensor in the layer's input/output layout as ``(N, R, C)``."""

    def input_rows(self, module: nn.Module, x: Tensor) -> Tensor:
        return self.to_rows(module, self.normalized_input(module, x))

    def output_grad_rows(self, module: nn.Module, grad_out: Tensor) -> Tensor:
        return self.to_rows(module, grad_out)

    def grad_matrix(self, module: nn.Module) -> Tensor:
        return torch.stack([g.reshape(-1) for g in require_grads(self.params(module))], dim=1)

    def split(self, module: nn.Module, matrix: Tensor) -> list[Tensor]:
        return [matrix[:, i].reshape(p.shape) for i, p in enumerate(self.params(module))]

    def param_matrix(self, module: nn.Module) -> Tensor:
        return torch.stack([p.reshape(-1) for p in param_values(self.params(module))], dim=1)


class LayerNormHelper(ScaleShiftHelper):
    """``nn.LayerNorm``: features are the ``normalized_shape`` entries; leading dimensions after the batch are
    positions."""

    module_types = (nn.LayerNorm,)

    def normalized_input(self, module: nn.Module, x: Tensor) -> Tensor:
        assert isinstance(module, nn.LayerNorm)
        return F.layer_norm(x, module.normalized_shape, eps=module.eps)

    def to_rows(self, module: nn.Module, t: Tensor) -> Tensor:
        assert isinstance(module, nn.LayerNorm)
        batched = t.ndim > len(module.normalized_shape)
        return t.reshape(t.shape[0] if batched else 1, -1, self.channels(module))


class BatchNormHelper(ScaleShiftHelper):
    """``nn.BatchNorm1d/2d/3d``: features are the channels (dim 1); length or spatial entries are positions."""

    module_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

    def normalized_input(self, module: nn.Module, x: Tensor) -> Tensor:
        assert isinstance(module, _BatchNorm)
        # The forward pass normalises with batch statistics in training and when no running statistics exist.
        if module.training or module.running_mean is None or module.running_var is None:
            return F.batch_norm(x, None, None, training=True, eps=module.eps)
        return F.batch_norm(x, module.running_mean, module.running_var, training=False, eps=module.eps)

    def to_rows(self, module: nn.Module, t: Tensor) -> Tensor:
        return t.reshape(t.shape[0], t.shape[1], -1).transpose(1, 2)


_NORM_ADAPTERS: tuple[ScaleShiftHelper, ...] = (LayerNormHelper(), BatchNormHelper())


def norm_helper_for(module: nn.Module) -> ScaleShiftHelper | None:
    """The scale/shift helper for a normalisation module, or ``None`` for any other module."""
    for helper in _NORM_ADAPTERS:
        if isinstance(module, helper.module_types):
            return helper
    return None
