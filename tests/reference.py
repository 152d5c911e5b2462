"""Dense references built with torch.func on tiny models (float64): exact Fisher/GGN blocks of one layer."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev


def weight_and_bias(module: nn.Module) -> tuple[str, str]:
    """Attribute names of a layer's weight and bias (MultiheadAttention: its packed in-projection)."""
    if isinstance(module, nn.MultiheadAttention):
        return "in_proj_weight", "in_proj_bias"
    return "weight", "bias"


def layer_param_names(model: nn.Module, layer: str) -> list[str]:
    module = model.get_submodule(layer)
    weight, bias = weight_and_bias(module)
    names = [f"{layer}.{weight}"]
    if getattr(module, bias, None) is not None:
        names.append(f"{layer}.{bias}")
    return names


def stores_transposed(module: nn.Module) -> bool:
    """Layers that store ``W`` as ``d_i x d_o``: Embedding (one row per token) and transformers' Conv1D."""
    return isinstance(module, nn.Embedding) or type(module).__name__ == "Conv1D"


def grad_matrix_from(module: nn.Module, grads: dict[str, Tensor], layer: str) -> Tensor:
    """The ``d_o x d_i`` gradient matrix (bias last column) from per-parameter tensors, as kronfac defines it."""
    weight_name, bias_name = weight_and_bias(module)
    weight = grads[f"{layer}.{weight_name}"]
    weight = weight.T if stores_transposed(module) else weight.flatten(1)
    bias = grads.get(f"{layer}.{bias_name}")
    return weight if bias is None else torch.cat([weight, bias.unsqueeze(1)], dim=1)


def empirical_fisher_block(model: nn.Module, layer: str, x: Tensor, loss_fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``vec(∇W) vec(∇W)^T`` (row-major vec) for the loss on one batch: with batch size 1 this is the block of
    the empirical Fisher."""
    params = dict(model.named_parameters())
    names = layer_param_names(model, layer)

    def loss_of(sub: dict[str, Tensor]) -> Tensor:
        return loss_fn(functional_call(model, {**params, **sub}, (x,)))

    grads = grad(loss_of)({n: params[n] for n in names})
    v = grad_matrix_from(model.get_submodule(layer), grads, layer).reshape(-1)
    return torch.outer(v, v)


def ggn_block_mse(model: nn.Module, layer: str, x: Tensor, normaliser: float) -> Tensor:
    """Exact GGN block of ``sum_rows sum_c (f(x) - t)^2 / normaliser`` w.r.t. the layer (Hessian of the loss
    w.r.t. the output is ``2 I / normaliser``)."""
    params = dict(model.named_parameters())
    names = layer_param_names(model, layer)
    module = model.get_submodule(layer)

    def out_of(sub: dict[str, Tensor]) -> Tensor:
        return functional_call(model, {**params, **sub}, (x,))

    jac = jacrev(out_of)({n: params[n] for n in names})
    out_dim = out_of({}).numel()
    flat = {n: j.reshape(out_dim, *params[n].shape) for n, j in jac.items()}
    rows = torch.stack(
        [grad_matrix_from(module, {n: flat[n][k] for n in names}, layer).reshape(-1) for k in range(out_dim)]
    )
    return 2.0 / normaliser * rows.T @ rows


def kron_block(a_factor: Tensor, g_factor: Tensor) -> Tensor:
    """``G ⊗ A`` (row-major vec), with a diagonal A given as a vector."""
    a = torch.diag(a_factor) if a_factor.ndim == 1 else a_factor
    return torch.kron(g_factor, a)


def factors_after_one_step(model: nn.Module, layer: str, x: Tensor, loss_fn: Callable[[Tensor], Tensor], **kwargs):
    """K-FAC's ``(A, G)`` of ``layer`` after one step on ``loss_fn(model(x))`` (float64 factors, no EMA history)."""
    import kronfac

    opt = kronfac.KFAC(model, lr=0.0, factor_dtype=torch.float64, kl_clip=None, **kwargs)
    loss_fn(model(x)).backward()
    opt.step()
    opt.close()
    block = opt.layers[layer].block
    return block.a_factor, block.g_factor
