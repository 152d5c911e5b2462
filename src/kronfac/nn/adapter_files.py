"""KronA adapter directories: :func:`save_adapters` and :func:`load_adapters`, all or nothing.

Format (``format_version`` ``"2"``): one directory per adapter (the adapter ``"default"`` in the directory given,
any other name in a subdirectory of that name, PEFT's layout) holding

- ``krona_config.json``: ``{"format_version": "2", "adapter_name", "base_model": {"class", "fingerprint"},
  "adapters": {module name: {"variant", "factors": [[m1, n1], [m2, n2]], "scale", "in_features",
  "out_features"}}, "modules_to_save": [module names]}``. The keys of ``adapters`` are the targets; ``class``
  is the base model's qualified class name and ``fingerprint`` a hash of its parameter names and shapes
  (:func:`~kronfac.nn.adapter_inject.base_fingerprint`), so a file meets only the architecture it was trained
  on. Other top-level keys are ignored.
- ``krona_model.safetensors``: ``<module>.kron_a`` ``(m1, n1)``, ``<module>.kron_b`` ``(m2, n2)`` and, for
  ``krona_block_res``, ``<module>.res_scale`` ``()``; for each module of ``modules_to_save``, its
  ``state_dict`` as ``<module>.<key>``.

:func:`load_adapters` checks everything before it changes the model, and refuses with a ``ValueError`` that
names the file, the module and the problem:

- the files: a directory with both files, readable JSON (no duplicate key) and safetensors;
- the config: every key, no unknown one in an entry, a known variant, integer shapes that multiply to the
  features, a finite non-zero scale; the base model's class and fingerprint (``check_base=False`` skips this);
- the tensors: exactly the expected ones, with their shapes, a floating-point dtype and finite values (a saved
  module's integer buffers keep their dtype);
- the fit with the model: each module exists in the base model, is not the model itself, does not nest with
  another adapted or saved module, and takes the file's variant and features; an adapter name the model has
  already must have exactly the file's modules, variants and shapes, unmerged;
- the values in the dtype they get (the module's): each tensor finite after the cast, and
  ``ΔW = s (A ⊗ B)`` finite on every input in ``[-1, 1]``, i.e. ``‖ΔW‖∞ = |s| ‖A‖∞ ‖B‖∞`` (largest absolute row
  sum) at most the dtype's largest value; beyond it the forward pass and merging produce inf and NaN.

The scale ``s`` must be non-zero: with ``s = 0``, ``ΔW`` and the gradients of ``A`` and ``B`` vanish, so the
adapter does nothing and can never train. A negative ``s`` is valid: ``s (A ⊗ B) = |s| ((-A) ⊗ B)``.
:func:`save_adapters` runs the same checks on what it is about to write, so it never writes a directory that
:func:`load_adapters` refuses, and replaces each file atomically.

Reference:
    A. Edalati et al., "KronA: Parameter efficient tuning with Kronecker adapter", arXiv:2212.10650 (2022).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kronfac.nn.adapter_inject import (
    adapter_features,
    apply_active,
    base_fingerprint,
    base_named_modules,
    make_adapter,
    new_host,
    new_saved,
    set_module,
)
from kronfac.nn.adapter_ops import adapter_names as names_of
from kronfac.nn.adapters import (
    VARIANTS,
    AdapterHost,
    AdapterReport,
    KronAdapter,
    adapter_hosts,
    adapter_report,
    check_scale,
    saved_modules,
)
from kronfac.nn.factorize import KronShape, check_shape

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "load_adapters", "save_adapters"]

CONFIG_FILE = "krona_config.json"
WEIGHTS_FILE = "krona_model.safetensors"
FORMAT_VERSION = "2"
CONFIG_KEYS = ("format_version", "adapter_name", "base_model", "adapters", "modules_to_save")
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


@dataclass(frozen=True, kw_only=True)
class AdapterFile:
    """A parsed adapter directory: the config's fields, its adapters and the saved modules' tensors."""

    adapter_name: str
    base_class: str
    fingerprint: str
    adapters: list[FileAdapter]
    saved: dict[str, dict[str, Tensor]]


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
        raise fail(f"missing key(s) {missing} in the config entry")
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        raise fail(f"unknown key(s) {unknown} in the config entry; expected {list(ENTRY_KEYS)}")
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
        _check_finite(where, adapter.name, f"{adapter.name}.{key}", tensor, dtype)
    # ‖A ⊗ B‖∞ = ‖A‖∞ ‖B‖∞ (largest absolute row sum), so this bounds s (A ⊗ B) x for every x in [-1, 1]^d_in.
    a_norm, b_norm = (float(adapter.tensors[key].double().abs().sum(dim=1).max()) for key in ("kron_a", "kron_b"))
    if abs(adapter.scale) * a_norm * b_norm > torch.finfo(dtype).max:
        raise _error(
            where,
            f"scale {adapter.scale:g} with ‖A‖∞ = {a_norm:.3g} and ‖B‖∞ = {b_norm:.3g} overflows {dtype}: "
            "ΔW = s (A ⊗ B) would map inputs in [-1, 1] to inf",
            adapter.name,
        )


def _check_finite(where: str, module: str, key: str, tensor: Tensor, dtype: torch.dtype) -> None:
    bad = int((~torch.isfinite(tensor.to(dtype))).sum())
    if bad:
        cast = "" if tensor.dtype == dtype else f" once cast to {dtype}"
        raise _error(where, f"tensor {key!r} has {bad} non-finite value(s) (NaN or inf){cast}", module)


def _parse_saved(where: str, names: object, tensors: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise _error(where, f"modules_to_save must be a list of module names, got {names!r}")
    if len(set(names)) != len(names):
        raise _error(where, f"modules_to_save lists a module twice: {names}")
    saved: dict[str, dict[str, Tensor]] = {}
    for name in names:
        if not name:
            raise _error(where, "an empty name in modules_to_save would replace the model itself", name)
        saved[name] = {k[len(name) + 1 :]: t for k, t in tensors.items() if k.startswith(name + ".")}
        if not saved[name]:
            raise _error(where, "modules_to_save lists it, but the file has no tensor of it", name)
    return saved


def parse_file(where: str, config: object, tensors: dict[str, Tensor]) -> AdapterFile:
    """Check a directory's config and tensors against the format (not yet against a model)."""
    if not isinstance(config, dict):
        raise _error(where, f"the config must be a JSON object, got {type(config).__name__}")
    missing = [key for key in CONFIG_KEYS if key not in config]
    if missing:
        raise _error(where, f"missing key(s) {missing} in {CONFIG_FILE}")
    if config["format_version"] != FORMAT_VERSION:
        raise _error(where, f"format_version is {config['format_version']!r}; this kronfac reads {FORMAT_VERSION!r}")
    name = config["adapter_name"]
    if not isinstance(name, str) or not name or "." in name:
        raise _error(where, f"adapter_name must be a non-empty string without '.', got {name!r}")
    base = config["base_model"]
    if not (isinstance(base, dict) and all(isinstance(base.get(k), str) for k in ("class", "fingerprint"))):
        raise _error(where, f"base_model must be an object with strings 'class' and 'fingerprint', got {base!r}")
    entries = config["adapters"]
    if not isinstance(entries, dict):
        raise _error(where, f"'adapters' must be a JSON object {{module: adapter}}, got {type(entries).__name__}")
    if not entries:
        raise _error(where, "'adapters' lists no adapters")
    adapters = [_parse_entry(where, module, entry, tensors) for module, entry in entries.items()]
    saved = _parse_saved(where, config["modules_to_save"], tensors)
    overlap = sorted(set(entries) & set(saved))
    if overlap:
        raise _error(where, "is both adapted and in modules_to_save", overlap[0])
    known = {f"{a.name}.{key}" for a in adapters for key in a.tensors}
    known |= {f"{m}.{key}" for m, own in saved.items() for key in own}
    for key in sorted(set(tensors) - known):
        module = key.rpartition(".")[0]
        if module in entries:
            extra = [k for k in tensors if k not in known and k.rpartition(".")[0] == module]
            own = sorted(k for k in known if k.rpartition(".")[0] == module)
            raise _error(where, f"unexpected tensor(s) {extra}; its adapter has only {own}", module)
        raise _error(where, f"tensor {key!r} belongs to no adapter or saved module of the config ({sorted(entries)})")
    return AdapterFile(
        adapter_name=name, base_class=base["class"], fingerprint=base["fingerprint"], adapters=adapters, saved=saved
    )


def _read(directory: Path) -> tuple[str, object, dict[str, Tensor]]:
    from safetensors import SafetensorError, safe_open

    where = f"Invalid adapter directory {os.fspath(directory)!r}"
    if not directory.is_dir():
        problem = "no such directory" if not directory.exists() else "is a file, not a directory"
        raise _error(where, f"{problem}; pass the directory written by save_adapters")
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file():
        inner = sorted(p.name for p in directory.iterdir() if (p / CONFIG_FILE).is_file())
        hint = f" (adapters in subdirectories: {inner}; pass one of them)" if inner else ""
        raise _error(where, f"no {CONFIG_FILE}{hint}")
    if not weights_path.is_file():
        raise _error(where, f"no {WEIGHTS_FILE}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, UnicodeDecodeError) as err:
        raise _error(where, f"{CONFIG_FILE} is not valid JSON: {err}") from err
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise _error(where, f"{WEIGHTS_FILE} is not a readable safetensors file ({err})") from err
    return where, config, tensors


def _class_name(model: nn.Module) -> str:
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_base(where: str, model: nn.Module, file: AdapterFile) -> None:
    if file.base_class != _class_name(model):
        raise _error(
            where,
            f"was trained on a {file.base_class}, the model is a {_class_name(model)} (check_base=False skips this)",
        )
    if file.fingerprint != base_fingerprint(model):
        raise _error(
            where,
            "the base model's parameter names and shapes differ from those it was trained on (fingerprint "
            f"{file.fingerprint}, model {base_fingerprint(model)}; check_base=False skips this)",
        )


def _check_fit(where: str, model: nn.Module, file: AdapterFile, name: str) -> dict[str, nn.Module]:
    """The base modules by name, once every adapter and saved module of the file fits the model."""
    walked = {n: (m, owner) for n, m, owner in base_named_modules(model)}
    hosts, saved = adapter_hosts(model), saved_modules(model)
    existing = {n for n, h in hosts.items() if name in h.adapters}
    in_file = [a.name for a in file.adapters]
    if existing or any(name in s.copies for s in saved.values()):
        merged = sorted(n for n in existing if name in hosts[n].merged_adapters)
        if merged:
            raise ValueError(f"Cannot load adapter {name!r} while it is merged in {merged}: call unmerge_adapters")
        for module in [*sorted(set(in_file) - existing), *sorted(existing - set(in_file))]:
            side = "the model has an adapter there, the file has not" if module in existing else "the model has none"
            raise _error(where, f"does not match the model's adapter {name!r}: {side}", module)
        for a in file.adapters:
            adapter = hosts[a.name].adapters[name]
            assert isinstance(adapter, KronAdapter)
            if (a.variant, a.factors) != (adapter.variant, adapter.factor_shapes):
                raise _error(
                    where,
                    f"does not match the model: file {a.variant} {a.factors}, model {adapter.variant} "
                    f"{adapter.factor_shapes}",
                    a.name,
                )
        have = {n for n, s in saved.items() if name in s.copies}
        if have != set(file.saved):
            raise _error(where, f"modules_to_save {sorted(file.saved)} differ from the model's {sorted(have)}")
    every = [*in_file, *file.saved]
    modules = {}
    for module in every:
        outer = [o for o in every if module.startswith(o + ".")]
        if outer:
            raise _error(where, f"lies inside module {outer[0]!r}, which the file also adapts or saves", module)
        if module not in walked:
            raise _error(where, "no such module in the model", module)
        base, owner = walked[module]
        if owner not in (None, module):
            raise _error(where, f"lies inside {owner!r}, which has adapters or is saved; they do not nest", module)
        inner = [o for o in [*hosts, *saved] if o.startswith(module + ".")]
        if inner:
            raise _error(where, f"contains {sorted(inner)}, which have adapters or are saved; they do not nest", module)
        modules[module] = base
    for a in file.adapters:
        try:
            features = adapter_features(a.name, modules[a.name], a.variant)
        except ValueError as err:
            raise _error(where, str(err), a.name) from err
        if features != (a.in_features, a.out_features):
            raise _error(
                where,
                f"the file's adapter maps {a.in_features} -> {a.out_features} features, but the module maps "
                f"{features[0]} -> {features[1]}",
                a.name,
            )
        host = hosts.get(a.name)
        if host is not None and host.variant_kind != ("krona" if a.variant == "krona" else "block"):
            raise _error(where, f"has {host.variant_kind} adapters; a {a.variant!r} adapter cannot join them", a.name)
        if a.name in saved:
            raise _error(where, "is in the model's modules_to_save, so it cannot also have adapters", a.name)
        ref = next(modules[a.name].parameters(), None)
        check_values(where, a, ref.dtype if ref is not None else torch.get_default_dtype())
    for module, tensors in file.saved.items():
        if module in hosts:
            raise _error(where, "has adapters in the model, so it cannot be in modules_to_save", module)
        _check_saved(where, module, modules[module], tensors)
    return modules


def _check_saved(where: str, name: str, module: nn.Module, tensors: dict[str, Tensor]) -> None:
    expected = module.state_dict()
    for key in sorted(set(expected) ^ set(tensors)):
        side = "missing" if key in expected else "unexpected"
        raise _error(where, f"{side} tensor '{name}.{key}' (the module's state_dict has {sorted(expected)})", name)
    for key, tensor in tensors.items():
        want = expected[key]
        if tuple(tensor.shape) != tuple(want.shape):
            raise _error(
                where, f"tensor '{name}.{key}' has shape {tuple(tensor.shape)}, expected {tuple(want.shape)}", name
            )
        if want.is_floating_point() != tensor.is_floating_point() or (
            not want.is_floating_point() and tensor.dtype != want.dtype
        ):
            raise _error(where, f"tensor '{name}.{key}' has dtype {tensor.dtype}, expected {want.dtype}", name)
        if want.is_floating_point():
            _check_finite(where, name, f"{name}.{key}", tensor, want.dtype)


def _contents(model: nn.Module, name: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    tensors: dict[str, Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    for module, host in adapter_hosts(model).items():
        if name not in host.adapters:
            continue
        adapter = host.adapters[name]
        assert isinstance(adapter, KronAdapter)
        tensors[f"{module}.kron_a"] = adapter.kron_a.weight
        tensors[f"{module}.kron_b"] = adapter.kron_b.weight
        if adapter.res_scale is not None:
            tensors[f"{module}.res_scale"] = adapter.res_scale
        entries[module] = {
            "variant": adapter.variant,
            "factors": [list(s) for s in adapter.factor_shapes],
            "scale": adapter.scale,
            "in_features": adapter.in_features,
            "out_features": adapter.out_features,
        }
    saved = [m for m, s in saved_modules(model).items() if name in s.copies]
    for module in saved:
        for key, value in saved_modules(model)[module].copies[name].state_dict().items():
            tensors[f"{module}.{key}"] = value
    config = {
        "format_version": FORMAT_VERSION,
        "adapter_name": name,
        "base_model": {"class": _class_name(model), "fingerprint": base_fingerprint(model)},
        "adapters": entries,
        "modules_to_save": saved,
    }
    return config, {k: t.detach().cpu().contiguous() for k, t in tensors.items()}


def _replace(path: Path, write: Any) -> None:
    """Write through a temporary file in the same directory, then rename it over ``path`` (atomic)."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save_adapters(
    model: nn.Module, directory: str | os.PathLike[str], *, adapter_names: Iterable[str] | None = None
) -> None:
    """Write adapters (nothing of the base model but the ``modules_to_save`` copies) and their configs.

    Args:
        model: A model with (unmerged) adapters.
        directory: Where to write: adapter ``"default"`` in it, any other in ``directory/<name>``.
        adapter_names: Which adapters (default: all).

    Raises:
        ValueError: If the model has no adapters, one is merged (unmerge first, so the file holds ``A``, ``B``
            consistent with an unmodified base), a name is unknown, or a file would be refused by
            :func:`load_adapters` (for example non-finite values after a diverged run); nothing is written then.
    """
    from safetensors.torch import save_file

    where = f"Cannot save adapters to {os.fspath(directory)!r}"
    known = names_of(model)
    if not adapter_hosts(model):
        raise ValueError(f"{where}: the model has no Kronecker adapters (call add_kron_adapters first)")
    names = known if adapter_names is None else list(adapter_names)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{where}: unknown adapter name(s) {unknown}; the model has {known}")
    if any(h.merged for h in adapter_hosts(model).values()):
        raise ValueError(f"{where}: cannot save adapters while merged: call unmerge_adapters(model) first")
    contents = {name: _contents(model, name) for name in names}
    for name, (config, tensors) in contents.items():
        parse_file(f"{where}: adapter {name!r}", config, tensors)
    for name, (config, tensors) in contents.items():
        target = Path(directory) if name == "default" else Path(directory) / name
        target.mkdir(parents=True, exist_ok=True)
        _replace(target / WEIGHTS_FILE, lambda p, t=tensors: save_file(t, str(p), metadata={"format": "pt"}))
        _replace(target / CONFIG_FILE, lambda p, c=config: p.write_text(json.dumps(c, indent=2) + "\n"))


def load_adapters(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    adapter_name: str | None = None,
    check_base: bool = True,
) -> AdapterReport:
    """Load an adapter saved by :func:`save_adapters` into ``model``, all or nothing.

    On a fresh copy of the base model the adapter is created from the config, the base frozen and the adapter
    active. If the model already has an adapter of this name, it must match the file exactly (same modules,
    variants, shapes, saved modules) and be unmerged; its values are overwritten. Another name is added beside
    the model's adapters, inactive until :func:`~kronfac.nn.set_adapter` (PEFT's ``load_adapter``).

    Args:
        model: The base model, possibly with adapters.
        directory: A directory written by :func:`save_adapters` (one adapter's).
        adapter_name: The name to load it as (default: the name it was saved with).
        check_base: Refuse a model whose class or parameter shapes differ from the base the adapter was
            trained on.

    Returns:
        The :class:`AdapterReport` after loading.

    Raises:
        ValueError: If the directory or its files are unreadable or invalid, or do not match the model; the
            message names the directory, the module and the problem, and the model is unchanged.
    """
    where, config, tensors = _read(Path(directory))
    file = parse_file(where, config, tensors)
    name = adapter_name if adapter_name is not None else file.adapter_name
    if not name or "." in name:
        raise ValueError(f"Invalid adapter_name: {name!r}; must be a non-empty string without '.'")
    if check_base:
        _check_base(where, model, file)
    modules = _check_fit(where, model, file, name)
    hosts, saved = adapter_hosts(model), saved_modules(model)
    fresh = not hosts and not saved
    created: list[tuple[str, AdapterHost | None, KronAdapter]] = []
    for a in file.adapters:
        host = hosts.get(a.name)
        adapter = host.adapters[name] if host is not None and name in host.adapters else None
        if adapter is None:
            adapter = make_adapter(a.name, modules[a.name], a.variant, a.factors, a.scale)
        assert isinstance(adapter, KronAdapter)
        created.append((a.name, host, adapter))
    copies = {}
    for module in file.saved:
        wrapper = saved.get(module)
        kept = wrapper.copies[name] if wrapper is not None and name in wrapper.copies else None
        copies[module] = kept if kept is not None else copy.deepcopy(modules[module])
    # Everything is checked: from here on nothing raises.
    with torch.no_grad():
        for a, (_, _, adapter) in zip(file.adapters, created):
            adapter.kron_a.weight.copy_(a.tensors["kron_a"])
            adapter.kron_b.weight.copy_(a.tensors["kron_b"])
            if adapter.res_scale is not None:
                adapter.res_scale.copy_(a.tensors["res_scale"])
            adapter.scale = a.scale
        for module, own in file.saved.items():
            copies[module].load_state_dict(own, strict=True)
    active = [name] if fresh else sorted({n for h in hosts.values() for n in h.active_adapters})
    if fresh:
        model.requires_grad_(False)
    disabled = any(h.disabled for h in hosts.values())
    for (module, host, adapter), a in zip(created, file.adapters):
        if host is None:
            host = new_host(modules[module], a.variant)
            host.disabled = disabled
            set_module(model, module, host)
        host.adapters[name] = adapter
    for module, module_copy in copies.items():
        wrapper = saved.get(module)
        if wrapper is None:
            wrapper = new_saved(modules[module])
            wrapper.disabled = disabled
            set_module(model, module, wrapper)
        wrapper.copies[name] = module_copy
    apply_active(model, active or [name])
    return adapter_report(model)
