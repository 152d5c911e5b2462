"""The documentation site (mkdocs.yml, docs/_ext/): its strict build fails on a broken reference, its API pages
cover the public API, and the two translations it relies on (docstring markup, repository links) do what they
say. Needs the docs extra (``pip install -e ".[docs]"``); skipped without it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

griffe = pytest.importorskip("griffe")
pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings_handlers.python")

ROOT = Path(__file__).resolve().parents[1]
EXTENSIONS = ROOT / "docs" / "_ext"
API_PAGES = sorted((ROOT / "docs" / "api").glob("*.md"))
DIRECTIVE = re.compile(r"^::: (\S+)", re.MULTILINE)
# The modules whose __all__ is the public API the reference documents.
PUBLIC_MODULES = ["kronfac", "kronfac.nn", "kronfac.optim", "kronfac.curvature", "kronfac.layers"]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"kronfac_docs_{name}", EXTENSIONS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


docstrings = _load("docstrings")
repo_pages = _load("repo_pages")


# The strict build ------------------------------------------------------------------------------------------


def test_strict_build_fails_on_each_kind_of_broken_reference(tmp_path: Path) -> None:
    """A copy of the repository with one broken link, anchor, page cross-reference and docstring role: the build
    fails, reporting each of them and nothing else."""
    for name in ("mkdocs.yml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ("docs", "src"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=ignore)
    (tmp_path / "benchmarks").symlink_to(ROOT / "benchmarks", target_is_directory=True)

    broken = {
        "no-such-page.md": ("docs/kfac.md", "\n\n[a page that is not there](no-such-page.md)\n"),
        "#no-such-heading": ("docs/kfac.md", "\n[a heading that is not there](singd.md#no-such-heading)\n"),
        "kronfac.NoSuchOptimizer": ("docs/api/index.md", "\nSee [kronfac.NoSuchOptimizer][].\n"),
    }
    for path, text in broken.values():
        with open(tmp_path / path, "a") as page:
            page.write(text)
    kfac = tmp_path / "src" / "kronfac" / "optim" / "kfac.py"
    source = kfac.read_text()
    assert ":class:`~kronfac.EighConfig`" in source
    kfac.write_text(source.replace(":class:`~kronfac.EighConfig`", ":class:`~kronfac.NoSuchConfig`", 1))
    broken["kronfac.NoSuchConfig"] = ("src/kronfac/optim/kfac.py", "")

    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert result.returncode != 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    for name in broken:
        assert any(name in line for line in warnings), f"the build did not report {name}:\n{result.stderr}"
    unexpected = [line for line in warnings if not any(name in line for name in broken)]
    assert not unexpected, "\n".join(unexpected)


# The API pages ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def package() -> griffe.Module:
    return griffe.load("kronfac", search_paths=[str(ROOT / "src")], docstring_parser="google")


def _target(package: griffe.Module, path: str) -> griffe.Object:
    obj = package if path == "kronfac" else package[path.removeprefix("kronfac.")]
    return obj.final_target if obj.is_alias else obj


def test_api_pages_document_every_public_name(package: griffe.Module) -> None:
    """Every name of the public modules' ``__all__`` is rendered by a ``:::`` directive of docs/api/ (its own, or
    its module's), and has a docstring: mkdocstrings leaves out objects without one."""
    directives = [path for page in API_PAGES for path in DIRECTIVE.findall(page.read_text())]
    documented = {_target(package, path).path for path in directives}
    missing, undocumented = [], []
    for module_path in PUBLIC_MODULES:
        module = _target(package, module_path)
        for name in module.exports or []:
            obj = _target(package, f"{module_path}.{name}")
            if obj.is_module or name == "__version__":
                continue
            if obj.path not in documented and module_path not in directives:
                missing.append(f"{module_path}.{name}")
            if obj.docstring is None:
                undocumented.append(f"{module_path}.{name}")
    assert not missing, f"public names on no page of docs/api/: {missing}"
    assert not undocumented, f"public names without a docstring (the site leaves them out): {undocumented}"


def test_api_directives_name_existing_objects(package: griffe.Module) -> None:
    for page in API_PAGES:
        for path in DIRECTIVE.findall(page.read_text()):
            _target(package, path)  # raises KeyError for a name that does not exist


# Docstring markup ------------------------------------------------------------------------------------------

MODULE = '''
"""Module docstring: :class:`Base`, :func:`helper`, :class:`torch.nn.Module`, :class:`RuntimeError`,
:class:`Missing`, :meth:`~kronfac.mod.Base.step`, :class:`the base <Base>`, :class:`!Base`."""

from torch import nn

#: How many steps.
STEPS = 3


def helper() -> None:
    """A helper."""


class Base:
    """Uses :meth:`step`.

    Args:
        a, b,
            c: the shared options (:class:`Base`).
        d: alone.

    Example:
        >>> 1 + 1
        2
    """

    def step(self) -> None:
        """One step of the current batch::

            x = 1
        """


class Child(Base):
    """Inherits :meth:`step`; wraps :class:`nn.Module`."""
'''


@pytest.fixture(scope="module")
def visited() -> griffe.Module:
    extensions = griffe.load_extensions(docstrings.KronfacDocstrings)
    with griffe.temporary_visited_package(
        "kronfac", {"mod.py": MODULE}, extensions=extensions, docstring_parser="google"
    ) as package:
        yield package


def test_roles_become_cross_references_inside_kronfac_and_code_outside(visited: griffe.Module) -> None:
    text = visited["mod"].docstring.value
    assert "[`Base`][kronfac.mod.Base]" in text
    assert "[`helper`][kronfac.mod.helper]" in text
    assert "`torch.nn.Module`" in text and "[`torch.nn.Module`]" not in text
    assert "`RuntimeError`" in text and "[`RuntimeError`]" not in text
    assert "[`Missing`][Missing]" in text  # a reference to nothing stays one, so that the build reports it
    assert "[`step`][kronfac.mod.Base.step]" in text
    assert "[`the base`][kronfac.mod.Base]" in text
    assert "`Base`." in text and ":class:" not in text


def test_roles_resolve_in_the_docstrings_scope(visited: griffe.Module) -> None:
    assert "[`step`][kronfac.mod.Base.step]" in visited["mod.Base"].docstring.value
    child = visited["mod.Child"].docstring.value
    assert "[`step`][kronfac.mod.Base.step]" in child  # inherited member
    assert "`nn.Module`" in child and "[`nn.Module`]" not in child  # imported from torch


def test_args_entry_for_several_parameters_becomes_one_per_parameter(visited: griffe.Module) -> None:
    sections = visited["mod.Base"].docstring.parsed
    parameters = next(section for section in sections if section.kind.value == "parameters")
    assert [p.name for p in parameters.value] == ["a", "b", "c", "d"]
    assert parameters.value[2].description == "the shared options ([`Base`][kronfac.mod.Base])."
    assert any(section.kind.value == "examples" for section in sections)


def test_literal_block_marker_and_attribute_comments(visited: griffe.Module) -> None:
    assert visited["mod.Base.step"].docstring.value.startswith("One step of the current batch:\n")
    assert visited["mod.STEPS"].docstring.value == "How many steps."


# Repository links ------------------------------------------------------------------------------------------


@pytest.fixture
def mounted() -> None:
    saved = dict(repo_pages._mounted)
    repo_pages._mounted.clear()
    repo_pages._mounted.update(
        {"index.md": "README.md", "guide.md": "docs/README.md", "benchmarks/index.md": "benchmarks/"}
    )
    repo_pages._mounted["benchmarks/bench/results.md"] = "benchmarks/bench/results.md"
    yield
    repo_pages._mounted.clear()
    repo_pages._mounted.update(saved)


@pytest.mark.parametrize(
    ("page_repo", "page_site", "target", "expected"),
    [
        ("README.md", "index.md", "docs/kfac.md", "kfac.md"),
        ("README.md", "index.md", "docs/kfac.md#inverses", "kfac.md#inverses"),
        ("README.md", "index.md", "docs/README.md", "guide.md"),
        ("README.md", "index.md", "benchmarks/", "benchmarks/index.md"),
        ("README.md", "index.md", "benchmarks/bench/results.md", "benchmarks/bench/results.md"),
        ("docs/README.md", "guide.md", "../README.md", "index.md"),
        ("docs/README.md", "guide.md", "api/index.md", "api/index.md"),
        ("docs/api/nn.md", "api/nn.md", "../kron_layers.md#benchmarks", "../kron_layers.md#benchmarks"),
        ("docs/kfac.md", "kfac.md", "../benchmarks/bench/results.md", "benchmarks/bench/results.md"),
        ("benchmarks/", "benchmarks/index.md", "bench/results.md", "bench/results.md"),
        # left as written: outside the site (the strict build reports it), external, or within the page
        ("README.md", "index.md", "src/kronfac/optim/kfac.py", "src/kronfac/optim/kfac.py"),
        ("README.md", "index.md", "https://pytorch.org/", "https://pytorch.org/"),
        ("docs/kfac.md", "kfac.md", "#inverses", "#inverses"),
    ],
)
def test_links_go_from_repository_paths_to_site_paths(
    mounted: None, page_repo: str, page_site: str, target: str, expected: str
) -> None:
    assert repo_pages.rewrite_target(target, page_repo, page_site) == expected


def test_links_in_code_are_left_alone(mounted: None) -> None:
    markdown = "[kfac](docs/kfac.md) `[kfac](docs/kfac.md)`\n```text\n[kfac](docs/kfac.md)\n```\n"
    rewritten = repo_pages.rewrite_links(markdown, "README.md", "index.md")
    assert rewritten == "[kfac](kfac.md) `[kfac](docs/kfac.md)`\n```text\n[kfac](docs/kfac.md)\n```\n"
