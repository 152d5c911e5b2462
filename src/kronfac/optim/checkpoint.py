"""How a kronfac optimizer's curvature state travels inside a standard ``torch.optim`` state_dict.

``torch.distributed.checkpoint`` (``get_optimizer_state_dict`` / ``set_optimizer_state_dict``) keeps only the
``state`` and ``param_groups`` of an optimizer state_dict, so the curvature state (factors, inverses, step
counters, the sampler's generator, a correction's state) rides in the per-parameter state of the optimizer's
first parameter, under :data:`KEY`, as one serialized blob (``torch.save`` bytes, read back with
``weights_only=True``). One opaque leaf keeps the layout the same before and after the first curvature step,
which DCP needs: it loads into the structure of a freshly built optimizer's state_dict.

The blob carries the optimizer's class and each layer's block type and shape, so a state from another optimizer
or another model is refused with a ``ValueError`` naming the layer and what differs.
"""

from __future__ import annotations

import io
from typing import Any

import torch

__all__ = ["KEY", "check_compatible", "decode", "encode"]

#: The per-parameter state key of the curvature blob.
KEY = "kronfac"


def encode(curvature: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(curvature, buffer)
    return buffer.getvalue()


def decode(blob: Any) -> dict[str, Any]:
    if isinstance(blob, dict):  # already structured (a state_dict written before the blob format)
        return blob
    if not isinstance(blob, (bytes, bytearray)):
        raise ValueError(f"state_dict: the {KEY!r} entry is a {type(blob).__name__}, not a kronfac curvature blob")
    try:
        state = torch.load(io.BytesIO(bytes(blob)), weights_only=True)
    except Exception as exc:  # a corrupted or foreign blob: name it instead of a pickle traceback
        raise ValueError(f"state_dict: the {KEY!r} entry cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or "layers" not in state:
        raise ValueError(f"state_dict: the {KEY!r} entry is not a kronfac curvature state")
    return state


def check_compatible(saved: dict[str, Any], optimizer: str, signatures: dict[str, str]) -> None:
    """Raise ``ValueError`` unless ``saved`` (a decoded blob) was written by ``optimizer`` for layers with these
    signatures (``name -> "BlockType d_in x d_out"``)."""
    theirs = saved.get("optimizer")
    if theirs is not None and theirs != optimizer:
        raise ValueError(f"state_dict was saved by {theirs}, not {optimizer}: its curvature state does not apply")
    layers = saved["layers"]
    missing, extra = sorted(set(signatures) - set(layers)), sorted(set(layers) - set(signatures))
    if missing or extra:
        raise ValueError(f"state_dict's layers differ from the model's: missing {missing}, not in the model {extra}")
    for name, signature in signatures.items():
        saved_signature = saved.get("signatures", {}).get(name)
        if saved_signature is not None and saved_signature != signature:
            raise ValueError(f"state_dict: layer {name!r} was saved as {saved_signature}, the model has {signature}")
