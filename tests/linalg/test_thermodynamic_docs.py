"""Run every ```python block of docs/thermodynamic.md, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "thermodynamic.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def test_doc_examples_run(capsys: pytest.CaptureFixture[str]) -> None:
    blocks = _blocks()
    assert len(blocks) >= 3
    namespace: dict[str, object] = {"__name__": "thermodynamic_doc"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{DOC.name}[block {i}]", "exec"), namespace)
        except Exception as err:  # pragma: no cover - the message is the point
            raise AssertionError(f"docs/thermodynamic.md block {i} failed: {err!r}\n{block}") from err
    out = capsys.readouterr().out
    assert "inverse mode: relative error" in out and "crossover width" in out and "thermodynamic (8-bit)" in out
