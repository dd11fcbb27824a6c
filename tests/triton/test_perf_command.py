"""``svertka perf -- ARGS``: the bundled perf_analyzer, started as the docs show it, measures a served model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service import perf_cli
from tests.helpers.layouts import LAYOUTS

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not perf_cli.perf_analyzer_path().is_file(), reason="perf_analyzer is not installed"),
]

SVERTKA = Path(sys.executable).parent / "svertka"


@pytest.mark.parametrize("server", LAYOUTS[:1], indirect=True)  # the command, not the layouts
def test_svertka_perf_measures_a_served_model_from_a_bare_environment(server, tmp_path):
    # What a newcomer's shell has: no LD_LIBRARY_PATH, no PERF_ANALYZER. Run bare, this binary
    # stops at "libcudart.so.12: cannot open shared object file".
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", perf_cli.BINARY_ENV)}
    report = tmp_path / "perf.csv"
    run = subprocess.run(
        [
            SVERTKA, "perf", "--", "-i", "grpc", "-u", server.address, "-m", "tiny", "--input-data", "zero",
            "--concurrency-range", "2", "--measurement-interval", "500", "--stability-percentage", "1000",
            "--max-trials", "10", "-f", report,
        ],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    header, *rows = report.read_text().strip().splitlines()
    assert header.startswith("Concurrency,Inferences/Second")
    assert len(rows) == 1 and rows[0].split(",")[0] == "2" and float(rows[0].split(",")[1]) > 0
