"""How a batch reaches onnxruntime: one staging buffer per instance, padding, IO binding per padded size.

On the CPU provider without padded sizes (the default there) a batch is the
requests' rows concatenated and run as they are. Otherwise an instance owns one
staging buffer as large as its largest batch: the rows of every request in a
batch are gathered into it with one copy (from the request messages, or from
the frontends' shared-memory slabs) and the padding rows are zeroed, so no
per-batch buffer is allocated and no batch is copied twice.

* **CPU provider, padded sizes.** Each padded size's session has an IO binding
  made once, whose input is that size's view of the staging buffer:
  onnxruntime reads the rows where they were gathered.
* **CUDA / TensorRT.** The staging buffer is page-locked (:mod:`.pinned`), so
  the copy to the GPU is one DMA from it. Each padded size has a device input
  and a device output bound once; a batch is one host-to-device copy into the
  bound input, the run, and one device-to-host copy of the logits. Addresses
  that never change are what CUDA graphs need: each padded size's session
  captures its own graph on its first runs and replays it after. Without
  padded sizes (batches of any size) the rows still go to the GPU from the
  pinned buffer, with a binding made per batch.

A batch with more rows than the largest padded size (one request larger than
``max_batch_size`` runs alone) is run in chunks of the largest size, so no
session ever sees a shape it was not built and warmed up for.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from service import modelmeta
from service.engine import pinned

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Bound:
    """One padded size's binding, made once, and what it binds (kept alive with it)."""

    binding: ort.IOBinding
    host_input: ort.OrtValue | None  # CPU: a view of the staging buffer
    device_input: ort.OrtValue | None  # GPU: updated from the staging buffer per batch
    device_outputs: tuple[ort.OrtValue, ...] = ()


class BatchFeed:
    """Stages and runs batches for one instance (one thread at a time: the instance's worker)."""

    def __init__(
        self,
        meta: modelmeta.ModelMeta,
        default: ort.InferenceSession,
        by_size: Mapping[int, ort.InferenceSession],
        *,
        device: bool,
        capacity: int,
        label: str,
        pin: bool = True,
    ) -> None:
        self._meta = meta
        self._input = meta.input_name
        #: The classifier's output, then the graph's others (packed into one array per run).
        self._outputs = [meta.output_name, *(name for name, _, _ in meta.extra_outputs)]
        self._default = default
        self._by_size = dict(by_size)
        self._device = device
        #: The padded sizes, ascending (empty: batches run at their own size).
        self.sizes = tuple(sorted(self._by_size))
        self._staging: np.ndarray | None = None
        self._staged: np.ndarray | None = None  # the view stage() handed out, until run() takes it
        self._bound: dict[int, _Bound] = {}
        #: The page lock on the staging buffer (GPU providers), or None.
        self.pinned: pinned.Registration | None = None
        #: Why the staging buffer is not page-locked ("" when it is, or when no GPU provider runs).
        self.pinned_failure = ""
        if not device and not self.sizes:
            return
        rows = max(self.sizes) if self.sizes else capacity
        self._staging = np.zeros((rows, *meta.input_shape), dtype=meta.input_dtype)
        if device and not pin:
            self.pinned_failure = "pinned_memory: false"
            log.info("%s: batches go to the GPU from pageable memory (pinned_memory: false)", label)
        elif device:
            self.pinned, self.pinned_failure = pinned.register(self._staging)
            if self.pinned is None:
                log.warning("%s: batches go to the GPU from pageable memory: %s", label, self.pinned_failure)
        for size, session in self._by_size.items():
            self._bound[size] = self._bind(session, size, meta)

    @property
    def capacity(self) -> int:
        """Rows the staging buffer holds (0: no staging buffer)."""
        return 0 if self._staging is None else len(self._staging)

    def _bind(self, session: ort.InferenceSession, size: int, meta: modelmeta.ModelMeta) -> _Bound:
        binding = session.io_binding()
        assert self._staging is not None
        if not self._device:
            host = ort.OrtValue.ortvalue_from_numpy(self._staging[:size])  # shares the staging memory
            binding.bind_ortvalue_input(self._input, host)
            for name in self._outputs:
                binding.bind_output(name, "cpu")
            return _Bound(binding, host, None)
        shape = (size, *meta.input_shape)
        device_input = ort.OrtValue.ortvalue_from_shape_and_type(shape, self._staging.dtype, "cuda", 0)
        binding.bind_ortvalue_input(self._input, device_input)
        specs = [(meta.output_name, "float32", (meta.num_classes,)), *meta.extra_outputs]
        device_outputs = []
        for name, dtype, dims in specs:
            value = ort.OrtValue.ortvalue_from_shape_and_type((size, *dims), np.dtype(dtype), "cuda", 0)
            binding.bind_ortvalue_output(name, value)
            device_outputs.append(value)
        return _Bound(binding, None, device_input, tuple(device_outputs))

    def padded_size(self, rows: int) -> int:
        """The size a batch of ``rows`` runs at: the next padded size, or ``rows`` itself."""
        return next((b for b in self.sizes if b >= rows), rows)

    def stage(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """The batch's input: the rows of ``arrays`` in order, then zero rows up to its padded size.

        Written into the staging buffer where there is one and the batch fits (the returned view
        is valid until the next ``stage``); otherwise the rows concatenated (one array as it is).
        """
        rows = sum(len(a) for a in arrays)
        size = self.padded_size(rows)
        if self._staging is None or size > len(self._staging):
            self._staged = None
            return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
        batch = self._staging[:size]
        np.concatenate(arrays, axis=0, out=batch[:rows])
        batch[rows:] = 0
        self._staged = batch
        return batch

    def run(self, batch: np.ndarray) -> np.ndarray:
        """The output rows for ``batch`` (as many as it has, padding included): float32 logits, with
        the graph's other outputs packed after them (``modelmeta.pack_outputs``). Blocking."""
        staged, self._staged = self._staged, None
        if batch is not staged and self._staging is not None:
            if len(batch) > len(self._staging):
                return self._run_chunks(batch)
            batch = self.stage([batch])  # rows that were not gathered here (warm-up, a direct call)
            self._staged = None
        bound = self._bound.get(len(batch))
        if bound is not None:
            if bound.device_input is not None:
                bound.device_input.update_inplace(batch)
            self._by_size[len(batch)].run_with_iobinding(bound.binding)
            return modelmeta.pack_outputs(self._meta, bound.binding.copy_outputs_to_cpu())
        if self._device:
            return self._run_on_device(self._default, batch)
        return modelmeta.pack_outputs(self._meta, self._default.run(self._outputs, {self._input: batch}))

    def _run_chunks(self, batch: np.ndarray) -> np.ndarray:
        step = len(self._staging)  # type: ignore[arg-type]
        outputs = []
        for start in range(0, len(batch), step):
            chunk = batch[start : start + step]
            outputs.append(self.run(self.stage([chunk]))[: len(chunk)])
        return np.concatenate(outputs, axis=0)

    def _run_on_device(self, session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
        """A batch of any size on the GPU: copied from (pinned) host memory, output allocated there."""
        binding = session.io_binding()
        binding.bind_ortvalue_input(self._input, ort.OrtValue.ortvalue_from_numpy(batch, "cuda", 0))
        for name in self._outputs:
            binding.bind_output(name, "cuda", 0)
        session.run_with_iobinding(binding)
        return modelmeta.pack_outputs(self._meta, binding.copy_outputs_to_cpu())

    def close(self) -> None:
        """Drop the bindings and sessions, then unlock the staging buffer."""
        self._bound = {}
        self._by_size = {}
        self._default = None  # type: ignore[assignment]
        self._staged = None
        if self.pinned is not None:
            self.pinned.release()
            self.pinned = None
        self._staging = None
