"""bench.research.grpc_stacks: the no-op servers answer perf_analyzer like a model server, and are metered per request."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from bench import perf
from bench.research import grpc_stacks

# Each test starts a no-op gRPC server process and drives it with perf_analyzer.
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not perf.perf_analyzer_path().is_file(), reason="perf_analyzer is not installed"),
]


def _rows(capsys, argv: list[str]) -> list[dict]:
    assert grpc_stacks.main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_perf_analyzer_drives_the_python_no_op_server_and_both_sides_are_metered(capsys):
    rows = _rows(capsys, ["--stacks", "aio", "--client", "perf_analyzer", "--concurrency", "1", "2",
                          "--seconds", "1", "--repeats", "1"])  # fmt: skip
    assert [(r["stack"], r["size"], r["concurrency"]) for r in rows] == [("aio", 224, 1), ("aio", 224, 2)]
    for row in rows:
        assert row["requests_per_s"] > 0 and row["p50_ms"] > 0
        # A 588 KiB request costs both processes some CPU: more than nothing, less than a second.
        assert 0 < row["server_cpu_us_per_request"] < 1e6
        assert 0 < row["client_cpu_us_per_request"] < 1e6


def _has_debian_grpc() -> bool:
    tools = all(shutil.which(t) for t in ("protoc", "grpc_cpp_plugin", "pkg-config", "g++"))
    return tools and subprocess.run(["pkg-config", "--exists", "grpc++"]).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(
    not _has_debian_grpc(), reason="needs apt-get install libgrpc++-dev protobuf-compiler-grpc"
)
def test_the_cpp_floor_builds_and_answers_the_same_requests(capsys):
    rows = _rows(capsys, ["--stacks", "cpp", "--client", "perf_analyzer", "--concurrency", "1",
                          "--seconds", "1", "--repeats", "1"])  # fmt: skip
    (row,) = rows
    assert row["stack"] == "cpp" and row["requests_per_s"] > 0
    assert 0 < row["server_cpu_us_per_request"] < 1e6
