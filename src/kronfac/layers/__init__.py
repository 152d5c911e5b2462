"""Layer helpers, one per module type: Linear, Conv2d, Embedding, Conv1D (transformers), MultiheadAttention, the
factors of KronA adapters."""

from kronfac.layers.attention import MultiheadAttentionHelper
from kronfac.layers.base import (
    CallHelper,
    CallRows,
    LayerHelper,
    RecordedCall,
    UnsupportedModuleError,
    helper_for,
    register_helper,
)
from kronfac.layers.conv1d import Conv1DHelper
from kronfac.layers.conv2d import Conv2dHelper
from kronfac.layers.embedding import EmbeddingHelper
from kronfac.layers.krona import KronFactorHelper
from kronfac.layers.linear import LinearHelper

__all__ = [
    "CallHelper",
    "CallRows",
    "Conv1DHelper",
    "Conv2dHelper",
    "EmbeddingHelper",
    "KronFactorHelper",
    "LayerHelper",
    "LinearHelper",
    "MultiheadAttentionHelper",
    "RecordedCall",
    "UnsupportedModuleError",
    "helper_for",
    "register_helper",
]
