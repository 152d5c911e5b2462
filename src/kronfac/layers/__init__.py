"""Layer helpers: one per supported module type (Linear, Conv2d, Embedding, transformers' Conv1D)."""

from kronfac.layers.base import LayerHelper, UnsupportedModuleError, helper_for, register_helper
from kronfac.layers.conv1d import Conv1DHelper
from kronfac.layers.conv2d import Conv2dHelper
from kronfac.layers.embedding import EmbeddingHelper
from kronfac.layers.linear import LinearHelper

__all__ = [
    "Conv1DHelper",
    "Conv2dHelper",
    "EmbeddingHelper",
    "LayerHelper",
    "LinearHelper",
    "UnsupportedModuleError",
    "helper_for",
    "register_helper",
]
