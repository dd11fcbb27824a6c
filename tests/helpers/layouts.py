"""The server layouts that the tests starting a ``svertka serve`` subprocess run against.

No imports beyond the standard library: tests/triton uses it, and must not load svertka's own
``inference`` protos (they clash with tritonclient's).
"""

from __future__ import annotations

#: The whole server in one process, and a supervisor with one engine process and two frontend
#: processes (``svertka serve --frontends 2``).
LAYOUTS = ("one-process", "frontends-2")


def layout_args(layout: str) -> tuple[str, ...]:
    """``svertka serve`` flags for one of LAYOUTS."""
    return () if layout == "one-process" else ("--frontends", "2", "--frontend-shm-mib", "64")
