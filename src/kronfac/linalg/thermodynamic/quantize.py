"""Per-tensor uniform quantization of the values a digital host sends to, or reads from, an analog solver.

Donatella et al. 2025 ("Scalable Thermodynamic Second-order Optimization") study how K-FAC degrades when the
Kronecker factors are loaded onto the device (input quantization) and the results are read back (output
quantization) at ``b`` bits. We model a symmetric mid-tread quantizer with one per-tensor scale
``m = max |x|`` (so zero stays exactly representable and a symmetric matrix stays symmetric):

* ``b >= 2``: levels ``k Δ`` for integers ``|k| <= L = 2^(b-1) - 1``, ``Δ = m / L``; error at most ``Δ / 2``.
* ``b = 1``: sign only, ``m · sign(x)``; error at most ``m``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_bits", "quantization_error_bound", "quantize"]


def check_bits(bits: int | None, name: str = "bits") -> None:
    """Raise ``ValueError`` unless ``bits`` is ``None`` (no quantization) or an integer >= 1."""
    if bits is None:
        return
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
        raise ValueError(f"Invalid {name}: {bits!r} (must be an integer >= 1, or None for no quantization)")


def quantization_error_bound(max_abs: float, bits: int) -> float:
    """Largest possible ``|x - quantize(x, bits)|`` entry for a tensor whose largest magnitude is ``max_abs``."""
    check_bits(bits)
    if bits == 1:
        return max_abs
    return max_abs / (2 * (2 ** (bits - 1) - 1))


def quantize(values: Tensor, bits: int | None) -> Tensor:
    """Quantize ``values`` to ``bits`` bits with one scale for the whole tensor (``None``: return unchanged).

    Args:
        values: any floating tensor.
        bits: number of bits including the sign, >= 1; ``None`` disables quantization.

    Returns:
        A tensor of the same shape and dtype holding the dequantized values.

    Raises:
        ValueError: if ``bits`` is not ``None`` and not an integer >= 1.
    """
    check_bits(bits)
    if bits is None or values.numel() == 0:
        return values
    max_abs = values.abs().max()
    if not bool(max_abs > 0):
        return values.clone()
    if bits == 1:
        return max_abs * torch.sign(values)
    levels = 2 ** (bits - 1) - 1
    step = max_abs / levels
    return torch.clamp(torch.round(values / step), -levels, levels) * step
