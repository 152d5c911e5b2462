"""Every docstring example (``>>>``) in the kronfac package runs as a doctest, one test per module.

The modules are found with ``pkgutil``; those whose source holds ``>>>`` are the ones tested, and each of them must
yield at least one example to doctest (an example doctest cannot see, such as one in a comment, fails).
Flags: ``ELLIPSIS`` and ``NORMALIZE_WHITESPACE``.
"""

from __future__ import annotations

import doctest
import importlib
import io
import pkgutil
from pathlib import Path

import pytest

import kronfac

PACKAGE = Path(kronfac.__file__).resolve().parent
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def module_sources() -> dict[str, Path]:
    """Every module of the kronfac package (packages included, as their ``__init__``), with its source file."""
    sources = {"kronfac": PACKAGE / "__init__.py"}
    for info in pkgutil.walk_packages(kronfac.__path__, prefix="kronfac."):
        relative = Path(*info.name.split(".")[1:])
        sources[info.name] = PACKAGE / relative / "__init__.py" if info.ispkg else PACKAGE / f"{relative}.py"
    return sources


def modules_with_examples() -> list[str]:
    return sorted(name for name, path in module_sources().items() if ">>>" in path.read_text())


def test_every_source_file_is_collected() -> None:
    on_disk = {path.resolve() for path in PACKAGE.rglob("*.py")}
    assert set(module_sources().values()) == on_disk


def test_known_examples_are_found() -> None:
    found = modules_with_examples()
    assert {"kronfac.distributed.assignment", "kronfac.linalg.thermodynamic.config"} <= set(found)


@pytest.mark.parametrize("name", modules_with_examples())
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    tests = [test for test in doctest.DocTestFinder().find(module) if test.examples]
    assert tests, f"{name} has '>>>' in its source but no docstring example that doctest finds"
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report = io.StringIO()
    failed = attempted = 0
    for test in tests:
        result = runner.run(test, out=report.write)
        failed, attempted = failed + result.failed, attempted + result.attempted
    assert failed == 0, f"{failed} of {attempted} examples failed in {name}:\n{report.getvalue()}"
