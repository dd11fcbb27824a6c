"""A small Dockerfile reader: enough to check what the images do without docker.

Instructions are joined across backslash continuations, comments dropped,
and grouped into stages by FROM; ``ARG`` defaults before the first FROM are
substituted into FROM lines.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path


@dataclasses.dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]]

    def all(self, keyword: str) -> list[str]:
        return [args for key, args in self.instructions if key == keyword]

    def one(self, keyword: str) -> str:
        (args,) = self.all(keyword)
        return args


def instructions(text: str) -> list[tuple[str, str]]:
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        lines.append(current)
        current = ""
    result = []
    for line in lines:
        keyword, _, args = line.partition(" ")
        result.append((keyword.upper(), args.strip()))
    return result


def stages(path: Path) -> list[Stage]:
    global_args: dict[str, str] = {}
    found: list[Stage] = []
    for keyword, args in instructions(path.read_text()):
        if keyword == "FROM":
            parts = args.split()
            base = re.sub(r"\$\{(\w+)\}", lambda mo: global_args.get(mo.group(1), mo.group(0)), parts[0])
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else str(len(found))
            found.append(Stage(name, base, []))
        elif not found:
            if keyword == "ARG" and "=" in args:
                key, _, value = args.partition("=")
                global_args[key] = value.strip('"')
        else:
            found[-1].instructions.append((keyword, args))
    return found


def exec_form(args: str) -> list[str]:
    """JSON (exec) form of ENTRYPOINT/CMD/HEALTHCHECK CMD; raises if it is shell form."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(x, str) for x in value), args
    return value


def run_words(stage: Stage) -> list[list[str]]:
    """Each RUN as shell words (mount flags included), for simple command checks."""
    return [shlex.split(args) for args in stage.all("RUN")]
