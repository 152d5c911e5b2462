"""``nn.Embedding`` as a linear layer on one-hot inputs: ``W^T`` is ``d_o x d_i`` with ``d_i`` the vocabulary.

The input factor A = E[onehot onehot^T] is diagonal (normalised token counts) and is kept as a vector.
"""

from __future__ import annotations

from torch import Tensor, nn

from kronfac.layers.base import LayerHelper, UnsupportedModuleError, param_values, register_helper, require_grads

__all__ = ["EmbeddingHelper"]


class EmbeddingHelper(LayerHelper):
    """``nn.Embedding`` as a Linear on one-hot inputs, with a diagonal ``A`` kept as a vector."""

    module_types = (nn.Embedding,)
    diagonal_a = True

    def check(self, module: nn.Module) -> None:
        assert isinstance(module, nn.Embedding)
        if module.sparse:
            raise UnsupportedModuleError("Embedding with sparse=True is not supported (dense gradients only)")

    def dims(self, module: nn.Module) -> tuple[int, int]:
        assert isinstance(module, nn.Embedding)
        return module.num_embeddings, module.embedding_dim

    def input_rows(self, module: nn.Module, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0] if x.ndim > 1 else 1, -1)

    def output_grad_rows(self, module: nn.Module, grad_out: Tensor) -> Tensor:
        return grad_out.reshape(grad_out.shape[0] if grad_out.ndim > 2 else 1, -1, grad_out.shape[-1])

    def grad_matrix(self, module: nn.Module) -> Tensor:
        assert isinstance(module, nn.Embedding)
        return require_grads([module.weight])[0].T

    def split(self, module: nn.Module, matrix: Tensor) -> list[Tensor]:
        return [matrix.T]

    def param_matrix(self, module: nn.Module) -> Tensor:
        assert isinstance(module, nn.Embedding)
        return param_values([module.weight])[0].T


register_helper(EmbeddingHelper())
