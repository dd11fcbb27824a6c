"""The process's open-file limit: raised at start-up, readable by anything that must stay under it.

Every client connection, every registered shared-memory region and every
model file holds a file descriptor. Linux starts processes with a soft limit
of 1024 (what most shells and container runtimes hand down) while the hard
limit is usually far higher, so ``serve`` raises the soft limit to the hard
one, up to ``OPEN_FILES_CAP``: an unlimited or enormous hard limit would let
one client's leak grow until the whole node suffers.
"""

from __future__ import annotations

import logging

try:
    import resource
except ImportError:  # pragma: no cover - not on Linux/macOS
    resource = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

#: The soft limit is raised to the hard limit, but never above this.
OPEN_FILES_CAP = 65536


def open_files_limit() -> int | None:
    """The soft RLIMIT_NOFILE now (None where the platform has none, or it is unlimited)."""
    if resource is None:
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def raise_open_files_limit(cap: int = OPEN_FILES_CAP) -> int | None:
    """Raise the soft RLIMIT_NOFILE to the hard limit (at most ``cap``; never lowered); the result.

    Logs the outcome at INFO (a failure to raise at WARNING: the server still runs).
    """
    if resource is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = cap if hard == resource.RLIM_INFINITY else min(int(hard), cap)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("open files limit: could not raise the soft limit %d to %d: %s", soft, target, exc)
        else:
            log.info(
                "open files limit: raised the soft limit from %d to %d (hard %s)", soft, target, _show(hard)
            )
            return target
    log.info("open files limit: %s (hard %s; not changed)", _show(soft), _show(hard))
    return open_files_limit()


def _show(limit: int) -> str:
    return "unlimited" if resource is not None and limit == resource.RLIM_INFINITY else str(limit)
