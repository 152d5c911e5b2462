"""How a kronfac optimizer's curvature state travels inside a standard ``torch.optim`` state_dict.

``torch.distributed.checkpoint`` (``get_optimizer_state_dict`` / ``set_optimizer_state_dict``) keeps only the
``state`` and ``param_groups`` of an optimizer state_dict, so the curvature state (factors, inverses, step
counters, the sampler's generator, a correction's state) rides in the per-parameter state of the optimizer's
first parameter, under :data:`KEY`, as one serialized blob (``torch.save`` bytes, read back with
``weights_only=True``). One opaque leaf keeps the layout the same before and after the first curvature step,
which DCP needs: it loads into the structure of a freshly built optimizer's state_dict.

The blob carries the optimizer's class and each layer's block type and shape, so a state from another optimizer
or another model is refused with a ``ValueError`` naming the layer and what differs.

``torch.load``'s ``map_location`` never reaches inside the blob, so :func:`decode` reads it onto the CPU and the
optimizer moves each layer's part to that layer's device (:func:`to_device`), as ``torch.optim`` casts each
parameter's state to its parameter: a checkpoint written on a GPU resumes on a CPU-only machine, and every
data-parallel rank gets its curvature on its own device, not on the saving rank's.
"""

from __future__ import annotations

import io
from typing import Any

import torch

__all__ = ["KEY", "check_compatible", "decode", "encode", "to_device"]

#: The per-parameter state key of the curvature blob.
KEY = "kronfac"


def encode(curvature: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(curvature, buffer)
    return buffer.getvalue()


def decode(blob: Any) -> dict[str, Any]:
    """The curvature state of a blob, its tensors on the CPU whatever device wrote them."""
    if isinstance(blob, dict):  # already structured (a state_dict written before the blob format)
        return blob
    if not isinstance(blob, (bytes, bytearray)):
        raise ValueError(f"state_dict: the {KEY!r} entry is a {type(blob).__name__}, not a kronfac curvature blob")
    try:
        state = torch.load(io.BytesIO(bytes(blob)), map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupted or foreign blob: name it instead of a pickle traceback
        raise ValueError(f"state_dict: the {KEY!r} entry cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or "layers" not in state:
        raise ValueError(f"state_dict: the {KEY!r} entry is not a kronfac curvature state")
    return state


def to_device(tree: Any, device: torch.device) -> Any:
    """``tree`` (nested dicts, lists and tuples, as a decoded blob holds them) with every tensor on ``device``."""
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        return {key: to_device(value, device) for key, value in tree.items()}
    if isinstance(tree, list):
        return [to_device(value, device) for value in tree]
    if isinstance(tree, tuple):
        return tuple(to_device(value, device) for value in tree)
    return tree


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
