"""fp16 models for GPUs: half-precision weights and activations, float32 at the edges.

onnxruntime's own converter (``onnxruntime.transformers.float16``) turns every
float32 initializer and activation into float16 and, with ``keep_io_types``,
puts a Cast after the graph input and before the logits, so a client and the
server still exchange float32 ([N, 3, H, W] in, [N, classes] out) and the
model's signature is the fp32 one: only the precision in its metadata says
``fp16``. The converter appends those Casts at the end of the node list; the
graph is topologically sorted again (``onnx_ir``) so ``onnx.checker`` accepts it.

The checks mirror the int8 path: the fp16 graph's logits against the fp32
model's on the same images (max difference relative to the largest fp32
logit, top-1 agreement reported), batch invariance, and, when there is a
dataset, an accuracy gate on val top-1. The checks run on the exporting
machine's CPU, where onnxruntime has few fp16 kernels and computes most of the
graph in float32 between inserted Casts (slower than fp32: the speed-up is a
GPU's, on tensor cores). So they see what the conversion rounds (weights, and
constants beyond fp16's range, which the converter clamps) but not fp16
arithmetic: an activation that overflows fp16 shows on the GPU, where the
server's warm-up refuses a model whose logits are not finite.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx

from export import verify
from export.errors import AccuracyGateError, ExportError, VerificationError
from service.modelmeta import ModelMeta, attach

log = logging.getLogger(__name__)

#: fp16 has an 11-bit significand (a relative step of about 5e-4 per rounding); through a deep
#: network the logits move by a few of those relative to their scale. Measured here: 4.5e-4 of the
#: largest |logit| on a random-weight resnet50, 1.4e-3 on the tests' digits resnet20 (docs/training.md).
FP16_RTOL = 2e-2


@dataclasses.dataclass(frozen=True)
class HalfResult:
    model_bytes: bytes
    meta: ModelMeta
    images: int
    max_rel_diff: float  # max |fp16 - fp32| / max |fp32 logit|
    top1_agree: int
    batch_max_rel_diff: float
    fp32_top1: float | None
    fp16_top1: float | None

    def summary(self) -> str:
        accuracy = (
            ""
            if self.fp16_top1 is None or self.fp32_top1 is None
            else f"; val top-1 fp16 {100 * self.fp16_top1:.2f}% vs fp32 {100 * self.fp32_top1:.2f}%"
        )
        return (
            f"fp16 vs fp32 on {self.images} images: max |logit diff| {self.max_rel_diff:.2e} of the largest "
            f"logit, top-1 identical {self.top1_agree}/{self.images}; batch invariance {self.batch_max_rel_diff:.2e}"
            f"{accuracy}"
        )


def convert_bytes(fp32: bytes) -> bytes:
    """The fp16 graph with float32 input and output (metadata kept, precision not yet changed)."""
    import onnx_ir
    from onnx_ir.passes.common import TopologicalSortPass
    from onnxruntime.transformers.float16 import convert_float_to_float16

    half = convert_float_to_float16(onnx.load_from_string(fp32), keep_io_types=True)
    ir_model = onnx_ir.from_proto(half)
    TopologicalSortPass()(ir_model)
    proto = onnx_ir.to_proto(ir_model)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise VerificationError(f"the fp16 graph is not valid ONNX: {str(exc).splitlines()[0]}") from None
    return proto.SerializeToString()


def _relative(a: np.ndarray, b: np.ndarray, scale: float) -> float:
    return float(np.abs(a - b).max() / max(scale, 1e-12))


def to_fp16(
    fp32: bytes,
    meta: ModelMeta,
    images: np.ndarray,
    val_images: np.ndarray | None = None,
    val_targets: np.ndarray | None = None,
    *,
    rtol: float = FP16_RTOL,
    max_drop: float = 1.0,
    force: bool = False,
) -> HalfResult:
    """Convert, compare with fp32 on ``images``, gate on val top-1; raises a :class:`ExportError` subclass."""
    from export.onnx_export import check_graph, now_iso
    from service import __version__

    if meta.precision != "fp32":
        raise ExportError(f"the input model is {meta.precision}; convert an fp32 model to fp16")
    if len(images) < verify.INVARIANCE_BATCH:
        raise ExportError(f"need at least {verify.INVARIANCE_BATCH} images to verify, got {len(images)}")
    half = convert_bytes(fp32)
    check_graph(onnx.load_from_string(half), meta.crop, meta.num_classes)
    f32, f16 = verify.session(fp32), verify.session(half)
    expected, got = verify.run(f32, images), verify.run(f16, images)
    scale = float(np.abs(expected).max())
    diff = _relative(got, expected, scale)
    agree = int((got.argmax(1) == expected.argmax(1)).sum())
    invariance = verify.batch_invariance(f16, images) / max(scale, 1e-12)
    problems = []
    if not diff <= rtol:
        problems.append(f"max |logit diff| fp16 vs fp32 is {diff:.3g} of the largest logit > {rtol:g}")
    if not invariance <= rtol:
        problems.append(f"fp16 logits depend on the batch ({invariance:.3g} of the largest logit > {rtol:g})")
    if problems:
        raise VerificationError("fp16 verification failed: " + "; ".join(problems))
    fp32_top1 = fp16_top1 = None
    if val_images is not None and val_targets is not None and len(val_images):
        fp32_top1 = verify.top1(f32, val_images, val_targets)
        fp16_top1 = verify.top1(f16, val_images, val_targets)
        drop = 100 * (fp32_top1 - fp16_top1)
        if drop > max_drop and not force:
            raise AccuracyGateError(
                f"fp16 top-1 {100 * fp16_top1:.2f}% is {drop:.2f} points below fp32 {100 * fp32_top1:.2f}% "
                f"(allowed {max_drop:g}); nothing written (pass --force to write it anyway)"
            )
    half_meta = meta.replace(
        precision="fp16",
        val_top1=fp16_top1,  # None when there was no dataset: the fp32 number is not the fp16 one
        svertka_version=__version__,
        exported_at=now_iso(),
    )
    proto = onnx.load_from_string(half)
    attach(proto, half_meta)
    result = HalfResult(
        proto.SerializeToString(), half_meta, len(images), diff, agree, invariance, fp32_top1, fp16_top1
    )
    log.info("%s", result.summary())
    return result
