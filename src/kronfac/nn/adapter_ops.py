"""Operations on a model's KronA adapters: which are active, disabling them, merging and unloading
(adding: :mod:`kronfac.nn.adapter_inject`; files: :mod:`kronfac.nn.adapter_files`).

Only ``"krona"`` adapters merge: ``W <- W + s (A ⊗ B)`` (``Conv1D``: ``W <- W + s (A ⊗ B)ᵀ``); block variants
sit parallel to a nonlinear block, so there is no weight to fold them into. :func:`merge_and_unload` returns the
plain base model (its own module classes and state_dict keys, so ``save_pretrained`` / ``from_pretrained``
round-trip it), with the merged weights and the active adapter's copies of ``modules_to_save``.

Reference:
    A. Edalati et al., "KronA: Parameter efficient tuning with Kronecker adapter", arXiv:2212.10650 (2022).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import nn

from kronfac.nn.adapter_inject import apply_active, set_module
from kronfac.nn.adapters import AdapterHost, KronALinear, adapter_hosts, saved_modules

__all__ = [
    "active_adapters",
    "adapter_names",
    "adapters_disabled",
    "delete_adapter",
    "disable_adapters",
    "enable_adapters",
    "merge_adapters",
    "merge_and_unload",
    "remove_adapters",
    "set_adapter",
    "unmerge_adapters",
]


def _hosts_or_raise(model: nn.Module, action: str) -> dict[str, AdapterHost]:
    hosts = adapter_hosts(model)
    if not hosts:
        raise ValueError(f"Cannot {action}: the model has no Kronecker adapters (call add_kron_adapters first)")
    return hosts


def _names(model: nn.Module, active: bool) -> list[str]:
    names: dict[str, None] = {}
    for host in adapter_hosts(model).values():
        names.update(dict.fromkeys(host.active_adapters if active else host.adapters))
    for saved in saved_modules(model).values():
        names.update(dict.fromkeys(saved.active_adapters if active else saved.copies))
    return list(names)


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter name in the model, in order of first appearance."""
    return _names(model, active=False)


def active_adapters(model: nn.Module) -> list[str]:
    """The names of the active adapters (also while disabled: they are used again by :func:`enable_adapters`)."""
    return _names(model, active=True)


def _merged(model: nn.Module) -> dict[str, list[str]]:
    return {name: list(host.merged_adapters) for name, host in adapter_hosts(model).items() if host.merged}


def set_adapter(model: nn.Module, adapter_name: str | Iterable[str]) -> None:
    """Activate the named adapter(s): they are used in the forward and are the only trainable adapter
    parameters (with their copies of ``modules_to_save``); the others are frozen and unused, as in PEFT.

    Raises:
        ValueError: For a name the model does not have, or while adapters are merged (unmerge first).
    """
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"Invalid adapter_name: {unknown or names}; the model has adapters {known}")
    merged = _merged(model)
    if merged:
        raise ValueError(f"Cannot change the active adapters while {merged} are merged: call unmerge_adapters first")
    for saved in saved_modules(model).values():
        copies = [n for n in names if n in saved.copies]
        if len(copies) > 1:
            raise ValueError(f"Cannot activate {copies} together: each keeps its own copy of a saved module")
    apply_active(model, names)


def _set_disabled(model: nn.Module, disabled: bool, action: str) -> None:
    hosts = _hosts_or_raise(model, action)
    merged = _merged(model)
    if disabled and merged:
        raise ValueError(f"Cannot disable adapters while {merged} are merged into the weights: unmerge first")
    for host in hosts.values():
        host.disabled = disabled
    for saved in saved_modules(model).values():
        saved.disabled = disabled


def disable_adapters(model: nn.Module) -> None:
    """Run the base model alone (the adapters and saved copies stay in place, unused) until
    :func:`enable_adapters`; parameters keep their ``requires_grad`` flags."""
    _set_disabled(model, True, "disable adapters")


def enable_adapters(model: nn.Module) -> None:
    """Undo :func:`disable_adapters`: the active adapters are used again."""
    _set_disabled(model, False, "enable adapters")


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """``with adapters_disabled(model):`` runs the base model alone (PEFT's ``disable_adapter()``), then restores
    each host's previous state."""
    hosts, saved = list(adapter_hosts(model).values()), list(saved_modules(model).values())
    before = [m.disabled for m in [*hosts, *saved]]
    disable_adapters(model)
    try:
        yield model
    finally:
        for module, state in zip([*hosts, *saved], before):
            module.disabled = state


def _linear_hosts(model: nn.Module, names: list[str], action: str) -> list[KronALinear]:
    hosts = _hosts_or_raise(model, action)
    blocks = {n: sorted(set(h.adapters) & set(names)) for n, h in hosts.items() if not isinstance(h, KronALinear)}
    blocks = {n: a for n, a in blocks.items() if a}
    if blocks:
        raise ValueError(
            f"Cannot {action}: adapters {blocks} sit parallel to whole (nonlinear) blocks, so there is no "
            "weight to fold them into; only variant='krona' adapters on linear layers can be merged"
        )
    return [h for h in hosts.values() if isinstance(h, KronALinear)]


def merge_adapters(model: nn.Module, adapter_names: Iterable[str] | None = None) -> None:
    """Fold adapters (default: the active ones) into their base weights, ``W <- W + s (A ⊗ B)``; the forward
    then skips them. Already merged adapters are left alone. Raises ``ValueError`` (changing nothing) for block
    variants, disabled adapters, or a model without adapters."""
    names = list(adapter_names) if adapter_names is not None else active_adapters(model)
    hosts = _linear_hosts(model, names, "merge")
    if any(h.disabled for h in hosts):
        raise ValueError("Cannot merge while adapters are disabled: call enable_adapters first")
    for host in hosts:
        for name in names:
            if name in host.adapters:
                host.merge(name)


def unmerge_adapters(model: nn.Module) -> None:
    """Undo :func:`merge_adapters` for every merged adapter: ``W <- W - s (A ⊗ B)`` (exact up to rounding)."""
    hosts = _linear_hosts(model, [n for h in adapter_hosts(model).values() for n in h.merged_adapters], "unmerge")
    for host in hosts:
        for name in list(host.merged_adapters):
            host.unmerge(name)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove one named adapter (and its saved copies); hosts left without adapters give way to their base.
    Raises ``ValueError`` for an unknown name or a merged adapter."""
    if adapter_name not in adapter_names(model):
        raise ValueError(f"Invalid adapter_name: {adapter_name!r}; the model has adapters {adapter_names(model)}")
    merged = {n: m for n, m in _merged(model).items() if adapter_name in m}
    if merged:
        raise ValueError(f"Cannot delete adapter {adapter_name!r}: merged in {sorted(merged)}; unmerge first")
    active = [n for n in active_adapters(model) if n != adapter_name]
    for name, host in adapter_hosts(model).items():
        if adapter_name in host.adapters:
            del host.adapters[adapter_name]
        if not host.adapters:
            set_module(model, name, host.base)
    for name, saved in saved_modules(model).items():
        if adapter_name in saved.copies:
            del saved.copies[adapter_name]
        if not saved.copies:
            set_module(model, name, saved.original)
    remaining = adapter_names(model)
    if remaining:
        apply_active(model, active or remaining[:1])


def remove_adapters(model: nn.Module, *, merge: bool = False) -> nn.Module:
    """Put the base modules back in place of every host and saved module; returns ``model``.

    With ``merge``, the active ``krona`` adapters are merged first and a saved module becomes the active
    adapter's copy (:func:`merge_and_unload`); without, the weights are restored (merged adapters unmerged)
    and saved modules become their originals. Parameters keep their ``requires_grad`` flags.
    """
    hosts = adapter_hosts(model)
    if not hosts and not saved_modules(model):
        raise ValueError("Cannot remove adapters: the model has no Kronecker adapters (call add_kron_adapters first)")
    if merge and hosts:
        merge_adapters(model)
    elif not merge:
        for host in hosts.values():
            if isinstance(host, KronALinear):
                for name in list(host.merged_adapters):
                    host.unmerge(name)
    for name, host in hosts.items():
        set_module(model, name, host.base)
    for name, saved in saved_modules(model).items():
        set_module(model, name, saved.active_module() if merge else saved.original)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters into the base weights and return the plain base model (PEFT's
    ``merge_and_unload``): hosts replaced by their base modules, ``modules_to_save`` by the active adapter's
    copy. The result has the base model's module classes and ``state_dict`` keys, so ``save_pretrained`` /
    ``from_pretrained`` round-trip it exactly. Raises ``ValueError`` (changing nothing) for active block
    variants, which cannot be merged (:func:`remove_adapters` drops them)."""
    return remove_adapters(model, merge=True)
