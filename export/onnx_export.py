"""torch -> ONNX: the graph, its structural checks and its metadata.

We use ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript),
the default exporter since torch 2.9. Measured on resnet20 with torch 2.14.1
(`python -m bench.research.exporter_comparison`, opset 18, see docs/training.md):
both exporters fold eval-mode BatchNorm into the convolutions and give a
checker-valid graph with a dynamic batch axis and parity within 4e-8; the
dynamo graph has no stray ``Identity`` nodes and the TorchScript exporter is
deprecated (it warns that it will be removed), so dynamo it is.

The model is always put in eval mode first, and :func:`check_graph` rejects
a graph whose BatchNorm still computes batch statistics, so a model exported
in training mode cannot slip through (``verify`` also catches it numerically).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import logging
import warnings

import numpy as np
import onnx
import torch
from torch import nn

from export import verify
from export.errors import ExportError, VerificationError
from service import __version__
from service.modelmeta import INPUT_NAME, OUTPUT_NAME, ModelMeta, attach

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
MIN_OPSET = 17


def to_onnx(model: nn.Module, image_size: tuple[int, int], opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Export ``model`` (put in eval mode) with input ``input`` [batch, 3, H, W] and output ``logits``."""
    if opset < MIN_OPSET:
        raise ExportError(f"--opset: expected >= {MIN_OPSET}, got {opset}")
    model.eval()
    height, width = image_size
    # Batch 2, not 1: torch.export specialises a dimension whose example size is 0 or 1.
    example = torch.randn(2, 3, height, width)
    batch = torch.export.Dim("batch", min=1)
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                (example,),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamo=True,
                external_data=False,
                dynamic_shapes=({0: batch},),
                optimize=True,
            )
    except Exception as exc:
        log.debug("exporter output:\n%s", chatter.getvalue())
        first = str(exc).strip().splitlines()
        raise ExportError(f"torch.onnx.export failed: {first[0] if first else type(exc).__name__}") from exc
    log.debug("exporter output:\n%s", chatter.getvalue())
    return program.model_proto


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def check_graph(model: onnx.ModelProto, image_size: tuple[int, int], num_classes: int) -> None:
    """The contract the server relies on; raises :class:`VerificationError` naming what is wrong."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise VerificationError(f"onnx.checker rejected the model: {str(exc).splitlines()[0]}") from None
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise VerificationError(f"opset {opset} < {MIN_OPSET}")
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if [i.name for i in inputs] != [INPUT_NAME] or [o.name for o in model.graph.output] != [OUTPUT_NAME]:
        raise VerificationError(
            f"expected one input {INPUT_NAME!r} and one output {OUTPUT_NAME!r}, got "
            f"{[i.name for i in inputs]} -> {[o.name for o in model.graph.output]}"
        )
    (inp,), (out,) = inputs, model.graph.output
    for value, expected in ((inp, [3, *image_size]), (out, [num_classes])):
        dims = _dims(value)
        if value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise VerificationError(f"{value.name}: expected float32")
        if len(dims) != 1 + len(expected) or not isinstance(dims[0], str) or dims[1:] != expected:
            raise VerificationError(
                f"{value.name}: expected shape [batch, {', '.join(map(str, expected))}], got {dims}"
            )
    for node in model.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        training = any(a.name == "training_mode" and a.i == 1 for a in node.attribute)
        if training or len(node.output) > 1:
            raise VerificationError(
                f"BatchNormalization node {node.name!r} is in training mode (batch statistics): "
                "the model was exported without model.eval()"
            )


@dataclasses.dataclass(frozen=True)
class EvalData:
    """Preprocessed dataset images for verification and accuracy (see ``verify.load_images``)."""

    images: np.ndarray  # parity/invariance images
    source: str
    val_images: np.ndarray | None = None  # the whole val split, for the measured top-1
    val_targets: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A verified model with its metadata attached, ready for :func:`export.repository.publish`."""

    model_bytes: bytes
    meta: ModelMeta
    report: verify.VerifyReport


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def prepare_export(
    model: nn.Module,
    meta: ModelMeta,
    evaluation: EvalData,
    opset: int = DEFAULT_OPSET,
    atol: float = verify.FP32_ATOL,
) -> Prepared:
    """Export, check the graph, verify parity and batch invariance, measure val top-1 with onnxruntime.

    Raises :class:`VerificationError` (nothing is written) when any check fails.
    """
    proto = to_onnx(model, meta.crop, opset)
    check_graph(proto, meta.crop, meta.num_classes)
    unlabelled = proto.SerializeToString()
    report = verify.verify(unlabelled, model, evaluation.images, evaluation.source, atol)
    val_top1 = meta.val_top1
    if (
        evaluation.val_images is not None
        and evaluation.val_targets is not None
        and len(evaluation.val_images)
    ):
        val_top1 = verify.top1(verify.session(unlabelled), evaluation.val_images, evaluation.val_targets)
        log.info(
            "val top-1 (onnxruntime, fp32): %.2f%% on %d images", 100 * val_top1, len(evaluation.val_images)
        )
    meta = meta.replace(
        val_top1=val_top1, precision="fp32", svertka_version=__version__, exported_at=now_iso()
    )
    attach(proto, meta)
    return Prepared(proto.SerializeToString(), meta, report)
