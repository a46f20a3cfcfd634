"""The files of the `priorreg` package a module file imports, transitively, found with `ast`.

Imports inside functions count: the modules import torch-dependent code lazily, and a lazy
import of a file missing from the extension fails just the same, only later, in front of a
user. A file imported as `priorreg.a.b` also runs the `__init__.py` of `priorreg` and
`priorreg.a`, so those count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "priorreg"


def _module_file(root: Path, dotted: str) -> Path | None:
    base = root.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _dotted(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _nodes(tree: ast.AST, eager: bool):
    """Every node, or with `eager` only those that run on import (function bodies run later)."""
    if not eager:
        yield from ast.walk(tree)
        return
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        todo += [child for child in ast.iter_child_nodes(node) if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]


def imported_modules(path: Path, root: Path, eager: bool = False) -> tuple[set[str], set[str]]:
    """(dotted `priorreg` modules, top-level names of everything else) imported in `path`.

    Anywhere in the file, or with `eager` only where the import runs when the file is imported.
    """
    package = _dotted(root, path) if path.is_relative_to(root / PACKAGE) else ""
    if package and path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    ours, others = set(), set()
    for node in _nodes(ast.parse(path.read_text(), str(path)), eager):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            # `from a import b` imports a, and a.b when b is a module
            names = [module] + [f"{module}.{alias.name}" for alias in node.names if _module_file(root, f"{module}.{alias.name}")]
        else:
            continue
        for name in names:
            (ours if name.split(".")[0] == PACKAGE else others).add(name if name.split(".")[0] == PACKAGE else name.split(".")[0])
    return ours, others


def priorreg_closure(start: Path, root: Path, eager: bool = False) -> tuple[set[Path], set[str]]:
    """Every `priorreg` file `start` needs, and the top-level names of the other packages they import.

    With `eager`, only what importing `start` runs (what a module panel needs to appear).
    """
    files: set[Path] = set()
    others: set[str] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        ours, theirs = imported_modules(path, root, eager)
        others |= theirs
        for dotted in ours:
            parts = dotted.split(".")
            for n in range(1, len(parts) + 1):  # the packages' __init__.py run first
                found = _module_file(root, ".".join(parts[:n]))
                if found is None:
                    raise ImportError(f"{path}: imports {dotted}, which is not a file of {root / PACKAGE}")
                if found not in files:
                    files.add(found)
                    todo.append(found)
    return files, others
