"""``nn.MultiheadAttention``: its packed in-projection ``[q; k; v] = W_in x + b_in`` (``W_in`` is ``3E x E``) as one
layer, and the statistics of its ``out_proj``.

Neither projection is reachable by the usual hooks: torch's forward passes ``in_proj_weight`` and
``out_proj.weight`` to ``F.multi_head_attention_forward`` (or, without autograd, to the fused fast-path kernel),
so ``out_proj``'s own forward never runs, and the gradient w.r.t. ``[q; k; v]`` is internal to the call. The
capture therefore records each call (inputs, masks, the RNG state when dropout is active) and, given the gradient
of the attention output in the backward pass, recomputes the call locally from detached inputs: the projections
become leaves, the attention core is torch's own ``F.multi_head_attention_forward`` with identity projections
(so every mask, ``bias_k``/``bias_v``, ``add_zero_attn`` and dropout option behaves exactly as in the forward;
dropout replays the recorded RNG state), and one ``torch.autograd.grad`` gives the per-position gradients
``g = ∂L/∂[q; k; v]`` and the context rows that are ``out_proj``'s input. This costs one more attention forward
and backward per layer on curvature steps only.

Self-attention only (``query is key is value``): then ``W_in`` maps one input and ``G ⊗ A`` with ``A = E[x xᵀ]``
and ``G = E[g gᵀ]`` (``3E x 3E``) is K-FAC for it. With cross-attention the three slices of ``W_in`` see
different inputs, which one input factor cannot represent: the in-projection is then not fed (it keeps
first-order updates, warned once) while ``out_proj`` still gets its statistics. The attention weights, the
second output, are not followed back (a loss that uses them adds gradient paths the statistics miss).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kronfac.layers.base import CallHelper, CallRows, RecordedCall, UnsupportedModuleError, register_helper
from kronfac.layers.linear import LinearHelper

__all__ = ["MultiheadAttentionHelper"]

_FORWARD = inspect.signature(nn.MultiheadAttention.forward)
_CROSS_ATTENTION = (
    "cross-attention (query, key and value are not one tensor): the slices of the packed in_proj see different "
    "inputs, which one Kronecker factor A cannot represent, so in_proj gets first-order updates (out_proj keeps "
    "its statistics)"
)


@dataclass
class _Call:
    query: Tensor
    key: Tensor
    value: Tensor
    options: dict[str, Any]
    rng: tuple[Tensor, Tensor | None] | None
    #: ``(projections leaf, context)`` kept between the backward passes of a sampled Fisher.
    graph: tuple[Tensor, Tensor] | None = None


def _batch_first(module: nn.MultiheadAttention, t: Tensor) -> Tensor:
    """A tensor in the layout of the module's arguments and output as ``(N, L, ·)``."""
    if t.ndim == 2:
        return t.unsqueeze(0)  # unbatched: one sequence
    return t if module.batch_first else t.transpose(0, 1)


def _sequence_first(module: nn.MultiheadAttention, t: Tensor) -> Tensor:
    """A tensor in the layout of the module's arguments as ``F.multi_head_attention_forward`` takes it."""
    return t.transpose(0, 1) if module.batch_first and t.ndim == 3 else t


def _from_sequence_first(t: Tensor) -> Tensor:
    """``F.multi_head_attention_forward``'s layout ``(L, N, ·)`` (or unbatched ``(L, ·)``) as ``(N, L, ·)``."""
    return t.unsqueeze(0) if t.ndim == 2 else t.transpose(0, 1)


@contextmanager
def _replayed_rng(rng: tuple[Tensor, Tensor | None] | None, device: torch.device) -> Iterator[None]:
    """Run with the RNG state recorded before the forward (the same dropout masks), restoring the current one."""
    if rng is None:
        yield
        return
    cpu, cuda = rng
    with torch.random.fork_rng(devices=[device] if cuda is not None else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


class MultiheadAttentionHelper(CallHelper, LinearHelper):
    """The in-projection of ``nn.MultiheadAttention`` (``d_i = E (+1)``, ``d_o = 3E``); feeds ``out_proj``."""

    module_types = (nn.MultiheadAttention,)
    fed_submodules = ("out_proj",)

    def check(self, module: nn.Module) -> None:
        assert isinstance(module, nn.MultiheadAttention)
        if not module._qkv_same_embed_dim:
            raise UnsupportedModuleError(
                "MultiheadAttention with kdim/vdim different from embed_dim (separate q/k/v projection weights) "
                "is not supported"
            )

    def params(self, module: nn.Module) -> list[nn.Parameter]:
        assert isinstance(module, nn.MultiheadAttention)
        weight, bias = module.in_proj_weight, module.in_proj_bias
        return [weight] if bias is None else [weight, bias]

    def has_bias(self, module: nn.Module) -> bool:
        return getattr(module, "in_proj_bias", None) is not None

    def dims(self, module: nn.Module) -> tuple[int, int]:
        assert isinstance(module, nn.MultiheadAttention)
        return module.embed_dim + self.has_bias(module), 3 * module.embed_dim

    def before_call(self, module: nn.Module) -> tuple[Tensor, Tensor | None] | None:
        assert isinstance(module, nn.MultiheadAttention)
        if not (module.training and module.dropout > 0):
            return None
        device = module.in_proj_weight.device
        return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def record_call(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], before: Any
    ) -> RecordedCall:
        assert isinstance(module, nn.MultiheadAttention)
        bound = _FORWARD.bind(module, *args, **kwargs)
        bound.apply_defaults()
        options = dict(bound.arguments)
        query, key, value = (options.pop(name) for name in ("query", "key", "value"))
        del options["self"]
        # The recomputation runs in the parameters' precision (an autocast forward sees bf16 inputs).
        dtype = module.in_proj_weight.dtype
        for name in ("attn_mask", "key_padding_mask"):
            mask = options[name]
            if isinstance(mask, Tensor) and mask.is_floating_point():
                options[name] = mask.detach().to(dtype)
        q, k, v = (x.detach().to(dtype) for x in (query, key, value))
        call = _Call(q, k, v, options, before)
        if query is key and key is value:
            return RecordedCall(call, inputs={"": _batch_first(module, call.query)})
        return RecordedCall(call, skipped=_CROSS_ATTENTION)

    def call_rows(self, module: nn.Module, call: RecordedCall, grad_out: Tensor, *, keep_graph: bool) -> CallRows:
        assert isinstance(module, nn.MultiheadAttention)
        state: _Call = call.state
        out_grad = _sequence_first(module, grad_out)
        if call.skipped is not None:
            with torch.no_grad():
                context = self._context(module, state, *self._projections(module, state))
            return CallRows({"out_proj": _from_sequence_first(context)}, {"out_proj": _batch_first(module, grad_out)})
        graph = state.graph
        if graph is None:
            with torch.enable_grad():
                packed = F.linear(state.query, module.in_proj_weight.detach(), self._bias(module))
                packed.requires_grad_(True)
                graph = packed, self._context(module, state, *packed.chunk(3, dim=-1))
        packed, context = graph
        state.graph = graph if keep_graph else None
        context_grad = out_grad.to(context.dtype) @ module.out_proj.weight.detach().to(context.dtype)
        (packed_grad,) = torch.autograd.grad(context, packed, context_grad, retain_graph=keep_graph)
        return CallRows(
            {"out_proj": _from_sequence_first(context.detach())},
            {"": _batch_first(module, packed_grad), "out_proj": _batch_first(module, grad_out)},
        )

    def _bias(self, module: nn.MultiheadAttention) -> Tensor | None:
        return None if module.in_proj_bias is None else module.in_proj_bias.detach()

    def _projections(self, module: nn.MultiheadAttention, state: _Call) -> tuple[Tensor, Tensor, Tensor]:
        weights = module.in_proj_weight.detach().chunk(3)
        bias = self._bias(module)
        biases = (None, None, None) if bias is None else bias.chunk(3)
        inputs = (state.query, state.key, state.value)
        q, k, v = (F.linear(x, w, b) for x, w, b in zip(inputs, weights, biases))
        return q, k, v

    def _context(self, module: nn.MultiheadAttention, state: _Call, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The attention output before ``out_proj`` from projected ``q, k, v`` (sequence-first), by torch's own
        attention with identity projections, replaying the recorded dropout."""
        q, k, v = (_sequence_first(module, t) for t in (q, k, v))
        eye = torch.eye(module.embed_dim, dtype=q.dtype, device=q.device)
        options = state.options
        with _replayed_rng(state.rng, q.device):
            context, _ = F.multi_head_attention_forward(
                q,
                k,
                v,
                module.embed_dim,
                module.num_heads,
                None,
                None,
                None if module.bias_k is None else module.bias_k.detach(),
                None if module.bias_v is None else module.bias_v.detach(),
                module.add_zero_attn,
                module.dropout,
                eye,
                None,
                training=module.training,
                key_padding_mask=options["key_padding_mask"],
                need_weights=options["need_weights"],
                attn_mask=options["attn_mask"],
                use_separate_proj_weight=True,
                q_proj_weight=eye,
                k_proj_weight=eye,
                v_proj_weight=eye,
                average_attn_weights=options["average_attn_weights"],
                is_causal=options["is_causal"],
            )
        return context


register_helper(MultiheadAttentionHelper())
