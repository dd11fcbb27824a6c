"""GPU utilisation and memory through NVML, only where NVML exists.

Without ``pynvml`` (the ``gpu`` extra's ``nvidia-ml-py``) or without a GPU
and driver the collector yields nothing: the series are *absent*, never a
misleading 0 % utilisation. NVML is initialised lazily on the first scrape
and retried at most once a minute, so a server started before the driver is
up still reports GPUs later.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

_RETRY_S = 60.0


class GpuCollector(Collector):
    """Per-GPU utilisation, memory used/total and temperature, labelled by index, name and UUID."""

    def __init__(self, nvml: Any | None = None) -> None:
        self._nvml = nvml  # injectable module (tests on machines with a GPU pass the real pynvml)
        self._ready = False
        self._next_try = 0.0
        self._lock = threading.Lock()

    def describe(self) -> list:
        # Nothing to describe up front: whether series exist depends on the machine.
        return []

    def _init(self) -> bool:
        with self._lock:
            if self._ready:
                return True
            now = time.monotonic()
            if now < self._next_try:
                return False
            self._next_try = now + _RETRY_S
            try:
                if self._nvml is None:
                    import pynvml

                    self._nvml = pynvml
                self._nvml.nvmlInit()
            except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded...
                log.debug("NVML unavailable, GPU metrics absent: %s", exc)
                return False
            self._ready = True
            return True

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if not self._init():
            return
        nv = self._nvml
        labels = ("gpu", "name", "uuid")
        util = GaugeMetricFamily(
            "svertka_gpu_utilization_ratio",
            "Fraction of the last sample period a kernel ran on the GPU (NVML), 0..1.",
            labels=labels,
        )
        mem_used = GaugeMetricFamily(
            "svertka_gpu_memory_used_bytes", "GPU memory in use (NVML).", labels=labels
        )
        mem_total = GaugeMetricFamily(
            "svertka_gpu_memory_total_bytes", "GPU memory in total (NVML).", labels=labels
        )
        temp = GaugeMetricFamily(
            "svertka_gpu_temperature_celsius", "GPU core temperature (NVML).", labels=labels
        )
        try:
            count = nv.nvmlDeviceGetCount()
            for i in range(count):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                name = nv.nvmlDeviceGetName(h)
                uuid = nv.nvmlDeviceGetUUID(h)
                name = name.decode() if isinstance(name, bytes) else str(name)
                uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
                lv = (str(i), name, uuid)
                rates = nv.nvmlDeviceGetUtilizationRates(h)
                util.add_metric(lv, rates.gpu / 100.0)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                mem_used.add_metric(lv, float(mem.used))
                mem_total.add_metric(lv, float(mem.total))
                try:
                    temp.add_metric(lv, float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)))
                except Exception:  # not every board reports it (MIG slices, some SKUs)
                    pass
        except Exception as exc:
            # A GPU fell off the bus or the driver went away: report nothing rather than stale numbers.
            log.warning("NVML query failed, GPU metrics skipped this scrape: %s", exc)
            return
        yield util
        yield mem_used
        yield mem_total
        if temp.samples:
            yield temp
