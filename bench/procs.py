"""Servers under test as subprocesses: free loopback ports, readiness polling, clean shutdown."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def free_port() -> int:
    """A loopback TCP port that is free now (the small race with other binders is acceptable here)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerFailed(RuntimeError):
    """A server under test exited or did not become ready; the message carries its log tail."""


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def running(
    cmd: list[str],
    *,
    log_path: Path,
    ready: Callable[[], bool],
    timeout_s: float,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    stop_timeout_s: float = 30.0,
) -> Iterator[subprocess.Popen]:
    """Start ``cmd`` in its own process group, wait until ``ready()`` is true, stop it on exit.

    Stopping sends SIGTERM to the group (a server's graceful drain) and SIGKILL
    after ``stop_timeout_s``: PyTriton starts a Triton binary and backend stubs
    as children, and none of them may outlive the benchmark.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise ServerFailed(
                    f"{cmd[0]} exited with {proc.returncode} before it was ready:\n{_tail(log_path)}"
                )
            with contextlib.suppress(Exception):
                if ready():
                    break
            if time.monotonic() > deadline:
                raise ServerFailed(f"{cmd[0]} was not ready after {timeout_s:.0f} s:\n{_tail(log_path)}")
            time.sleep(0.2)
        yield proc
    finally:
        _stop_group(proc, stop_timeout_s)


def _stop_group(proc: subprocess.Popen, timeout_s: float) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
    # The group may hold children even after the leader exited (Triton, its stubs).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
