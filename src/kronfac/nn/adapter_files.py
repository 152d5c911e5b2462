"""KronA adapter files: :func:`save_adapters` and :func:`load_adapters`, all or nothing.

Format (``format_version`` ``"1"``): a safetensors file with the adapter tensors only, keyed ``<module>.kron_a``
``(m1, n1)``, ``<module>.kron_b`` ``(m2, n2)`` and, for ``krona_block_res``, ``<module>.res_scale`` ``()``; its
metadata holds ``format_version`` and ``kronfac_adapters``, a JSON object ``{module name: {"variant",
"factors": [[m1, n1], [m2, n2]], "scale", "in_features", "out_features"}}``, so that :func:`load_adapters` can
re-create the adapters on a fresh copy of the base model.

:func:`load_adapters` checks the whole file before it changes the model, and refuses with a ``ValueError`` that
names the file, the module and the problem:

- the metadata: every key, no unknown one, no duplicate module, a known variant, integer shapes that multiply
  to the features;
- the tensors: exactly the expected ones, with their shapes, a floating-point dtype and finite values;
- the fit with the model: each module exists, is not the model itself (an empty name), does not lie inside
  another module of the file, and takes the file's variant and features (on a model that has adapters already:
  they are the file's);
- the values in the dtype the adapter gets (the module's): each tensor finite after the cast, and
  ``ΔW = s (A ⊗ B)`` finite on every input in ``[-1, 1]``, i.e. ``‖ΔW‖∞ = |s| ‖A‖∞ ‖B‖∞`` (largest absolute row
  sum) at most the dtype's largest value; beyond it the forward pass and merging produce inf and NaN.

The scale ``s`` must be non-zero: with ``s = 0``, ``ΔW`` and the gradients of ``A`` and ``B`` vanish, so the
adapter does nothing and can never train. A negative ``s`` is valid: ``s (A ⊗ B) = |s| ((-A) ⊗ B)``.
:func:`save_adapters` runs the same file checks on what it is about to write, so it never writes a file that
:func:`load_adapters` refuses.

Reference:
    A. Edalati et al., "KronA: Parameter efficient tuning with Kronecker adapter", arXiv:2212.10650 (2022).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kronfac.nn.adapters import (
    VARIANTS,
    AdapterReport,
    AdapterWrapper,
    adapter_dtype,
    adapter_features,
    adapter_modules,
    adapter_report,
    check_scale,
    make_wrapper,
    set_module,
)
from kronfac.nn.factorize import KronShape, check_shape

__all__ = ["load_adapters", "save_adapters"]

METADATA_KEY = "kronfac_adapters"
VERSION_KEY = "format_version"
FORMAT_VERSION = "1"
ENTRY_KEYS = ("variant", "factors", "scale", "in_features", "out_features")


@dataclass(frozen=True, kw_only=True)
class FileAdapter:
    """One adapter of a file, checked against the schema: its entry and its tensors (by parameter name)."""

    name: str
    variant: str
    factors: KronShape
    scale: float
    in_features: int
    out_features: int
    tensors: dict[str, Tensor]


def _error(where: str, problem: str, module: str | None = None) -> ValueError:
    return ValueError(f"{where}: {problem}" if module is None else f"{where}: module {module!r}: {problem}")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"duplicate key(s) {duplicates}")
    return dict(pairs)


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _factors(value: object) -> KronShape | None:
    if not (isinstance(value, list) and len(value) == 2):
        return None
    if not all(isinstance(pair, list) and len(pair) == 2 and all(map(_positive_int, pair)) for pair in value):
        return None
    (m1, n1), (m2, n2) = value
    return (m1, n1), (m2, n2)


def _own_tensors(
    where: str, name: str, variant: str, factors: KronShape, tensors: dict[str, Tensor]
) -> dict[str, Tensor]:
    """The tensors of adapter ``name`` (by parameter name), once each is present with its shape and a float dtype."""
    shapes: dict[str, tuple[int, ...]] = {"kron_a": factors[0], "kron_b": factors[1]}
    if variant == "krona_block_res":
        shapes["res_scale"] = ()
    absent = [f"{name}.{key}" for key in shapes if f"{name}.{key}" not in tensors]
    if absent:
        raise _error(where, f"missing tensor(s) {absent}", name)
    own = {key: tensors[f"{name}.{key}"] for key in shapes}
    for key, shape in shapes.items():
        tensor = own[key]
        if tuple(tensor.shape) != shape:
            raise _error(where, f"tensor '{name}.{key}' has shape {tuple(tensor.shape)}, expected {shape}", name)
        if not tensor.is_floating_point():
            raise _error(
                where, f"tensor '{name}.{key}' has dtype {tensor.dtype}, expected a floating-point dtype", name
            )
    return own


def _parse_entry(where: str, name: str, entry: object, tensors: dict[str, Tensor]) -> FileAdapter:
    def fail(problem: str) -> ValueError:
        return _error(where, problem, name)

    if not name:
        raise fail("an empty module name would wrap the model itself (and make it contain itself)")
    if not isinstance(entry, dict):
        raise fail(f"the entry must be a JSON object with keys {list(ENTRY_KEYS)}, got {type(entry).__name__}")
    missing = [key for key in ENTRY_KEYS if key not in entry]
    if missing:
        raise fail(f"missing key(s) {missing} in the metadata entry")
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        raise fail(f"unknown key(s) {unknown} in the metadata entry; expected {list(ENTRY_KEYS)}")
    variant = entry["variant"]
    if not isinstance(variant, str) or variant not in VARIANTS:
        raise fail(f"unknown variant {variant!r}; allowed: {VARIANTS}")
    factors = _factors(entry["factors"])
    if factors is None:
        raise fail(f"factors must be [[m1, n1], [m2, n2]] of positive integers, got {entry['factors']!r}")
    for key in ("in_features", "out_features"):
        if not _positive_int(entry[key]):
            raise fail(f"{key} must be a positive integer, got {entry[key]!r}")
    in_features, out_features = entry["in_features"], entry["out_features"]
    try:
        check_shape(out_features, in_features, factors)
        scale = check_scale(entry["scale"])
    except ValueError as err:
        raise fail(str(err)) from err
    if variant == "krona_block_res" and in_features != out_features:
        raise fail(f"krona_block_res needs in == out features, got {in_features} -> {out_features}")
    own = _own_tensors(where, name, variant, factors, tensors)
    adapter = FileAdapter(
        name=name,
        variant=variant,
        factors=factors,
        scale=scale,
        in_features=in_features,
        out_features=out_features,
        tensors=own,
    )
    check_values(where, adapter, own["kron_a"].dtype)
    return adapter


def check_values(where: str, adapter: FileAdapter, dtype: torch.dtype) -> None:
    """Refuse values that are not finite in ``dtype``: a tensor after the cast, the scale, or ``s (A ⊗ B)``."""
    try:
        check_scale(adapter.scale, dtype)
    except ValueError as err:
        raise _error(where, str(err), adapter.name) from err
    for key, tensor in adapter.tensors.items():
        bad = int((~torch.isfinite(tensor.to(dtype))).sum())
        if bad:
            cast = "" if tensor.dtype == dtype else f" once cast to {dtype}"
            raise _error(
                where, f"tensor '{adapter.name}.{key}' has {bad} non-finite value(s) (NaN or inf){cast}", adapter.name
            )
    # ‖A ⊗ B‖∞ = ‖A‖∞ ‖B‖∞ (largest absolute row sum), so this bounds s (A ⊗ B) x for every x in [-1, 1]^d_in.
    a_norm, b_norm = (float(adapter.tensors[key].double().abs().sum(dim=1).max()) for key in ("kron_a", "kron_b"))
    if abs(adapter.scale) * a_norm * b_norm > torch.finfo(dtype).max:
        raise _error(
            where,
            f"scale {adapter.scale:g} with ‖A‖∞ = {a_norm:.3g} and ‖B‖∞ = {b_norm:.3g} overflows {dtype}: "
            "ΔW = s (A ⊗ B) would map inputs in [-1, 1] to inf",
            adapter.name,
        )


def parse_file(where: str, metadata: dict[str, str], tensors: dict[str, Tensor]) -> list[FileAdapter]:
    """Check a file's metadata and tensors against the format (not yet against a model)."""
    if METADATA_KEY not in metadata:
        raise _error(where, f"no {METADATA_KEY!r} metadata (not written by kronfac.nn.save_adapters)")
    if VERSION_KEY not in metadata:
        raise _error(where, f"no {VERSION_KEY!r} metadata (this kronfac reads format {FORMAT_VERSION!r})")
    if metadata[VERSION_KEY] != FORMAT_VERSION:
        raise _error(where, f"{VERSION_KEY} is {metadata[VERSION_KEY]!r}; this kronfac reads {FORMAT_VERSION!r}")
    try:
        config = json.loads(metadata[METADATA_KEY], object_pairs_hook=_unique_keys)
    except ValueError as err:
        raise _error(where, f"metadata {METADATA_KEY!r} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        kind = type(config).__name__
        raise _error(where, f"metadata {METADATA_KEY!r} must be a JSON object {{module: adapter}}, got {kind}")
    if not config:
        raise _error(where, f"metadata {METADATA_KEY!r} lists no adapters")
    adapters = [_parse_entry(where, name, entry, tensors) for name, entry in config.items()]
    known = {f"{a.name}.{key}" for a in adapters for key in a.tensors}
    unknown = sorted(set(tensors) - known)
    for key in unknown:
        module = key.rpartition(".")[0]
        if module in config:
            extra = [k for k in unknown if k.rpartition(".")[0] == module]
            own = sorted(k for k in known if k.rpartition(".")[0] == module)
            raise _error(where, f"unexpected tensor(s) {extra}; its adapter has only {own}", module)
        raise _error(where, f"tensor {key!r} belongs to no adapter listed in the metadata ({sorted(config)})")
    return adapters


def _read(path: str) -> tuple[dict[str, str], dict[str, Tensor]]:
    from safetensors import SafetensorError, safe_open

    where = f"Invalid adapter file {path!r}"
    if os.path.isdir(path):
        raise _error(where, "is a directory; pass the .safetensors file written by save_adapters")
    if not os.path.exists(path):
        raise _error(where, "no such file")
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {}), {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise _error(where, f"not a readable safetensors file ({err})") from err


def _check_fresh(where: str, model: nn.Module, adapters: list[FileAdapter]) -> list[nn.Module]:
    """The modules to wrap, one per adapter, once each fits the file."""
    names = [a.name for a in adapters]
    modules = []
    for a in adapters:
        outer = [other for other in names if a.name.startswith(other + ".")]
        if outer:
            raise _error(where, f"lies inside module {outer[0]!r}, which the file also adapts", a.name)
        try:
            module = model.get_submodule(a.name)
            features = adapter_features(a.name, module, a.variant)
        except AttributeError as err:
            raise _error(where, f"no such module in the model ({err})", a.name) from err
        except ValueError as err:
            raise _error(where, str(err), a.name) from err
        if features != (a.in_features, a.out_features):
            raise _error(
                where,
                f"the file's adapter maps {a.in_features} -> {a.out_features} features, but the module maps "
                f"{features[0]} -> {features[1]}",
                a.name,
            )
        check_values(where, a, adapter_dtype(module))
        modules.append(module)
    return modules


def _check_existing(where: str, existing: dict[str, AdapterWrapper], adapters: list[FileAdapter]) -> None:
    merged = [name for name, w in existing.items() if w.merged]
    if merged:
        raise ValueError(f"Cannot load adapters while {merged} are merged: call unmerge_adapters(model) first")
    in_file = {a.name for a in adapters}
    for a in adapters:
        if a.name not in existing:
            raise _error(where, f"does not match the model, which has no adapter there ({sorted(existing)})", a.name)
    for name in existing:
        if name not in in_file:
            raise _error(where, "does not match the model: the model has an adapter there, the file has not", name)
    for a in adapters:
        w = existing[a.name]
        if (a.variant, a.factors) != (w.variant, w.adapter.factor_shapes):
            raise _error(
                where,
                f"does not match the model: file {a.variant} {a.factors}, model {w.variant} {w.adapter.factor_shapes}",
                a.name,
            )
        check_values(where, a, w.adapter.kron_a.dtype)


def _file_contents(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    tensors: dict[str, Tensor] = {}
    config: dict[str, dict[str, Any]] = {}
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
    return tensors, {METADATA_KEY: json.dumps(config), VERSION_KEY: FORMAT_VERSION}


def save_adapters(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write the adapter weights (nothing of the base model) and their configuration to a safetensors file.

    Args:
        model: A model with (unmerged) adapters.
        path: The file to write.

    Raises:
        ValueError: If the model has no adapters, they are merged (unmerge first, so the file holds ``A``, ``B``
            consistent with an unmodified base), or the file would be refused by :func:`load_adapters` (for
            example non-finite adapter values after a diverged run); nothing is written then.
    """
    from safetensors.torch import save_file

    where = f"Cannot save adapters to {os.fspath(path)!r}"
    wrappers = adapter_modules(model)
    if not wrappers:
        raise ValueError(f"{where}: the model has no Kronecker adapters (call add_kron_adapters first)")
    if any(w.merged for w in wrappers.values()):
        raise ValueError(f"{where}: cannot save adapters while merged: call unmerge_adapters(model) first")
    tensors, metadata = _file_contents(model)
    parse_file(where, metadata, tensors)
    save_file(tensors, os.fspath(path), metadata=metadata)


def load_adapters(model: nn.Module, path: str | os.PathLike[str]) -> AdapterReport:
    """Load adapters saved by :func:`save_adapters` into ``model``, all or nothing.

    If ``model`` has no adapters yet (a fresh copy of the base model), they are created from the file's metadata
    and the base is frozen; otherwise the existing adapters must match the file exactly (same modules, variants
    and shapes) and must not be merged. The whole file is checked (see the module docstring) before the model is
    changed.

    Args:
        model: The base model, or the model with the adapters to overwrite.
        path: A file written by :func:`save_adapters`.

    Returns:
        The :class:`AdapterReport` after loading.

    Raises:
        ValueError: If the path is not a readable file, the file is not a valid kronfac adapter file, or it does
            not match the model; the message names the file, the module and the problem, and the model is
            unchanged.
    """
    where = f"Invalid adapter file {os.fspath(path)!r}"
    adapters = parse_file(where, *_read(os.fspath(path)))
    existing = adapter_modules(model)
    if existing:
        _check_existing(where, existing, adapters)
        wrappers = [existing[a.name] for a in adapters]
    else:
        modules = _check_fresh(where, model, adapters)
        wrappers = [make_wrapper(a.name, m, a.variant, a.factors, a.scale) for a, m in zip(adapters, modules)]
    with torch.no_grad():
        for a, w in zip(adapters, wrappers):
            w.adapter.load_state_dict(a.tensors, strict=True)
    if not existing:
        for p in model.parameters():
            p.requires_grad_(False)
        for a, w in zip(adapters, wrappers):
            set_module(model, a.name, w)
    for a, w in zip(adapters, wrappers):
        w.adapter.scale = a.scale
        for p in w.adapter.parameters():
            p.requires_grad_(True)
    return adapter_report(model)
