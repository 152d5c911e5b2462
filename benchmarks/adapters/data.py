"""Offline data from the Python standard library's own source (the interpreter running this script).

- Pretraining corpus: every ``.py`` file of the standard library except test directories and the held-out
  packages, as bytes (vocabulary 256, token 0 never occurs and pads).
- ``package``: which of the held-out packages a 64-byte source snippet comes from (6 classes; files split
  between train/val/test, so no file is seen in two splits).
- ``docstring``: whether the first docstring line belongs to the function whose ``def`` line precedes it
  (functions of the held-out packages, each once with its own docstring and once with another's; functions split).
"""

from __future__ import annotations

import ast
import random
import sysconfig
from pathlib import Path

import torch

CONTEXT = 64
HELD_OUT = ("asyncio", "email", "json", "logging", "unittest", "xml")
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _files(package: str | None) -> list[Path]:
    if package is not None:
        return sorted((STDLIB / package).rglob("*.py"))
    out = []
    for path in sorted(STDLIB.rglob("*.py")):
        parts = path.relative_to(STDLIB).parts
        if parts[0] in HELD_OUT or parts[0] in ("site-packages", "test", "idlelib", "lib2to3") or "tests" in parts:
            continue
        out.append(path)
    return out


def encode(text: str) -> list[int]:
    return [b for b in text.encode("utf-8", "replace") if b != 0]


def pretraining_corpus(max_bytes: int = 6_000_000) -> torch.Tensor:
    data: list[int] = []
    for path in _files(None):
        data += encode(path.read_text("utf-8", "replace"))
        if len(data) >= max_bytes:
            break
    return torch.tensor(data[:max_bytes], dtype=torch.long)


def _pad(ids: list[int]) -> list[int]:
    ids = ids[:CONTEXT]
    return ids + [0] * (CONTEXT - len(ids))


Split = tuple[torch.Tensor, torch.Tensor]


def package_task(seed: int = 0, per_class: tuple[int, int, int] = (400, 100, 200)) -> dict[str, Split]:
    rng = random.Random(seed)
    splits: dict[str, tuple[list[list[int]], list[int]]] = {s: ([], []) for s in ("train", "val", "test")}
    for label, package in enumerate(HELD_OUT):
        files = _files(package)
        rng.shuffle(files)
        cut = [0, int(0.6 * len(files)), int(0.8 * len(files)), len(files)]
        for (name, count), lo, hi in zip(zip(splits, per_class), cut[:-1], cut[1:]):
            text = [encode(p.read_text("utf-8", "replace")) for p in files[lo:hi]]
            text = [t for t in text if len(t) > CONTEXT]
            for _ in range(count):
                t = rng.choice(text)
                start = rng.randrange(len(t) - CONTEXT)
                splits[name][0].append(t[start : start + CONTEXT])
                splits[name][1].append(label)
    return {k: (torch.tensor(x), torch.tensor(y)) for k, (x, y) in splits.items()}


def _functions() -> list[tuple[str, str]]:
    out = []
    for package in HELD_OUT:
        for path in _files(package):
            try:
                tree = ast.parse(path.read_text("utf-8", "replace"))
            except SyntaxError:
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    doc = ast.get_docstring(node)
                    if doc and len(doc.split("\n")[0]) > 10:
                        args = ", ".join(a.arg for a in node.args.args)
                        out.append((f"def {node.name}({args}):", doc.split("\n")[0]))
    return sorted(set(out))


def docstring_task(seed: int = 0) -> dict[str, Split]:
    rng = random.Random(seed)
    functions = _functions()
    rng.shuffle(functions)
    n = len(functions)
    parts = {"train": functions[: int(0.6 * n)], "val": functions[int(0.6 * n) : int(0.8 * n)]}
    parts["test"] = functions[int(0.8 * n) :]
    out = {}
    for name, funcs in parts.items():
        x, y = [], []
        for i, (signature, doc) in enumerate(funcs):  # each function once with its docstring, once without
            other = funcs[(i + rng.randrange(1, len(funcs))) % len(funcs)][1]
            for label, text in ((1, doc), (0, other)):
                x.append(_pad(encode(f'{signature[:28]}\n    """{text[:28]}')))
                y.append(label)
        out[name] = (torch.tensor(x), torch.tensor(y))
    return out


TASKS = {"package": package_task, "docstring": docstring_task}
