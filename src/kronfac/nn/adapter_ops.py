"""Operations on KronA adapters after training: merge, unmerge, remove, save and load (safetensors).

Only ``"krona"`` adapters merge: ``W <- W + s (A ⊗ B)``; block variants sit parallel to a nonlinear block, so
there is no weight to fold them into. Files hold the adapter tensors only (keys ``<module>.kron_a``,
``<module>.kron_b``, ``<module>.res_scale``) plus, in the safetensors metadata, each adapter's variant, shapes
and scale, so :func:`load_adapters` can re-create the adapters on a fresh copy of the base model.

Reference:
    A. Edalati et al., "KronA: Parameter efficient tuning with Kronecker adapter", arXiv:2212.10650 (2022).
"""

from __future__ import annotations

import json
import os

import torch
from torch import Tensor, nn

from kronfac.nn.adapters import (
    AdapterReport,
    KronABlock,
    KronALinear,
    adapter_modules,
    adapter_report,
    wrap_module,
)

__all__ = ["load_adapters", "merge_adapters", "remove_adapters", "save_adapters", "unmerge_adapters"]

_METADATA_KEY = "kronfac_adapters"
_FORMAT_VERSION = "1"


def _wrappers_or_raise(model: nn.Module, action: str) -> dict[str, KronALinear | KronABlock]:
    wrappers = adapter_modules(model)
    if not wrappers:
        raise ValueError(f"Cannot {action}: the model has no Kronecker adapters (call add_kron_adapters first)")
    return wrappers


def _check_mergeable(wrappers: dict[str, KronALinear | KronABlock], action: str) -> None:
    blocks = {n: w.variant for n, w in wrappers.items() if isinstance(w, KronABlock)}
    if blocks:
        raise ValueError(
            f"Cannot {action}: adapters {blocks} sit parallel to whole (nonlinear) blocks, so there is no "
            "weight to fold them into; only variant='krona' adapters on nn.Linear layers can be merged"
        )


def merge_adapters(model: nn.Module) -> None:
    """Fold every KronA adapter into its base weight: ``W <- W + s (A ⊗ B)``; forward then skips the adapter.

    Already merged adapters are left alone. Raises ``ValueError`` (changing nothing) if any adapter is a block
    variant or there are no adapters.
    """
    wrappers = _wrappers_or_raise(model, "merge")
    _check_mergeable(wrappers, "merge")
    for w in wrappers.values():
        assert isinstance(w, KronALinear)
        w.merge()


def unmerge_adapters(model: nn.Module) -> None:
    """Undo :func:`merge_adapters`: ``W <- W - s (A ⊗ B)`` (exact up to floating-point rounding)."""
    wrappers = _wrappers_or_raise(model, "unmerge")
    _check_mergeable(wrappers, "unmerge")
    for w in wrappers.values():
        assert isinstance(w, KronALinear)
        w.unmerge()


def remove_adapters(model: nn.Module, *, merge: bool = False) -> None:
    """Put the base modules back in place of the wrappers, merging ``krona`` adapters first if ``merge``.

    Parameters keep their ``requires_grad`` flags (the base stays frozen).
    """
    wrappers = _wrappers_or_raise(model, "remove adapters")
    if merge:
        _check_mergeable(wrappers, "merge")
    for name, w in wrappers.items():
        if isinstance(w, KronALinear):
            if merge:
                w.merge()
            elif w.merged:
                w.unmerge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, w.base)


def _adapter_tensors(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, dict]]:
    tensors: dict[str, Tensor] = {}
    config: dict[str, dict] = {}
    for name, w in adapter_modules(model).items():
        for key, value in w.adapter.state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().cpu().contiguous()
        config[name] = {
            "variant": w.variant,
            "factors": [list(s) for s in w.adapter.factor_shapes],
            "scale": w.adapter.scale,
            "in_features": w.adapter.in_features,
            "out_features": w.adapter.out_features,
        }
    return tensors, config


def save_adapters(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write the adapter weights (nothing of the base model) and their configuration to a safetensors file.

    Raises:
        ValueError: If the model has no adapters or they are merged (unmerge first, so the file holds
            ``A``, ``B``
            consistent with an unmodified base).
    """
    from safetensors.torch import save_file

    wrappers = _wrappers_or_raise(model, "save adapters")
    if any(w.merged for w in wrappers.values()):
        raise ValueError("Cannot save adapters while merged: call unmerge_adapters(model) first")
    tensors, config = _adapter_tensors(model)
    metadata = {_METADATA_KEY: json.dumps(config), "format_version": _FORMAT_VERSION}
    save_file(tensors, os.fspath(path), metadata=metadata)


def load_adapters(model: nn.Module, path: str | os.PathLike[str]) -> AdapterReport:
    """Load adapters saved by :func:`save_adapters` into ``model``.

    If ``model`` has no adapters yet (a fresh copy of the base model), they are created from the file's
    metadata
    and the base is frozen; otherwise the existing adapters must match the file exactly (same modules,
    variants
    and shapes) and must not be merged.

    Returns:
        The :class:`AdapterReport` after loading.

    Raises:
        ValueError: If the file is not a kronfac adapter file or does not match the model.
    """
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if _METADATA_KEY not in metadata:
        raise ValueError(f"Invalid adapter file {os.fspath(path)!r}: no {_METADATA_KEY!r} metadata")
    config: dict[str, dict] = json.loads(metadata[_METADATA_KEY])
    existing = adapter_modules(model)
    if not existing:
        for p in model.parameters():
            p.requires_grad_(False)
        for name, c in config.items():
            (m1, n1), (m2, n2) = c["factors"]
            try:
                wrap_module(model, name, c["variant"], ((m1, n1), (m2, n2)), float(c["scale"]))
            except AttributeError as err:
                raise ValueError(f"Invalid adapter file: module {name!r} is not in the model") from err
        existing = adapter_modules(model)
    else:
        if sorted(existing) != sorted(config):
            raise ValueError(
                f"Adapter file does not match the model: file has {sorted(config)}, model has {sorted(existing)}"
            )
        for name, w in existing.items():
            if w.merged:
                raise ValueError("Cannot load adapters while merged: call unmerge_adapters(model) first")
            c = config[name]
            shapes = tuple(tuple(s) for s in c["factors"])
            if c["variant"] != w.variant or shapes != w.adapter.factor_shapes:
                raise ValueError(
                    f"Adapter file does not match {name!r}: file {c['variant']} {shapes}, "
                    f"model {w.variant} {w.adapter.factor_shapes}"
                )
    with torch.no_grad():
        for name, w in existing.items():
            prefix = name + "."
            state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            w.adapter.load_state_dict(state, strict=True)
            w.adapter.scale = float(config[name]["scale"])
            for p in w.adapter.parameters():
                p.requires_grad_(True)
    return adapter_report(model)
