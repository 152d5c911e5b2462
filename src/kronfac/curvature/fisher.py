"""Fisher types and the output-gradient samples they back-propagate.

* ``empirical``: the gradient of the user's own loss (labels from the data).
* ``mc``: Monte-Carlo Fisher, labels sampled from the model's predictive distribution (Martens & Grosse 2015).
* ``type2``: the exact GGN/Fisher through the columns of the loss Hessian's square root (one backward pass per
  output feature; for tests and small models).

Losses are per output row (the last dimension holds the classes / regression targets):
``cross_entropy`` is ``-log softmax(y)[t]`` and ``mse`` is ``sum_c (y_c - t_c)^2`` (Hessian ``2 I``), summed over
rows and divided by the row count chosen by ``loss_average``.
"""

from __future__ import annotations

import math
from enum import Enum

import torch
from torch import Tensor

__all__ = ["FisherType", "LossAverage", "LossType", "sampled_output_grads"]


class FisherType(str, Enum):
    """Which output gradients build ``G``: ``"empirical"``, ``"mc"`` or ``"type2"``.

    ``empirical``: the gradient of the user's own loss; ``mc``: of labels sampled from the model's predictive
    distribution (Martens & Grosse 2015); ``type2``: the exact GGN/Fisher, one backward pass per output feature
    (for tests and small models).
    """

    EMPIRICAL = "empirical"
    MC = "mc"
    TYPE2 = "type2"


class LossType(str, Enum):
    """The loss ``mc`` and ``type2`` differentiate: ``"cross_entropy"`` or ``"mse"`` (per output row)."""

    CROSS_ENTROPY = "cross_entropy"
    MSE = "mse"


class LossAverage(str, Enum):
    """Which rows the loss is averaged over (``None``/``"sum"``: summed)."""

    SUM = "sum"
    BATCH = "batch"
    BATCH_SEQUENCE = "batch+sequence"


def sampled_output_grads(
    output: Tensor, fisher_type: FisherType, loss: LossType, samples: int, generator: torch.Generator
) -> list[Tensor]:
    """Gradients of the summed loss w.r.t. ``output`` whose outer products average (MC) or sum (type2) to the
    Fisher of the output distribution. Returns ``samples`` tensors (MC) or ``C`` tensors (type2)."""
    out = output.detach().to(torch.promote_types(output.dtype, torch.float32))
    classes = out.shape[-1]
    if loss is LossType.MSE:
        if fisher_type is FisherType.MC:
            return [
                math.sqrt(2.0) * torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype)
                for _ in range(samples)
            ]
        eye = torch.eye(classes, device=out.device, dtype=out.dtype) * math.sqrt(2.0)
        return [eye[c].expand_as(out) for c in range(classes)]
    probs = torch.softmax(out, dim=-1)
    if fisher_type is FisherType.MC:
        flat = probs.reshape(-1, classes)
        grads = []
        for _ in range(samples):
            labels = torch.multinomial(flat, 1, generator=generator).squeeze(1)
            onehot = torch.nn.functional.one_hot(labels, classes).to(out.dtype)
            grads.append((flat - onehot).reshape(out.shape))
        return grads
    # type2: columns of S with S S^T = diag(p) - p p^T, S[:, c] = sqrt(p_c) (e_c - p).
    root = probs.sqrt()
    columns = []
    for c in range(classes):
        e_c = torch.zeros_like(probs)
        e_c[..., c] = 1.0
        columns.append(root[..., c : c + 1] * (e_c - probs))
    return columns
