"""Griffe extension: kronfac's docstrings as Sphinx's napoleon reads them, for the mkdocstrings site.

kronfac's docstrings are Google style with conventions that napoleon and Sphinx understand and griffe's Google
parser does not; this extension rewrites each docstring before griffe parses it:

* roles, ``:class:`KronLinear```, ``:meth:`~kronfac.KFAC.step```, become mkdocstrings cross-references,
  resolved as Sphinx resolves them (the docstring's own scope first: its object, the enclosing class with its
  inherited members, the module and what it imports), so that the strict build fails when a role names nothing
  the site documents. Roles naming objects outside kronfac (torch, builtins) become code: there is no offline
  inventory to link them to;
* an ``Args:`` entry for several parameters at once (``a, b, c: the shared options``) becomes one entry per
  parameter with that description;
* ``Example:`` is the ``Examples:`` section (napoleon reads both);
* a paragraph ending in ``::`` introduces a literal block (which markdown makes of an indented block): ``:``;
* ``#:`` comments above an attribute become that attribute's docstring.

Loaded by mkdocs.yml (``plugins.mkdocstrings.handlers.python.options.extensions``); griffe reads the source
statically, nothing is imported.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Iterator
from typing import Any

import griffe

PACKAGE = "kronfac"
ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|exc|obj|const):`(?P<target>[^`]+)`")
EXPLICIT_TITLE = re.compile(r"^(?P<title>.+?)\s*<(?P<target>[^<>]+)>$")
PARAMETER_SECTION = re.compile(r"^(?P<indent>\s*)(Args|Arguments|Parameters|Keyword Args|Other Parameters):\s*$")
SEVERAL_NAMES = re.compile(r"^\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)+$")
SECTION_ALIASES = {"Example": "Examples"}
LITERAL = re.compile(r"(?<=\S)::$")
COMMENT = "#:"


def _objects(obj: griffe.Object) -> Iterator[griffe.Object]:
    """``obj`` and every object defined in it (aliases, i.e. imports, are documented where they are defined)."""
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _objects(member)  # type: ignore[arg-type]


# Roles ------------------------------------------------------------------------------------------------------


def _inherited(scope: griffe.Object, name: str) -> str | None:
    """The path of ``name`` as a member of the class ``scope``, inherited members included."""
    try:
        member = scope.all_members.get(name)  # type: ignore[attr-defined]
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None
    if member is None:
        return None
    return member.target_path if member.is_alias else member.path


def resolve(obj: griffe.Object, target: str) -> str:
    """The full path a role's ``target`` names from the docstring of ``obj``; ``target`` itself if none."""
    name = target.lstrip(".")
    head, _, rest = name.partition(".")
    path: str | None
    try:
        path = obj.resolve(head)
    except griffe.NameResolutionError:
        path = None
        scope: griffe.Object | None = obj
        while path is None and scope is not None:
            if scope.is_class:
                path = _inherited(scope, head)
            scope = scope.parent
    if path is None:
        return name
    return f"{path}.{rest}" if rest else path


def role_markdown(obj: griffe.Object, match: re.Match[str]) -> str:
    """The markdown for one role in the docstring of ``obj``: a cross-reference or, outside kronfac, code."""
    target = match["target"].strip()
    explicit = EXPLICIT_TITLE.match(target)
    if explicit:
        title, target = explicit["title"], explicit["target"]
    else:
        title = target.lstrip("~!.")
        if target.startswith("~"):
            title = title.rsplit(".", 1)[-1]
    if target.startswith("!"):
        return f"`{title}`"
    path = resolve(obj, target.lstrip("~"))
    inside = path == PACKAGE or path.startswith(f"{PACKAGE}.")
    if not inside and ("." in path or hasattr(builtins, path)):
        return f"`{title}`"  # torch, transformers, builtins: nothing of ours to link to
    # Inside kronfac, or a bare name found nowhere: a cross-reference, which the build checks.
    return f"[`{title}`][{path}]"


# Sections ---------------------------------------------------------------------------------------------------


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _split_entries(body: list[str]) -> list[list[str]]:
    """The entries of a section body: each starts at the body's indentation, continuation lines go deeper."""
    base = min(_indent(line) for line in body if line.strip())
    entries: list[list[str]] = []
    for line in body:
        if (line.strip() and _indent(line) == base) or not entries:
            entries.append([line])
        else:
            entries[-1].append(line)
    return entries


def _expand_entry(entry: list[str]) -> list[str]:
    """One entry per parameter for an entry naming several (``a, b: text``); other entries as they are."""
    names, colon, description = "\n".join(line.strip() for line in entry).partition(":")
    names = " ".join(names.split())
    if not colon or SEVERAL_NAMES.match(names) is None:
        return entry
    indent = " " * _indent(entry[0])
    first, *rest = [line.strip() for line in description.strip().split("\n")]
    lines = []
    for name in names.split(","):
        lines += [f"{indent}{name.strip()}: {first}", *(f"{indent}    {line}" for line in rest)]
    return lines


def expand_parameter_groups(lines: list[str]) -> list[str]:
    """Every ``Args:``-like section with its entries for several parameters split into one per parameter."""
    out: list[str] = []
    number = 0
    while number < len(lines):
        out.append(lines[number])
        header = PARAMETER_SECTION.match(lines[number])
        number += 1
        if header is None:
            continue
        start = number
        while number < len(lines) and (not lines[number].strip() or _indent(lines[number]) > len(header["indent"])):
            number += 1
        while number > start and not lines[number - 1].strip():
            number -= 1  # trailing blank lines belong to what follows
        body = lines[start:number]
        if body:
            for entry in _split_entries(body):
                out += _expand_entry(entry)
    return out


def rewrite(obj: griffe.Object, text: str) -> str:
    """The docstring ``text`` of ``obj`` in the markup griffe's Google parser and mkdocstrings read."""
    lines = text.split("\n")
    for number, line in enumerate(lines):
        name = line.strip().removesuffix(":")
        if line.strip().endswith(":") and name in SECTION_ALIASES:
            lines[number] = line.replace(name, SECTION_ALIASES[name], 1)
        elif LITERAL.search(line) and (number + 1 == len(lines) or not lines[number + 1].strip()):
            lines[number] = line[:-1]
    text = "\n".join(expand_parameter_groups(lines))
    return ROLE.sub(lambda match: role_markdown(obj, match), text)


# Attribute comments -----------------------------------------------------------------------------------------


def comment_docstring(attr: griffe.Object) -> str | None:
    """The ``#:`` comment lines right above ``attr``'s assignment, as text (``None`` when there are none)."""
    if attr.lineno is None:
        return None
    try:
        lines = attr.lines_collection[attr.filepath]  # type: ignore[index]
    except (KeyError, ValueError, TypeError):
        return None
    comment: list[str] = []
    number = attr.lineno - 2  # the line above, 0-based
    while number >= 0 and lines[number].strip().startswith(COMMENT):
        comment.insert(0, lines[number].strip()[len(COMMENT) :].removeprefix(" "))
        number -= 1
    return "\n".join(comment) if comment else None


class KronfacDocstrings(griffe.Extension):
    """Rewrites every docstring of a loaded package (and adds those of ``#:`` comments) before griffe parses it."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        parser, options = None, {}
        if pkg.docstring is not None:
            parser, options = pkg.docstring.parser, pkg.docstring.parser_options
        for obj in _objects(pkg):
            if obj.is_attribute and obj.docstring is None:
                text = comment_docstring(obj)
                if text is not None:
                    obj.docstring = griffe.Docstring(
                        text, lineno=obj.lineno, parent=obj, parser=parser, parser_options=options
                    )
            if obj.docstring is not None:
                obj.docstring.value = rewrite(obj, obj.docstring.value)
