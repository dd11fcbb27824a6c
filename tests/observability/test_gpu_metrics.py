"""GPU metrics: absent (not zero) without NVML; real values where a GPU exists."""

from __future__ import annotations

import importlib.util
import shutil
import types

import pytest

from service.gpu_metrics import GpuCollector
from service.metrics import Metrics

GPU_NAMES = (
    "svertka_gpu_utilization_ratio",
    "svertka_gpu_memory_used_bytes",
    "svertka_gpu_memory_total_bytes",
)


def _names(m: Metrics) -> set[str]:
    return {f.name for f in m.registry.collect()}


@pytest.mark.skipif(importlib.util.find_spec("pynvml") is not None, reason="pynvml installed here")
def test_without_pynvml_gpu_series_are_absent() -> None:
    m = Metrics()
    assert not _names(m) & set(GPU_NAMES)
    assert "svertka_requests" in _names(m)


class _NoDriver(types.SimpleNamespace):
    """NVML as it behaves on a machine with the library but no driver: init raises."""

    def nvmlInit(self) -> None:
        raise RuntimeError("NVML Shared Library Not Found")


def test_nvml_init_failure_means_absent_and_is_not_retried_every_scrape() -> None:
    calls = []

    class Counting(_NoDriver):
        def nvmlInit(self) -> None:
            calls.append(1)
            super().nvmlInit()

    c = GpuCollector(nvml=Counting())
    assert list(c.collect()) == []
    assert list(c.collect()) == []
    assert len(calls) == 1


@pytest.mark.skipif(
    importlib.util.find_spec("pynvml") is None or shutil.which("nvidia-smi") is None,
    reason="needs pynvml and an NVIDIA driver",
)
def test_real_gpu_reports_memory_and_utilisation() -> None:
    m = Metrics()
    fams = {f.name: f for f in m.registry.collect()}
    total = fams["svertka_gpu_memory_total_bytes"].samples
    assert total and all(s.value > 1e9 for s in total)
    util = fams["svertka_gpu_utilization_ratio"].samples
    assert all(0.0 <= s.value <= 1.0 for s in util)
    assert {s.labels["gpu"] for s in util} == {s.labels["gpu"] for s in total}
