"""kronfac's warning classes, and a ``warn`` whose location is the user's line, not a line inside kronfac.

Filter them as a group (``warnings.simplefilter("ignore", kronfac.KronfacWarning)``) or by message. What is
information rather than a warning (which ranks invert what, a fallback that costs only speed) goes to the
``logging`` module under the ``kronfac`` logger.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

__all__ = ["KronfacRuntimeWarning", "KronfacWarning", "warn"]

_PACKAGE = str(Path(__file__).resolve().parent)


class KronfacWarning(UserWarning):
    """A kronfac warning about the configuration (a layer trained first-order, a structure without a fast path)."""


class KronfacRuntimeWarning(KronfacWarning, RuntimeWarning):
    """A kronfac warning about what happened while training (a skipped step, a failed inversion kept back)."""


def warn(message: str, category: type[Warning] = KronfacWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside the kronfac package (the user's call)."""
    frame = sys._getframe(1)
    level = 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
