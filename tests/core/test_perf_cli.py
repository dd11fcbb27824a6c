"""``svertka perf``: one line naming what is missing when perf_analyzer or its libcudart is not installed.

Each case runs the command in a virtual environment of its own, whose bin/ holds no perf_analyzer;
it imports the project's packages through PYTHONPATH, all of them or all but the one under test,
so what the project's .venv holds cannot hide a missing piece.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from service import perf_cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bare_venv(tmp_path) -> Path:
    """A venv without pip or packages of its own; its bin/ has no perf_analyzer."""
    venv = tmp_path / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", venv], check=True, timeout=60)
    return venv


def _site(venv: Path, *, without: str = "") -> Path:
    """The project venv's packages as links in one folder, less the top-level package ``without``."""
    site = venv / "site"
    site.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if entry.name != without:
            (site / entry.name).symlink_to(entry)
    return site


def _perf(venv: Path, *args: str, without: str = "", **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", perf_cli.BINARY_ENV)}
    pythonpath = f"{ROOT}:{_site(venv, without=without)}"
    environ |= {"PYTHONPATH": pythonpath, "PATH": f"{venv / 'bin'}:/usr/bin:/bin", **env}
    return subprocess.run(
        [venv / "bin" / "python", "-m", "service", "perf", "--", *args],
        env=environ, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip


def _one_line_error(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stdout == "" and len(run.stderr.splitlines()) == 1, run.stderr
    assert run.stderr.startswith("svertka perf: error: ")
    return run.stderr.strip()


def test_without_perf_analyzer_it_says_what_to_install(bare_venv):
    line = _one_line_error(_perf(bare_venv, "-m", "digits"))
    assert f"perf_analyzer is not installed (no {bare_venv / 'bin' / 'perf_analyzer'})" in line
    assert "tritonclient[grpc]" in line and "PERF_ANALYZER" in line


def test_a_perf_analyzer_named_by_the_environment_must_exist(bare_venv, tmp_path):
    line = _one_line_error(_perf(bare_venv, "-m", "digits", PERF_ANALYZER=str(tmp_path / "nowhere")))
    assert line.endswith(f"PERF_ANALYZER={tmp_path / 'nowhere'}: no such file")


@pytest.mark.skipif(not perf_cli.perf_analyzer_path().is_file(), reason="perf_analyzer is not installed")
def test_without_the_cuda_runtime_wheel_it_says_what_to_install(bare_venv):
    # The real binary in the bare venv, and every package but nvidia.* (nvidia-cuda-runtime-cu12's).
    (bare_venv / "bin" / "perf_analyzer").symlink_to(perf_cli.perf_analyzer_path())
    line = _one_line_error(_perf(bare_venv, "--version", without="nvidia"))
    assert "perf_analyzer needs libcudart.so.12" in line and "nvidia-cuda-runtime-cu12" in line


@pytest.mark.skipif(not perf_cli.perf_analyzer_path().is_file(), reason="perf_analyzer is not installed")
def test_the_arguments_after_the_double_dash_reach_perf_analyzer():
    # The project's venv: perf_analyzer and the wheel are there; --version answers without a server.
    environ = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", perf_cli.BINARY_ENV)}
    run = subprocess.run(
        [Path(sys.executable).parent / "svertka", "perf", "--", "--version"],
        env=environ, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Perf Analyzer Version" in run.stdout + run.stderr
