"""Adding KronA adapters to a model: targets (names, regex, ``"all-linear"``), factor shapes, ``modules_to_save``.

Names are those of the base model: a module with adapters keeps its name (its base module is the host's
``base``), so targets, files and :func:`base_fingerprint` do not depend on which adapters are in place.

Reference:
    A. Edalati et al., "KronA: Parameter efficient tuning with Kronecker adapter", arXiv:2212.10650 (2022).
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from kronfac.nn.adapters import (
    VARIANTS,
    AdapterHost,
    AdapterReport,
    KronABlock,
    KronAdapter,
    KronALinear,
    ModulesToSave,
    Variant,
    adapter_hosts,
    adapter_report,
    check_scale,
    linear_layout,
    saved_modules,
)
from kronfac.nn.factorize import KronShape, check_shape, kron_shape_options

__all__ = [
    "ALL_LINEAR",
    "FactorSpec",
    "adapter_features",
    "add_kron_adapters",
    "apply_active",
    "base_fingerprint",
    "base_named_modules",
    "make_adapter",
    "new_host",
    "new_saved",
    "resolve_adapter_factors",
    "set_module",
]

#: ``target_modules="all-linear"``: every ``nn.Linear`` and transformers ``Conv1D`` except the output layer.
ALL_LINEAR = "all-linear"
#: ``None`` (most compact near-square split), ``k`` (``A`` is ``k x k``), or explicit ``((m1, n1), (m2, n2))``.
FactorSpec = int | KronShape | None
TargetSpec = str | Iterable[str]


def base_named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, str | None]]:
    """``(name, module, owner)`` for every module of the base model: a host stands for its ``base``, a
    :class:`ModulesToSave` for its ``original``; adapters and saved copies are skipped. ``owner`` is the name of
    the nearest enclosing host or saved module (the module's own name when it is one), else ``None``."""

    def walk(module: nn.Module, prefix: str, owner: str | None) -> Iterator[tuple[str, nn.Module, str | None]]:
        yield prefix, module, owner
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, AdapterHost):
                yield from walk(child.base, full, full)
            elif isinstance(child, ModulesToSave):
                yield from walk(child.original, full, full)
            else:
                yield from walk(child, full, owner)

    yield from walk(model, "", None)


def base_fingerprint(model: nn.Module) -> str:
    """A hash of the base model's parameter names and shapes (adapters and saved copies excluded): equal for
    every copy of the same architecture, whatever its weights, dtype or adapters."""
    shapes = [
        [f"{name}.{key}" if name else key, list(p.shape)]
        for name, module, _ in base_named_modules(model)
        for key, p in module.named_parameters(recurse=False)
    ]
    return "sha256:" + hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:32]


def _name_matches(name: str, target: str) -> bool:
    """A list entry matches a name that equals it, ends with ``"." + target`` (PEFT) or fits it as ``fnmatch``."""
    return name == target or name.endswith("." + target) or fnmatch.fnmatchcase(name, target)


def _linears(module: nn.Module) -> list[tuple[int, int, bool]]:
    return [layout for m in module.modules() if (layout := linear_layout(m)) is not None]


def adapter_features(name: str, module: nn.Module, variant: str) -> tuple[int, int]:
    """``(d_in, d_out)`` of an adapter of ``variant`` on ``model.<name>``, or ``ValueError`` if it cannot have one.

    ``"krona"`` needs a linear layer (``nn.Linear`` or transformers ``Conv1D``); block variants read the
    features from the module's first and last linear layer, and ``"krona_block_res"`` needs ``d_in = d_out``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"Invalid variant: {variant!r}; allowed: {VARIANTS}")
    if variant == "krona":
        layout = linear_layout(module)
        if layout is None:
            raise ValueError(
                f"Cannot add a 'krona' adapter to {name!r}: it is {type(module).__name__}, not nn.Linear or "
                "transformers' Conv1D; target linear layers, or use variant='krona_block' for whole blocks"
            )
        return layout[0], layout[1]
    linears = _linears(module)
    if not linears:
        raise ValueError(
            f"Cannot add a block adapter to {name!r} ({type(module).__name__}): no nn.Linear inside to "
            "infer the input and output features (first Linear's in_features, last Linear's out_features)"
        )
    d_in, d_out = linears[0][0], linears[-1][1]
    if variant == "krona_block_res" and d_in != d_out:
        raise ValueError(
            f"{name!r}: krona_block_res needs in == out features, got {d_in} -> {d_out}; use 'krona_block'"
        )
    return d_in, d_out


def _module_dtype(module: nn.Module) -> torch.dtype:
    ref = next(module.parameters(), None)
    return ref.dtype if ref is not None else torch.get_default_dtype()


def default_factors(out_features: int, in_features: int) -> KronShape:
    """Most compact split (fewest ``m1 n1 + m2 n2``), ties to the highest reachable rank, then larger ``A``."""
    options = kron_shape_options(out_features, in_features)
    if not options:
        raise ValueError(f"A ({out_features} x {in_features}) weight has no non-trivial Kronecker split")
    return min(options, key=lambda o: (o.params, -o.max_rank, -o.shape[0][0])).shape


def resolve_adapter_factors(name: str, out_features: int, in_features: int, spec: FactorSpec) -> KronShape:
    """Turn a :data:`FactorSpec` into shapes for one module, with errors naming the module."""
    try:
        if spec is None:
            return default_factors(out_features, in_features)
        if isinstance(spec, int):
            if spec < 1 or out_features % spec or in_features % spec:
                raise ValueError(
                    f"Invalid factors: {spec}; A = ({spec}, {spec}) needs {spec} to divide both "
                    f"out_features={out_features} and in_features={in_features}"
                )
            return (spec, spec), (out_features // spec, in_features // spec)
        return check_shape(out_features, in_features, spec)
    except ValueError as err:
        raise ValueError(f"{name!r}: {err}") from err


def _spec_for(name: str, factors: FactorSpec | Mapping[str, FactorSpec]) -> FactorSpec:
    if isinstance(factors, Mapping):
        for pattern, spec in factors.items():
            if _name_matches(name, pattern):
                return spec
        return None
    return factors


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at ``model.<name>`` (``name`` non-empty: the root cannot replace itself)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def make_adapter(name: str, module: nn.Module, variant: str, factors: KronShape, scale: float) -> KronAdapter:
    """A new adapter of the given variant and shapes for ``module`` (``model.<name>``), on the device and in the
    dtype of its first parameter, in its train/eval mode."""
    d_in, d_out = adapter_features(name, module, variant)
    ref = next(module.parameters(), None)
    kw: dict[str, Any] = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    try:
        adapter = KronAdapter(d_in, d_out, factors=factors, scale=scale, variant=variant, **kw)
    except ValueError as err:
        raise ValueError(f"{name!r}: {err}") from err
    return adapter.train(module.training)


def new_host(module: nn.Module, variant: str) -> AdapterHost:
    host: AdapterHost = KronALinear(module) if variant == "krona" else KronABlock(module)
    host.training = module.training  # train() would also reset the base's children
    host.adapters.train(module.training)
    return host


def new_saved(module: nn.Module) -> ModulesToSave:
    wrapper = ModulesToSave(module)
    wrapper.training = wrapper.copies.training = module.training
    return wrapper


def _output_layer(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    return out if isinstance(out, nn.Module) else None


def _resolve(names: list[str], spec: TargetSpec, what: str, linear_only: list[str] | None = None) -> list[str]:
    """The names a target or modules_to_save spec selects (outermost only), or ``ValueError``."""
    if isinstance(spec, str) and spec == ALL_LINEAR and linear_only is not None:
        return linear_only
    if isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as err:
            raise ValueError(f"Invalid {what}: {spec!r} is not a regular expression ({err})") from err
        found = [n for n in names if pattern.fullmatch(n)]
        if not found:
            raise ValueError(
                f"Invalid {what}: the regular expression {spec!r} matches no module name in full (a string is a "
                "regex, PEFT's rule; pass a list for exact or suffix names)"
            )
    else:
        entries = list(spec)
        if not entries:
            raise ValueError(f"Invalid {what}: empty")
        found = [n for n in names if any(_name_matches(n, t) for t in entries)]
        unmatched = [t for t in entries if not any(_name_matches(n, t) for n in found)]
        if unmatched:
            raise ValueError(f"Invalid {what}: {unmatched} match no module of the model")
    return [n for n in found if not any(n.startswith(o + ".") for o in found)]


def _check_place(name: str, owners: dict[str, str | None], hosts: set[str], saved: set[str], kind: str) -> None:
    """Refuse adapters or saved modules that would nest in (or around) other ones."""
    owner = owners[name]
    if owner is not None and owner != name:
        raise ValueError(f"{name!r} lies inside {owner!r}, which has adapters or is saved; they do not nest")
    inner = [other for other in hosts | saved if other.startswith(name + ".")] if name else []
    if inner:
        raise ValueError(f"{name!r} contains {sorted(inner)}, which have adapters or are saved; they do not nest")
    if kind == "save" and name in hosts:
        raise ValueError(f"{name!r} has adapters, so it cannot also be in modules_to_save")
    if kind == "adapter" and name in saved:
        raise ValueError(f"{name!r} is in modules_to_save, so it cannot also have adapters")


def apply_active(model: nn.Module, names: list[str]) -> None:
    """Make ``names`` the active adapters everywhere: hosts and saved modules use them, and exactly their
    parameters (and those of their saved copies) are trainable."""
    for host in adapter_hosts(model).values():
        host.active_adapters = [n for n in names if n in host.adapters]
        for key, adapter in host.adapters.items():
            adapter.requires_grad_(key in names)
    for saved in saved_modules(model).values():
        saved.active_adapters = [n for n in names if n in saved.copies]
        saved.original.requires_grad_(False)
        for key, module in saved.copies.items():
            module.requires_grad_(key in names)


def add_kron_adapters(
    model: nn.Module,
    *,
    target_modules: TargetSpec,
    factors: FactorSpec | Mapping[str, FactorSpec] = None,
    variant: Variant = "krona",
    scale: float = 1.0,
    adapter_name: str = "default",
    modules_to_save: Iterable[str] = (),
) -> AdapterReport:
    """Freeze ``model`` and add KronA adapters named ``adapter_name`` to the target modules, in place.

    The first adapter name added to a model is active; a further name is added inactive (frozen, unused) until
    :func:`~kronfac.nn.set_adapter` activates it, as in PEFT. Adding the same name again extends that adapter
    to more modules.

    Args:
        model: The pretrained model.
        target_modules: ``"all-linear"`` (every ``nn.Linear`` and transformers ``Conv1D`` except the model's
            output layer, ``get_output_embeddings()``, and ``modules_to_save``); a string, a regular expression
            that must match a module's full name; or a list of names, each matching a module whose name equals
            it, ends with ``"." + name`` (PEFT's rule) or fits it as an ``fnmatch`` pattern. ``"krona"`` needs
            linear layers; block variants take any module mapping ``(..., d_in) -> (..., d_out)`` (features
            read from its first and last linear layer).
        factors: Shapes of ``A`` and ``B``: ``None`` (most compact near-square split), ``k`` (``A`` is
            ``k x k``, ``B`` the rest), ``((m1, n1), (m2, n2))``, or a mapping from name pattern to one of these.
        variant: ``"krona"``, ``"krona_block"`` or ``"krona_block_res"`` (see ``kronfac.nn.adapters``).
        scale: ``s`` multiplying ``A ⊗ B``; a finite non-zero number (as for :class:`~kronfac.nn.KronAdapter`).
        adapter_name: The adapter's name (several per model, PEFT-style).
        modules_to_save: Names (list rule of ``target_modules``) of modules trained beside the adapter, e.g. a
            new head: each gets a trainable copy per adapter, saved by ``save_adapters``.

    Returns:
        The :class:`AdapterReport` (adapters, trainable and total parameters).

    Raises:
        ValueError: For an unknown variant, a target that matches nothing or has the wrong type, factors that
            do not fit, an invalid scale, a module that has an adapter of this name already, adapters or saved
            modules that would nest. The model is unchanged when this is raised.
    """
    if variant not in VARIANTS:
        raise ValueError(f"Invalid variant: {variant!r}; allowed: {VARIANTS}")
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"Invalid adapter_name: {adapter_name!r}; must be a non-empty string without '.'")
    walked = list(base_named_modules(model))
    modules = {name: module for name, module, _ in walked}
    owners = {name: owner for name, _, owner in walked}
    names = [name for name in modules if name]
    hosts, saved = adapter_hosts(model), saved_modules(model)
    save_spec = list(modules_to_save) if not isinstance(modules_to_save, str) else [modules_to_save]
    to_save = _resolve(names, save_spec, "modules_to_save") if save_spec else []
    linear: list[str] | None = None
    if isinstance(target_modules, str) and target_modules == ALL_LINEAR:
        if variant != "krona":
            raise ValueError(f"Invalid target_modules: 'all-linear' selects linear layers, not blocks ({variant!r})")
        output = _output_layer(model)
        linear = [
            n
            for n in names
            if linear_layout(modules[n]) is not None
            and modules[n] is not output
            and owners[n] in (None, n)
            and not any(n == s or n.startswith(s + ".") for s in [*to_save, *saved])
        ]
        if not linear:
            raise ValueError("Invalid target_modules: 'all-linear' finds no linear layer in the model")
    targets = _resolve(names, target_modules, "target_modules", linear)
    plan = []
    for name in targets:
        module = modules[name]
        _check_place(name, owners, set(hosts), set(saved), "adapter")
        host = hosts.get(name)
        if host is not None and adapter_name in host.adapters:
            raise ValueError(f"{name!r} already has an adapter {adapter_name!r}; pick another adapter_name")
        if host is not None and host.variant_kind != ("krona" if variant == "krona" else "block"):
            raise ValueError(f"{name!r} has {host.variant_kind} adapters; a {variant!r} adapter cannot join them")
        d_in, d_out = adapter_features(name, module, variant)
        try:
            check_scale(scale, _module_dtype(module))
        except ValueError as err:
            raise ValueError(f"{name!r}: {err}") from err
        shape = resolve_adapter_factors(name, d_out, d_in, _spec_for(name, factors))
        plan.append((name, module, make_adapter(name, module, variant, shape, scale)))
    planned = {name for name, _, _ in plan}
    for name in to_save:
        _check_place(name, owners, set(hosts) | planned, set(saved), "save")
        if name in saved and adapter_name in saved[name].copies:
            raise ValueError(f"{name!r} already keeps a copy for adapter {adapter_name!r}")
    active = sorted({n for h in hosts.values() for n in h.active_adapters}) if hosts or saved else [adapter_name]
    disabled = any(h.disabled for h in hosts.values())
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module, adapter in plan:
        host = hosts.get(name)
        if host is None:
            host = new_host(module, variant)
            host.disabled = disabled
            set_module(model, name, host)
        host.adapters[adapter_name] = adapter
    for name in to_save:
        wrapper = saved.get(name)
        if wrapper is None:
            wrapper = new_saved(modules[name])
            wrapper.disabled = disabled
            set_module(model, name, wrapper)
        wrapper.copies[adapter_name] = copy.deepcopy(wrapper.original)
    apply_active(model, active or [adapter_name])
    return adapter_report(model)
