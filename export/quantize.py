"""Static int8 quantization (QDQ, per-channel weights) with an accuracy gate.

onnxruntime's own tools do the work: ``quant_pre_process`` (shape inference
and graph optimisation) and ``quantize_static`` with MinMax calibration on
training images preprocessed exactly as the server will preprocess requests.
Activations are uint8 (asymmetric), weights int8 per output channel: the
combination onnxruntime's x86 kernels (VNNI/AMX) run fastest.

The gate: fp32 and int8 are both evaluated with onnxruntime on the same val
images; when int8 top-1 is more than ``max_drop`` points below fp32 nothing is
written unless ``force``. The speed-up is measured on this machine and
reported, never assumed.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from export import verify
from export.errors import AccuracyGateError, ExportError
from service.modelmeta import INPUT_NAME, ModelMeta, attach

log = logging.getLogger(__name__)

MIN_CALIBRATION_IMAGES = 100
DEFAULT_CALIBRATION_IMAGES = 200
DEFAULT_MAX_DROP_POINTS = 1.0
#: int8 QDQ logits are not bit-identical across batch sizes (kernels may pick
#: different paths); the int8 batch-invariance check uses this looser bound.
INT8_INVARIANCE_ATOL = 1e-3


@dataclasses.dataclass(frozen=True)
class Speed:
    batch1_ms_fp32: float
    batch1_ms_int8: float
    batch_size: int
    throughput_fp32: float  # images/s at batch_size
    throughput_int8: float

    @property
    def speedup_batch1(self) -> float:
        return self.batch1_ms_fp32 / self.batch1_ms_int8

    @property
    def speedup_batched(self) -> float:
        return self.throughput_int8 / self.throughput_fp32

    def summary(self) -> str:
        return (
            f"batch 1: fp32 {self.batch1_ms_fp32:.2f} ms, int8 {self.batch1_ms_int8:.2f} ms "
            f"(x{self.speedup_batch1:.2f}); batch {self.batch_size}: fp32 {self.throughput_fp32:.0f} img/s, "
            f"int8 {self.throughput_int8:.0f} img/s (x{self.speedup_batched:.2f})"
        )


@dataclasses.dataclass(frozen=True)
class QuantizeResult:
    model_bytes: bytes
    meta: ModelMeta
    fp32_top1: float
    int8_top1: float
    speed: Speed | None
    gate_passed: bool

    @property
    def drop_points(self) -> float:
        return 100 * (self.fp32_top1 - self.int8_top1)


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over an in-memory array."""

    def __init__(self, images: np.ndarray, batch_size: int = 32) -> None:
        self._batches = iter([images[i : i + batch_size] for i in range(0, len(images), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}

    def rewind(self) -> None:  # pragma: no cover - only used by some calibrators
        raise NotImplementedError


def quantize_bytes(fp32: bytes, calibration: np.ndarray) -> bytes:
    """The int8 QDQ model (metadata not yet attached)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) < MIN_CALIBRATION_IMAGES:
        raise ExportError(
            f"calibration needs at least {MIN_CALIBRATION_IMAGES} training images, got {len(calibration)}"
        )
    with tempfile.TemporaryDirectory(prefix="svertka-quant-") as tmp:
        src, pre, out = Path(tmp, "fp32.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "int8.onnx")
        src.write_bytes(fp32)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
        quantize_static(
            str(pre),
            str(out),
            _Calibration(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        return out.read_bytes()


def _median_ms(sess, images: np.ndarray, seconds: float, min_runs: int) -> float:
    feeds = {INPUT_NAME: images}
    for _ in range(3):
        sess.run(None, feeds)
    times = []
    deadline = time.perf_counter() + seconds
    while len(times) < min_runs or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
        if len(times) >= 10_000:
            break
    return 1000 * statistics.median(times)


def measure_speed(
    fp32: bytes, int8: bytes, images: np.ndarray, batch_size: int = 32, seconds: float = 1.0
) -> Speed:
    """Median latency at batch 1 and throughput at ``batch_size``, both models, alternating."""
    f, q = verify.session(fp32), verify.session(int8)
    one = images[:1]
    batch = np.resize(images, (batch_size, *images.shape[1:])).astype(np.float32)
    b1_f = _median_ms(f, one, seconds, 20)
    b1_q = _median_ms(q, one, seconds, 20)
    bn_f = _median_ms(f, batch, seconds, 5)
    bn_q = _median_ms(q, batch, seconds, 5)
    return Speed(b1_f, b1_q, batch_size, 1000 * batch_size / bn_f, 1000 * batch_size / bn_q)


def quantize(
    fp32: bytes,
    meta: ModelMeta,
    calibration: np.ndarray,
    val_images: np.ndarray,
    val_targets: np.ndarray,
    max_drop: float = DEFAULT_MAX_DROP_POINTS,
    force: bool = False,
    speed: bool = True,
) -> QuantizeResult:
    """Quantize, evaluate both precisions and apply the gate; raises :class:`AccuracyGateError`."""
    if meta.precision != "fp32":
        raise ExportError(f"the input model is {meta.precision}; quantize an fp32 model")
    if len(val_images) == 0:
        raise ExportError("no validation images to measure the int8 accuracy on")
    t0 = time.perf_counter()
    int8 = quantize_bytes(fp32, calibration)
    log.info(
        "quantized in %.1f s (calibrated on %d training images)", time.perf_counter() - t0, len(calibration)
    )
    fp32_top1 = verify.top1(verify.session(fp32), val_images, val_targets)
    int8_top1 = verify.top1(verify.session(int8), val_images, val_targets)
    drop = 100 * (fp32_top1 - int8_top1)
    log.info(
        "val top-1 on %d images: fp32 %.2f%%, int8 %.2f%% (drop %.2f points, allowed %.2f)",
        len(val_images), 100 * fp32_top1, 100 * int8_top1, drop, max_drop,
    )  # fmt: skip
    passed = drop <= max_drop
    if not passed and not force:
        raise AccuracyGateError(
            f"int8 top-1 {100 * int8_top1:.2f}% is {drop:.2f} points below fp32 {100 * fp32_top1:.2f}% "
            f"(allowed {max_drop:g}); nothing written (pass --force to write it anyway)"
        )
    if not passed:
        log.warning("writing the int8 model despite a %.2f-point drop (--force)", drop)
    verify.check_batch_invariance(int8, val_images, INT8_INVARIANCE_ATOL)
    measured = measure_speed(fp32, int8, val_images) if speed else None
    if measured is not None:
        log.info("int8 speed-up on this machine: %s", measured.summary())
    from export.onnx_export import now_iso
    from service import __version__

    int8_meta = meta.replace(
        precision="int8", val_top1=int8_top1, svertka_version=__version__, exported_at=now_iso()
    )
    proto = onnx.load_from_string(int8)
    attach(proto, int8_meta)
    return QuantizeResult(proto.SerializeToString(), int8_meta, fp32_top1, int8_top1, measured, passed)
