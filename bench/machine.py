"""What the numbers were measured on: CPU, cores, memory, versions, and how busy the machine was."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(
                    f for f in ("avx2", "avx512f", "avx512_vnni", "amx_int8", "amx_bf16") if f in flags
                )
    except OSError:
        pass
    return []


def _mem_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str:
    """HEAD's short hash; ``BENCH_GIT_COMMIT`` where the tree was copied without git (a GPU machine)."""
    if os.environ.get("BENCH_GIT_COMMIT"):
        return os.environ["BENCH_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def describe() -> dict:
    from service import config

    return {
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cpus_usable": config.default_intra_op_threads(),
        "memory_gib": round(_mem_gib(), 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "versions": {
            d: _version(d)
            for d in ("svertka", "onnxruntime", "numpy", "grpcio", "protobuf", "pillow", "simplejpeg")
        },
    }


def load_average() -> tuple[float, float, float]:
    """1/5/15-minute load averages: on a shared machine, the measure of how noisy a run was."""
    return os.getloadavg()
