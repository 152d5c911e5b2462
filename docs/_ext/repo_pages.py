"""mkdocs hooks: the site shows repository files beside docs/, with the links written for GitHub kept working.

Pages link each other as files of the repository (``docs/kfac.md`` from the README, ``../README.md`` from
docs/README.md), which is what GitHub renders. The site mounts those files at other paths:

==========================  ==========================
repository                  site
==========================  ==========================
``README.md``               ``index.md`` (the home page)
``docs/README.md``          ``guide.md``
``docs/<page>``             ``<page>``
``benchmarks/**/*.md|png``  ``benchmarks/**`` (with a generated ``benchmarks/index.md`` for ``benchmarks/``)
==========================  ==========================

and rewrites each relative link from the repository path it names to the site path of that file. A link to a
repository file the site does not mount is left as written, so that ``mkdocs build --strict`` reports it.

Loaded by mkdocs.yml (``hooks``).
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files, InclusionLevel

DOCS = "docs"
BENCHMARKS = "benchmarks"
ASSETS = (".md", ".png", ".svg")
# Repository path -> site path, for the files that do not keep their path under docs/.
RENAMED = {"README.md": "index.md", f"{DOCS}/README.md": "guide.md", f"{BENCHMARKS}/": f"{BENCHMARKS}/index.md"}
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(?:.+?)\1")
LINK = re.compile(r"(?<=\]\()(?P<target>[^)\s]+)(?=[)\s])")
EXTERNAL = re.compile(r"^([a-z][a-z0-9+.-]*:|#|/)", re.IGNORECASE)

# Site path -> repository path of every page and asset mounted from outside docs/ (filled by on_files).
_mounted: dict[str, str] = {}


def site_path(repo_path: str) -> str | None:
    """Where the repository file ``repo_path`` lives in the site, ``None`` if the site does not have it."""
    if repo_path in RENAMED:
        return RENAMED[repo_path]
    if repo_path.startswith(f"{DOCS}/"):
        return repo_path[len(DOCS) + 1 :]
    return repo_path if _mounted.get(repo_path) == repo_path else None


def repo_path(src_uri: str) -> str:
    """The repository path of the site file ``src_uri``."""
    return _mounted.get(src_uri, f"{DOCS}/{src_uri}")


def rewrite_target(target: str, page_repo: str, page_site: str) -> str:
    """One link of the page (repository path ``page_repo``, site path ``page_site``), made to work in the site."""
    if EXTERNAL.match(target):
        return target
    path, hash_, fragment = target.partition("#")
    repo_target = posixpath.normpath(posixpath.join(posixpath.dirname(page_repo), path))
    if path.endswith("/"):
        repo_target += "/"
    site_target = site_path(repo_target)
    if site_target is None:
        return target
    relative = posixpath.relpath(site_target, posixpath.dirname(page_site) or ".")
    return relative + hash_ + fragment


def rewrite_links(markdown: str, page_repo: str, page_site: str) -> str:
    """``markdown`` with its inline links rewritten (not those in fenced blocks or code spans)."""

    def rewrite(text: str) -> str:
        return LINK.sub(lambda match: rewrite_target(match["target"], page_repo, page_site), text)

    lines, fenced = [], False
    for line in markdown.split("\n"):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            pieces, last = [], 0
            for span in CODE_SPAN.finditer(line):
                pieces += [rewrite(line[last : span.start()]), span.group(0)]
                last = span.end()
            line = "".join([*pieces, rewrite(line[last:])])
        lines.append(line)
    return "\n".join(lines)


def _root(config: Any) -> Path:
    """The repository: the folder of mkdocs.yml."""
    return Path(config.config_file_path).resolve().parent


def _mount(files: Files, config: Any, src_uri: str, repo: str, inclusion: InclusionLevel) -> None:
    _mounted[src_uri] = repo
    files.append(File.generated(config, src_uri, abs_src_path=str(_root(config) / repo), inclusion=inclusion))


def _benchmarks_index(root: Path, pages: list[str]) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Every study is code in `benchmarks/` with its committed results; these are the result pages.",
        "",
    ]
    for page in pages:
        text = (root / page).read_text()
        title = next((line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")), page)
        lines.append(f"- [{page.removeprefix(BENCHMARKS + '/')}]({page.removeprefix(BENCHMARKS + '/')}): {title}")
    return "\n".join(lines) + "\n"


def on_files(files: Files, config: Any, **kwargs: Any) -> Files:
    """Mount the README, docs/README.md and the benchmarks' result pages and plots."""
    _mounted.clear()
    guide = files.get_file_from_path("README.md")
    if guide is not None:
        files.remove(guide)
    _mount(files, config, "index.md", "README.md", InclusionLevel.UNDEFINED)
    _mount(files, config, "guide.md", f"{DOCS}/README.md", InclusionLevel.UNDEFINED)
    root, pages = _root(config), []
    for path in sorted((root / BENCHMARKS).rglob("*")):
        repo = path.relative_to(root).as_posix()
        if path.suffix in ASSETS and path.is_file():
            _mount(files, config, repo, repo, InclusionLevel.NOT_IN_NAV)
            if path.suffix == ".md":
                pages.append(repo)
    _mounted[f"{BENCHMARKS}/index.md"] = f"{BENCHMARKS}/"
    files.append(File.generated(config, f"{BENCHMARKS}/index.md", content=_benchmarks_index(root, pages)))
    return files


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """Rewrite the page's links from repository paths to site paths."""
    src_uri = page.file.src_uri
    return rewrite_links(markdown, repo_path(src_uri), src_uri)
