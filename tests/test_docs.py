"""Every ```python block of README.md and docs/*.md runs as written.

The convention (also in docs/README.md):

* a ```python block runs on its own, in a fresh namespace;
* a block whose first line is ``# continued`` runs in the namespace of the python block just above it on the same
  page (a chain: that block and its continuations, tested as one unit, named by the page and its first line);
* a block whose first line is ``# not run: <reason>`` (a script for torchrun, say) is only compiled;
* every fence names its language: shell commands are ```bash, equations and other text are ```text, so that no
  python hides in a block that is never run.

Tracebacks point at the line of the markdown page.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# docs/adafisher.md shows on purpose that a LayerNorm without its block gets the first-order update (warned once).
pytestmark = pytest.mark.filterwarnings("ignore:kronfac.*first-order update")

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONTINUED = "# continued"
NOT_RUN = re.compile(r"# not run: \S")
FENCE = "```"
# What the pages print that the guide's text relies on, beyond running.
EXPECTED_OUTPUT = {
    "architecture.md": ["batch-1 |G ⊗ A - F| = "],
    "integrations.md": [
        "resumed run ends at the uninterrupted run's parameters: True",
        "8 micro-batches, 4 K-FAC steps",
    ],
    "kron_layers.md": ["trainable", "Cannot merge"],
    "thermodynamic.md": ["inverse mode: relative error", "crossover width", "thermodynamic (8-bit)"],
}
# Pages whose runnable examples the guide walks through (a block lost to a broken fence or marker shows here).
MIN_RUNNABLE_BLOCKS = {
    "architecture.md": 2,
    "kron_layers.md": 5,
    "thermodynamic.md": 3,
    "cgfac.md": 2,
    "kldwrm.md": 2,
    "adafisher.md": 1,
    "integrations.md": 4,
}


@dataclass(frozen=True)
class Block:
    """One fenced block: its page, the line of its first code line, its language and its code."""

    page: Path
    line: int
    language: str
    code: str

    @property
    def first_line(self) -> str:
        return self.code.split("\n", 1)[0].strip()

    @property
    def continued(self) -> bool:
        return self.first_line == CONTINUED

    @property
    def not_run(self) -> bool:
        return NOT_RUN.match(self.first_line) is not None

    def compiled(self) -> object:
        # Blank lines in front, so that line numbers in a traceback are those of the markdown page.
        return compile("\n" * (self.line - 1) + self.code, str(self.page), "exec")


def fenced_blocks(page: Path) -> list[Block]:
    """Every fenced block of ``page``, in order (fences open and close at the start of a line, not indented)."""
    blocks, opened, language, lines = [], 0, "", []
    for number, text in enumerate(page.read_text().splitlines(), start=1):
        if not opened and text.startswith(FENCE):
            opened, language, lines = number, text[len(FENCE) :].strip(), []
        elif opened and text.rstrip() == FENCE:
            blocks.append(Block(page, opened + 1, language, "".join(f"{line}\n" for line in lines)))
            opened = 0
        elif opened:
            lines.append(text)
    assert not opened, f"{page.name}:{opened}: the fence opened here is never closed"
    return blocks


def python_blocks(page: Path) -> list[Block]:
    return [block for block in fenced_blocks(page) if block.language == "python"]


def chains(page: Path) -> list[tuple[Block, ...]]:
    """The runnable python blocks of ``page``, grouped: each block with the ``# continued`` blocks after it."""
    groups: list[list[Block]] = []
    previous: Block | None = None
    for block in python_blocks(page):
        if block.continued:
            assert previous is not None and not previous.not_run, (
                f"{page.name}:{block.line}: '{CONTINUED}' needs a python block that runs just above it"
            )
            groups[-1].append(block)
        elif not block.not_run:
            groups.append([block])
        previous = block
    return [tuple(group) for group in groups]


@functools.cache
def run_chain(chain: tuple[Block, ...]) -> str:
    """Run the blocks of one chain in one fresh namespace; return what they printed."""
    namespace: dict[str, object] = {"__name__": "__doc_example__"}
    printed = io.StringIO()
    # The examples' models are tiny: on a busy machine an intra-op thread pool costs more than it saves (a Trainer
    # example of docs/integrations.md took 35 s with 2 threads and 5 s with one).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(printed):
            for block in chain:
                exec(block.compiled(), namespace)
    finally:
        torch.set_num_threads(threads)
    return printed.getvalue()


def _chain_id(chain: tuple[Block, ...]) -> str:
    return f"{chain[0].page.name}:{chain[0].line}"


ALL_CHAINS = [chain for page in PAGES for chain in chains(page)]


@pytest.mark.parametrize("chain", ALL_CHAINS, ids=_chain_id)
def test_doc_example_runs(chain: tuple[Block, ...]) -> None:
    run_chain(chain)


@pytest.mark.parametrize(
    ("page", "text"), [(page, text) for page, texts in EXPECTED_OUTPUT.items() for text in texts], ids=str
)
def test_doc_examples_print_what_the_page_says(page: str, text: str) -> None:
    printed = "".join(run_chain(chain) for chain in chains(ROOT / "docs" / page))
    assert text in printed


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_page_follows_the_block_conventions(page: Path) -> None:
    blocks = fenced_blocks(page)
    unnamed = [block.line - 1 for block in blocks if not block.language]
    assert not unnamed, f"{page.name}: fences without a language (```text, ```bash, ```python) at lines {unnamed}"
    for block in blocks:
        if block.language == "python" and block.first_line.startswith(("# continue", "# not run")):
            assert block.continued or block.not_run, (
                f"{page.name}:{block.line}: '{block.first_line}' is neither '{CONTINUED}' nor '# not run: <reason>'"
            )
        if block.language == "python" and block.not_run:
            block.compiled()  # a block that is not run still has to be valid python


def test_every_python_fence_is_parsed() -> None:
    for page in PAGES:
        fences = sum(line.rstrip() == "```python" for line in page.read_text().splitlines())
        assert len(python_blocks(page)) == fences, page.name


def test_pages_keep_their_runnable_examples() -> None:
    runnable = {page.name: sum(len(chain) for chain in chains(page)) for page in PAGES}
    for name, least in MIN_RUNNABLE_BLOCKS.items():
        assert runnable[name] >= least, f"{name}: {runnable[name]} runnable python blocks, expected >= {least}"
