"""Kronecker-structured modules, independent of the optimizers.

- :func:`kron_matvec`: ``y = (A ⊗ B) x`` without forming ``A ⊗ B``.
- :class:`KronLinear`, :class:`KronLSTM`, :class:`KronGRU`: layers with Kronecker-product weights (Thakker
  et al. 2019), and :func:`compress` to convert trained dense layers by the nearest Kronecker product.
- KronA adapters (Edalati et al. 2022): :func:`add_kron_adapters`, :func:`merge_adapters`,
  :func:`unmerge_adapters`, :func:`remove_adapters`, :func:`save_adapters`, :func:`load_adapters`.
"""

from kronfac.nn.adapter_files import load_adapters, save_adapters
from kronfac.nn.adapter_ops import merge_adapters, remove_adapters, unmerge_adapters
from kronfac.nn.adapters import (
    AdapterReport,
    KronABlock,
    KronAdapter,
    KronALinear,
    adapter_report,
    add_kron_adapters,
)
from kronfac.nn.compression import CompressionReport, LayerCompression, compress
from kronfac.nn.factorize import kron_shapes, nearest_kronecker
from kronfac.nn.kron import kron_cost, kron_matvec
from kronfac.nn.kron_linear import KronLinear
from kronfac.nn.rnn import KronGRU, KronLSTM, StructuredRNN

__all__ = [
    "AdapterReport",
    "CompressionReport",
    "KronABlock",
    "KronALinear",
    "KronAdapter",
    "KronGRU",
    "KronLSTM",
    "KronLinear",
    "LayerCompression",
    "StructuredRNN",
    "adapter_report",
    "add_kron_adapters",
    "compress",
    "kron_cost",
    "kron_matvec",
    "kron_shapes",
    "load_adapters",
    "merge_adapters",
    "nearest_kronecker",
    "remove_adapters",
    "save_adapters",
    "unmerge_adapters",
]
