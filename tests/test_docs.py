"""Every python block of docs/kfac.md and the README runs as written (other docs have their own doc tests)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "docs" / "kfac.md", ROOT / "README.md"]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize(
    ("path", "index"),
    [(p, i) for p in DOCS for i in range(len(python_blocks(p)))],
    ids=lambda v: v.name if isinstance(v, Path) else str(v),
)
def test_doc_block_runs(path: Path, index: int) -> None:
    exec(compile(python_blocks(path)[index], f"{path.name}[{index}]", "exec"), {"__name__": "__doc_example__"})
