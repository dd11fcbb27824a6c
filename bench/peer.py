"""Launching the peer (Triton through PyTriton, ``bench/peer_server.py``) in its own virtualenv."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from bench.procs import free_port, running

REPO_ROOT = Path(__file__).resolve().parent.parent
PEER_VENV = REPO_ROOT / ".bench" / "pytriton-venv"


@dataclasses.dataclass(frozen=True)
class Peer:
    grpc_url: str
    http_url: str
    metrics_url: str
    #: The launcher's pid; Triton and its Python backend stubs run as its descendants.
    pid: int

    def model_stats(self, name: str) -> dict:
        """Triton's ModelStatistics for ``name`` through its HTTP API (no tritonclient needed)."""
        with urllib.request.urlopen(f"{self.http_url}/v2/models/{name}/stats", timeout=10) as r:
            (stats,) = json.load(r)["model_stats"]
        return stats


def setup() -> None:
    """Create the peer's venv (``bench/setup_peer.sh``; a no-op when it already works)."""
    subprocess.run(["bash", str(REPO_ROOT / "bench" / "setup_peer.sh")], check=True)


def versions() -> dict[str, str]:
    out = subprocess.run(
        [
            str(PEER_VENV / "bin" / "python"),
            "-c",
            "import importlib.metadata as m, json; "
            "print(json.dumps({p: m.version(p) for p in ('nvidia-pytriton', 'onnxruntime', 'numpy')}))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def _env() -> dict[str, str]:
    """PyTriton's Python-backend stub must load this interpreter's libpython, not Debian's.

    With the system libpython first on the search path the stub fails at start
    with an ``_thread.RLock`` AttributeError; the base interpreter's ``lib/``
    first fixes it.
    """
    base = subprocess.run(
        [str(PEER_VENV / "bin" / "python"), "-c", "import sys; print(sys.base_prefix)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        [str(Path(base) / "lib"), *filter(None, [env.get("LD_LIBRARY_PATH")])]
    )
    env.pop("PYTHONPATH", None)
    return env


@contextlib.contextmanager
def serve(
    model_path: Path,
    name: str,
    *,
    threads: int,
    max_batch_size: int,
    max_queue_delay_ms: float,
    log_path: Path,
    timeout_s: float = 180.0,
) -> Iterator[Peer]:
    """Serve ``model_path`` as ``name`` with Triton's dynamic batcher until the block exits."""
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    cmd = [
        str(PEER_VENV / "bin" / "python"),
        str(REPO_ROOT / "bench" / "peer_server.py"),
        "--model", str(model_path), "--name", name,
        "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", str(metrics_port),
        "--max-batch-size", str(max_batch_size),
        "--max-queue-delay-us", str(round(max_queue_delay_ms * 1000)),
        "--threads", str(threads),
    ]  # fmt: skip
    http_url = f"http://127.0.0.1:{http_port}"

    def ready() -> bool:
        with urllib.request.urlopen(f"{http_url}/v2/models/{name}/ready", timeout=2) as r:
            return r.status == 200

    with running(cmd, log_path=log_path, ready=ready, timeout_s=timeout_s, env=_env()) as proc:
        yield Peer(f"127.0.0.1:{grpc_port}", http_url, f"127.0.0.1:{metrics_port}/metrics", proc.pid)
