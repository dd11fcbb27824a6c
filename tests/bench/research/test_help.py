"""The research scripts answer ``--help`` with their usage, at once, instead of starting a run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("module", ["omp_wait_policy", "exporter_comparison"])
def test_help_prints_the_usage_and_exits_0_without_loading_torch(module):
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", f"bench.research.{module}", "--help"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith(f"usage: python -m bench.research.{module} [-h]")
    assert "(needs torch)" in run.stdout  # the module's description
    # -X importtime writes one stderr line per import: no torch means no run was started.
    assert not re.search(r"\|\s+torch$", run.stderr, re.M)
