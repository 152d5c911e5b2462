"""Tests that need a CUDA device live in this folder, and only here: each one is marked ``cuda`` (select them with
``-m cuda``, leave them out with ``-m "not cuda"``) and skipped when ``torch.cuda.is_available()`` is False."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.cuda)
            item.add_marker(skip)
