"""Operations on KronA adapters after training: merge, unmerge and remove (files: :mod:`kronfac.nn.adapter_files`).

Only ``"krona"`` adapters merge: ``W <- W + s (A ⊗ B)``; block variants sit parallel to a nonlinear block, so
there is no weight to fold them into.

Reference:
    A. Edalati et al., "KronA: Parameter efficient tuning with Kronecker adapter", arXiv:2212.10650 (2022).
"""

from __future__ import annotations

from torch import nn

from kronfac.nn.adapters import KronABlock, KronALinear, adapter_modules, set_module

__all__ = ["merge_adapters", "remove_adapters", "unmerge_adapters"]


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
        set_module(model, name, w.base)
