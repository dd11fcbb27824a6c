"""The model repository's layout: one set of rules for the server and the exporter.

::

    <repository>/<name>/config.yaml | config.yml | config.json   optional ModelSettings (the first found)
    <repository>/<name>/<version>/model.onnx

* ``<name>``: 1 to 128 characters from ``[A-Za-z0-9_.-]``, starting with a
  letter or a digit, without ``..``: one path component that no request can
  turn into a path outside the repository, and a valid metric label value.
* ``<version>``: ASCII decimal digits without leading zeros, from 1 to
  2**63 - 1 (the largest version the KServe/Triton protocol and its clients
  carry as an int64). One version has one spelling: ``01`` is not version 1,
  ``²`` (a Unicode digit Python's ``str.isdigit`` accepts) is no version, and
  ``99999999999999999999999`` is no version; such directories are not
  served (the server logs that it skips them). The same rule applies to a
  version string in a request.

This module imports nothing beyond the standard library (no grpc, no
onnxruntime, no torch), so that ``export/`` and ``service/`` can share it.
Callers raise their own error types with :data:`NAME_RULE` /
:data:`VERSION_RULE` in the message.
"""

from __future__ import annotations

import re
from pathlib import Path

MODEL_FILE = "model.onnx"
#: Per-model settings files, in the order they are looked for (the first that exists is read).
CONFIG_FILES = ("config.yaml", "config.yml", "config.json")

MAX_NAME_CHARS = 128
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
NAME_RULE = "1-128 characters from [A-Za-z0-9_.-], starting with a letter or digit, without '..'"

MAX_VERSION = 2**63 - 1
_VERSION_RE = re.compile(r"[1-9][0-9]{0,18}")
VERSION_RULE = f"a decimal integer from 1 to {MAX_VERSION} without leading zeros"


def is_valid_name(name: object) -> bool:
    """Whether ``name`` may name a model (a str that follows :data:`NAME_RULE`)."""
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None and ".." not in name


def is_version(value: object) -> bool:
    """Whether ``value`` is a version number: an int (not a bool) from 1 to :data:`MAX_VERSION`."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_VERSION


def parse_version(text: object) -> int | None:
    """The version a directory name or version string spells, or None if it is not one (:data:`VERSION_RULE`)."""
    if not isinstance(text, str) or _VERSION_RE.fullmatch(text) is None:
        return None
    version = int(text)
    return version if version <= MAX_VERSION else None


def looks_like_version(text: str) -> bool:
    """A name someone meant as a version (all digits, any script) that :func:`parse_version` refuses."""
    return text.isdigit() and parse_version(text) is None


def model_dir(repository: str | Path, name: str) -> Path:
    return Path(repository) / name


def version_dir(repository: str | Path, name: str, version: int) -> Path:
    return Path(repository) / name / str(version)


def model_path(repository: str | Path, name: str, version: int) -> Path:
    return version_dir(repository, name, version) / MODEL_FILE


def versions(directory: str | Path, *, with_model: bool = True) -> list[int]:
    """Versions in a model directory, ascending: version directories holding a model file
    (``with_model``), or every version directory (the exporter: an empty one is taken too)."""
    found = []
    try:
        children = list(Path(directory).iterdir())
    except OSError:
        return []
    for child in children:
        version = parse_version(child.name)
        if version is None:
            continue
        if (child / MODEL_FILE).is_file() if with_model else child.is_dir():
            found.append(version)
    return sorted(found)


def misnamed_versions(directory: str | Path) -> list[str]:
    """Directory names in a model directory that look like versions but break :data:`VERSION_RULE`."""
    try:
        return sorted(c.name for c in Path(directory).iterdir() if looks_like_version(c.name) and c.is_dir())
    except OSError:
        return []


def config_file(directory: str | Path) -> Path | None:
    """The model's settings file (the first of :data:`CONFIG_FILES` present), or None."""
    for name in CONFIG_FILES:
        path = Path(directory) / name
        if path.is_file():
            return path
    return None
