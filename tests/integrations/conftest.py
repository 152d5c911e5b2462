"""Integration tests: kronfac inside the training loops people run (Hugging Face ``Trainer``, ``accelerate``,
PyTorch Lightning) on real models built from configs (nothing is downloaded).

Every test here is marked ``integration`` and runs in a plain ``pytest tests`` (select them with
``-m integration``). They are bounded: tiny models, a few steps, a few seconds each. accelerate keeps its state in
process-wide singletons (``Trainer`` creates an ``Accelerator`` too), so each test starts from a clean one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent

# Offline and quiet: configs only, no hub calls, no progress bars or advisory warnings in the test output.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.integration)


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state() -> Iterator[None]:
    _reset_accelerate()
    yield
    _reset_accelerate()


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: the models are tiny, and on a busy machine a thread pool costs more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
