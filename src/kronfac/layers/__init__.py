"""Layer adapters: one per supported module type (Linear, Conv2d, Embedding)."""

from kronfac.layers.base import LayerAdapter, UnsupportedModuleError, adapter_for, register_adapter
from kronfac.layers.conv2d import Conv2dAdapter
from kronfac.layers.embedding import EmbeddingAdapter
from kronfac.layers.linear import LinearAdapter

__all__ = [
    "Conv2dAdapter",
    "EmbeddingAdapter",
    "LayerAdapter",
    "LinearAdapter",
    "UnsupportedModuleError",
    "adapter_for",
    "register_adapter",
]
