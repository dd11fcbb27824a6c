"""``svertka export --input uint8-nhwc``: the model takes pixels, and normalises them itself.

A float32 ``[N, 3, H, W]`` request for a 224x224 image is 588 KiB; the same
image as ``UINT8 [N, 224, 224, 3]`` is 147 KiB, a quarter of what the client
serialises and sends and the server receives and parses. This module puts the
preprocessing the server would otherwise do after the crop in front of an
exported graph (fp32, fp16 or int8 alike), as ONNX nodes:

    input  UINT8 [N, H, W, 3]  (pixels in the model's colour order)
      -> Transpose [N, 3, H, W] -> Cast float32
      -> Sub 255 * mean -> Mul 1 / (255 * std)          (per channel)
      -> the exported graph, unchanged

``(x - 255 mean) / (255 std) == (x / 255 - mean) / std``, which is what the
server's float path computes from the same pixels. The metadata says
``input_dtype: uint8`` and ``layout: NHWC`` (schema version 2), so the server
hands such a model the decoded, cropped pixels and the tensor API takes
``UINT8``. :func:`verify_parity` proves the two paths agree on real images.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export import verify
from export.errors import VerificationError
from service.modelmeta import INPUT_NAME, ModelMeta, attach

log = logging.getLogger(__name__)

#: ``svertka export --input`` choices: the input format of every model it writes.
FORMATS = ("float32-nchw", "uint8-nhwc")
_PREFIX = "svertka_pixels_"


def with_pixel_input(model_bytes: bytes, meta: ModelMeta) -> tuple[bytes, ModelMeta]:
    """The graph of ``model_bytes`` (float32 ``input`` [N, 3, H, W]) behind a uint8 NHWC input."""
    if meta.input_dtype != "float32" or meta.layout != "NCHW":
        raise VerificationError(
            f"expected a float32 NCHW model to put pixels in front of, got {meta.input_datatype} {meta.layout}"
        )
    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    (old,) = [i for i in graph.input if i.name == INPUT_NAME]
    inner = _PREFIX + "normalised"
    for node in graph.node:  # the exported graph now reads the normalised tensor
        node.input[:] = [inner if name == INPUT_NAME else name for name in node.input]
    batch = old.type.tensor_type.shape.dim[0].dim_param or "batch"
    height, width = meta.crop
    pixels = helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, [batch, height, width, 3])
    mean = np.asarray(meta.mean, np.float32).reshape(1, 3, 1, 1) * np.float32(255)
    scale = np.float32(1) / (np.asarray(meta.std, np.float32).reshape(1, 3, 1, 1) * np.float32(255))
    front = [
        helper.make_node("Transpose", [INPUT_NAME], [_PREFIX + "nchw"], perm=[0, 3, 1, 2], name=_PREFIX + "transpose"),
        helper.make_node("Cast", [_PREFIX + "nchw"], [_PREFIX + "float"], to=TensorProto.FLOAT, name=_PREFIX + "cast"),
        helper.make_node("Sub", [_PREFIX + "float", _PREFIX + "mean"], [_PREFIX + "centred"], name=_PREFIX + "sub"),
        helper.make_node("Mul", [_PREFIX + "centred", _PREFIX + "scale"], [inner], name=_PREFIX + "mul"),
    ]  # fmt: skip
    graph.initializer.extend(
        [numpy_helper.from_array(mean, _PREFIX + "mean"), numpy_helper.from_array(scale, _PREFIX + "scale")]
    )
    nodes = front + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.input.remove(old)
    graph.input.insert(0, pixels)
    out_meta = meta.replace(input_dtype="uint8", layout="NHWC")
    attach(model, out_meta)
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString(), out_meta


def pixels_of(images: np.ndarray, meta: ModelMeta) -> np.ndarray:
    """The uint8 NHWC pixels that float32 NCHW ``images`` were normalised from (ToTensor divides
    uint8 by 255, so the round trip is exact up to float rounding)."""
    mean = np.asarray(meta.mean, np.float64).reshape(1, 3, 1, 1)
    std = np.asarray(meta.std, np.float64).reshape(1, 3, 1, 1)
    values = np.rint((images.astype(np.float64) * std + mean) * 255.0)
    return np.ascontiguousarray(np.clip(values, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1))


def normalised(pixels: np.ndarray, meta: ModelMeta) -> np.ndarray:
    """What the server's float path feeds a float32 model for these pixels: (x / 255 - mean) / std."""
    x = pixels.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
    mean = np.asarray(meta.mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(meta.std, np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((x - mean) / std)


@dataclasses.dataclass(frozen=True)
class ParityReport:
    images: int
    max_abs_diff: float  # pixel-input graph vs the float graph on the normalised pixels
    top1_agree: int
    batch_max_abs_diff: float

    def summary(self) -> str:
        return (
            f"uint8 NHWC input vs float32 input on {self.images} images: max |logit diff| "
            f"{self.max_abs_diff:.2e}, top-1 identical {self.top1_agree}/{self.images}; batch invariance "
            f"{self.batch_max_abs_diff:.2e}"
        )


def verify_parity(float_bytes: bytes, pixel_bytes: bytes, pixels: np.ndarray, *, rtol: float) -> ParityReport:
    """The pixel-input graph on ``pixels`` against the float graph on the same pixels normalised as the
    server does. Raises :class:`VerificationError` when a logit differs by more than ``rtol`` times
    the largest |logit|, or a top-1 class differs."""
    meta = _meta_of(pixel_bytes)
    pixel_session = verify.session(pixel_bytes)
    expected = verify.run(verify.session(float_bytes), normalised(pixels, meta))
    got = verify.run(pixel_session, pixels)
    atol = rtol * max(float(np.abs(expected).max()), 1.0)
    diff = float(np.abs(got - expected).max())
    agree = int((got.argmax(1) == expected.argmax(1)).sum())
    report = ParityReport(len(pixels), diff, agree, verify.batch_invariance(pixel_session, pixels))
    problems = []
    if not diff <= atol:
        problems.append(f"max |logit diff| uint8 input vs float32 input {diff:.3g} > {atol:.3g}")
    if agree != len(pixels):
        problems.append(f"top-1 differs on {len(pixels) - agree} of {len(pixels)} images")
    if not report.batch_max_abs_diff <= atol:
        problems.append(f"logits depend on the batch ({report.batch_max_abs_diff:.3g} > {atol:.3g})")
    if problems:
        raise VerificationError("uint8 input verification failed: " + "; ".join(problems))
    log.info("%s", report.summary())
    return report


def _meta_of(model_bytes: bytes) -> ModelMeta:
    from service import modelmeta

    model = onnx.load_from_string(model_bytes)
    return modelmeta.from_props({p.key: p.value for p in model.metadata_props})
