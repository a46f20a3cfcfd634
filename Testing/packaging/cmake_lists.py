"""Just enough of CMake to read this extension's CMakeLists: `set`, `file(GLOB ... RELATIVE ...)`, `${VAR}`.

Commands are recorded in order with their arguments expanded; `if()` blocks are read as if
their condition held (they guard tests, which must list their files too).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

_COMMAND = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*\((.*?)\)", re.S)
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass
class CMakeFile:
    path: Path
    variables: dict[str, list[str]] = field(default_factory=dict)
    commands: list[tuple[str, list[str]]] = field(default_factory=list)

    def calls(self, name: str) -> list[list[str]]:
        return [args for command, args in self.commands if command.lower() == name.lower()]


def _strip_comments(text: str) -> str:
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def read_cmake(path: Path) -> CMakeFile:
    cmake = CMakeFile(path, {"CMAKE_CURRENT_SOURCE_DIR": [str(path.parent)]})
    for match in _COMMAND.finditer(_strip_comments(path.read_text())):
        name = match.group(1)
        args = []
        for token in match.group(2).split():
            token = token.strip('"')
            whole = _VARIABLE.fullmatch(token)
            if whole:  # a list variable expands to its items
                args += cmake.variables.get(whole.group(1), [])
            else:
                args.append(_VARIABLE.sub(lambda m: " ".join(cmake.variables.get(m.group(1), [])), token))
        if name == "set" and args:
            cmake.variables[args[0]] = args[1:]
        elif name == "file" and args[:1] == ["GLOB"]:
            variable, rest = args[1], args[2:]
            base = Path(rest[1]) if rest[:1] == ["RELATIVE"] else path.parent
            patterns = rest[2:] if rest[:1] == ["RELATIVE"] else rest
            found = sorted({p for pattern in patterns for p in path.parent.glob(pattern)})
            cmake.variables[variable] = [str(p.relative_to(base)) for p in found]
            cmake.variables[f"{variable}__patterns"] = patterns
        cmake.commands.append((name, args))
    return cmake


def sections(args: list[str], keywords: tuple[str, ...]) -> dict[str, list[str]]:
    """Split a macro's arguments at its keywords: `{keyword: values}`; flags map to []."""
    out: dict[str, list[str]] = {}
    current = None
    for arg in args:
        if arg in keywords:
            current = arg
            out[current] = []
        elif current is not None:
            out[current].append(arg)
    return out


SCRIPTED_MODULE_KEYWORDS = ("NAME", "SCRIPTS", "RESOURCES", "WITH_GENERIC_TESTS", "WITH_SUBDIR", "VERBOSE")
