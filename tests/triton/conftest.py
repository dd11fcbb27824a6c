"""A ``svertka serve`` subprocess for tritonclient and perf_analyzer tests.

tritonclient registers its own ``inference`` protos in the default
descriptor pool, which clashes with service.gen.inference: so the server
runs in another process and nothing here imports service.gen.inference.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.target import ServerProcess
from service import perf_cli
from tests.helpers.layouts import LAYOUTS, layout_args
from tests.helpers.tinymodel import make_repository


@pytest.fixture(scope="session")
def repository(tmp_path_factory) -> Path:
    """``tiny`` (10 classes, 32x32) with a batch window wide enough to batch concurrent callers."""
    root = make_repository(tmp_path_factory.mktemp("repo"), {"tiny": [1]})
    (root / "tiny" / "config.yaml").write_text("max_batch_size: 16\nmax_queue_delay_ms: 10\n")
    return root


@pytest.fixture(scope="session", params=LAYOUTS)
def server(request, repository, tmp_path_factory) -> ServerProcess:
    """The server in each layout: one process, and ``--frontends 2`` (tritonclient's and
    perf_analyzer's connections then land on either frontend)."""
    proc = ServerProcess(
        repository,
        tmp_path_factory.mktemp("logs") / "server.log",
        "--allow-shared-memory",
        *layout_args(request.param),
    )
    proc.start().wait_serving()
    yield proc
    code = proc.stop()
    assert code == 0, proc.log()


@pytest.fixture(scope="session", autouse=True)
def _never_load_our_inference_protos():
    """Guard the rule above: a test here that pulls in service.gen.inference fails the session."""
    yield
    leaked = sorted(m for m in sys.modules if m.startswith("service.gen.inference"))
    assert not leaked, f"tests/triton imported {leaked}; talk to a subprocess server instead"


def run_perf_analyzer(
    address: str, model: str, levels: str, report: Path, *extra: str
) -> list[tuple[int, float]]:
    """perf_analyzer against ``address`` at concurrency ``levels`` ("1:4"): (concurrency, inferences/s)
    per level. It checks that perf_analyzer works against svertka, not how fast: any stability is
    accepted, so a busy CI machine (noisy windows) cannot fail it."""
    binary = perf_cli.perf_analyzer_path()
    if not binary.is_file():
        pytest.skip("perf_analyzer is not installed (tritonclient[grpc]==2.41.0 bundles it)")
    env = perf_cli.environment()  # libcudart.so.12 on the library path, as ``svertka perf`` sets it
    command = [
        str(binary), "-i", "grpc", "-u", address, "-m", model, "--concurrency-range", levels,
        "--measurement-interval", "500", "--stability-percentage", "1000", "--max-trials", "10",
        "-f", str(report), *extra,
    ]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = report.read_text().strip().splitlines()
    assert rows[0].startswith("Concurrency,Inferences/Second"), run.stdout
    # one row per concurrency level (perf_analyzer sorts them by throughput)
    return sorted((int(r.split(",")[0]), float(r.split(",")[1])) for r in rows[1:])
