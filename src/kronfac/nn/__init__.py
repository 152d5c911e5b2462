"""Kronecker-structured modules, independent of the optimizers.

- :func:`kron_matvec`: ``y = (A ⊗ B) x`` without forming ``A ⊗ B``.
- :class:`KronLinear`, :class:`KronLSTM`, :class:`KronGRU`: layers with Kronecker-product weights (Thakker et al.
  2019), and :func:`compress` to convert trained dense layers by the nearest Kronecker product.
- KronA adapters (Edalati et al. 2022), PEFT-style: :func:`add_kron_adapters` (targets by name, regex or
  ``"all-linear"``; named adapters; ``modules_to_save``), :func:`set_adapter`, :func:`disable_adapters`,
  :func:`enable_adapters`, :func:`adapters_disabled`, :func:`delete_adapter`, :func:`merge_adapters`,
  :func:`unmerge_adapters`, :func:`merge_and_unload`, :func:`remove_adapters`, :func:`save_adapters`,
  :func:`load_adapters`.
"""

from kronfac.nn.adapter_files import load_adapters, save_adapters
from kronfac.nn.adapter_inject import add_kron_adapters, base_fingerprint
from kronfac.nn.adapter_ops import (
    active_adapters,
    adapter_names,
    adapters_disabled,
    delete_adapter,
    disable_adapters,
    enable_adapters,
    merge_adapters,
    merge_and_unload,
    remove_adapters,
    set_adapter,
    unmerge_adapters,
)
from kronfac.nn.adapters import (
    AdapterReport,
    KronABlock,
    KronAdapter,
    KronALinear,
    KronFactor,
    ModulesToSave,
    adapter_hosts,
    adapter_report,
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
    "KronFactor",
    "KronGRU",
    "KronLSTM",
    "KronLinear",
    "LayerCompression",
    "ModulesToSave",
    "StructuredRNN",
    "active_adapters",
    "adapter_hosts",
    "adapter_names",
    "adapter_report",
    "adapters_disabled",
    "add_kron_adapters",
    "base_fingerprint",
    "compress",
    "delete_adapter",
    "disable_adapters",
    "enable_adapters",
    "kron_cost",
    "kron_matvec",
    "kron_shapes",
    "load_adapters",
    "merge_adapters",
    "merge_and_unload",
    "nearest_kronecker",
    "remove_adapters",
    "save_adapters",
    "set_adapter",
    "unmerge_adapters",
]
