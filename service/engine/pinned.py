"""Page-locked host buffers, so that a batch goes to the GPU as one DMA.

A copy from pageable memory makes the CUDA driver stage it through a pinned
bounce buffer of its own, chunk by chunk; a registered buffer is read by the
copy engine directly. :func:`register` page-locks an existing numpy buffer with
``cudaHostRegister`` (from cuda-python's ``cuda.bindings``, in the ``gpu``
extra) and :meth:`Registration.release` unlocks it before the buffer goes.

Pinning is an optimisation and never a reason to refuse a model: without
``cuda.bindings``, a driver or a device (a CPU host), or when the driver
refuses (a locked-memory limit), :func:`register` returns no registration and
the reason; the caller logs it and copies from pageable memory.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)


class Registration:
    """One page-locked buffer; :meth:`release` unlocks it (idempotent)."""

    def __init__(self, runtime: object, buffer: np.ndarray) -> None:
        self._runtime = runtime
        self._buffer: np.ndarray | None = buffer
        self.nbytes = buffer.nbytes

    @property
    def active(self) -> bool:
        return self._buffer is not None

    def release(self) -> None:
        buffer, self._buffer = self._buffer, None
        if buffer is None:
            return
        (err,) = self._runtime.cudaHostUnregister(buffer.ctypes.data)  # type: ignore[attr-defined]
        if int(err) != 0:  # the buffer is freed either way; the driver's page lock goes with the process
            log.warning("cudaHostUnregister of a %d-byte batch buffer failed: %s", self.nbytes, _name(err))


def register(buffer: np.ndarray) -> tuple[Registration | None, str]:
    """Page-lock ``buffer`` (C-contiguous) until the registration is released: (registration, "") or (None, why)."""
    if not buffer.flags.c_contiguous or buffer.nbytes == 0:
        raise ValueError("register: expected a non-empty C-contiguous buffer")
    try:
        from cuda.bindings import runtime
    except ImportError:
        return None, "cuda-python (cuda.bindings) is not installed; install svertka's gpu extra"
    (err,) = runtime.cudaHostRegister(buffer.ctypes.data, buffer.nbytes, runtime.cudaHostRegisterDefault)
    if int(err) != 0:
        return None, f"cudaHostRegister of {buffer.nbytes} bytes failed: {_name(err)}"
    return Registration(runtime, buffer), ""


def _name(err: object) -> str:
    return getattr(err, "name", str(err))
