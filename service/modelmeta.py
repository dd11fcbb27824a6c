"""The contract between export/ and service/: what a model file says about itself.

Every svertka model carries this schema in the ONNX ``metadata_props``
(string key/value pairs). This module is the only code that reads or writes
those keys: export/ builds a :class:`ModelMeta` and calls :func:`attach`; the
server reads the properties from onnxruntime (``custom_metadata_map``) and
calls :func:`from_props`. It imports neither torch nor onnxruntime.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: Version 1 files take float32 NCHW input; version 2 is written for any other input format
#: (``input_dtype``, ``layout``), so that a server that knows only version 1 refuses such a file
#: instead of feeding it normalised floats.
SCHEMA_VERSION = 1
INPUT_FORMAT_SCHEMA_VERSION = 2
SUPPORTED_SCHEMA_VERSIONS = (SCHEMA_VERSION, INPUT_FORMAT_SCHEMA_VERSION)
PREFIX = "svertka."

INPUT_NAME = "input"
OUTPUT_NAME = "logits"

PRECISIONS = ("fp32", "fp16", "int8")
COLOR_ORDERS = ("RGB", "BGR")
LAYOUTS = ("NCHW", "NHWC")
#: The input tensor's element type. float32/float16: normalised values (``mean``, ``std``);
#: uint8: the pixels as decoded, 0-255 in ``color_order``, the graph normalises them.
INPUT_DTYPES = ("float32", "float16", "uint8")
#: KServe v2 datatype of each input dtype.
KSERVE_DATATYPES = {"float32": "FP32", "float16": "FP16", "uint8": "UINT8"}
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
#: What the output holds: logits (the server applies softmax for scores), or probabilities
#: already (a graph ending in Softmax: scores are its values, never softmaxed twice).
OUTPUT_KINDS = ("logits", "probabilities")

#: ImageNet statistics (torchvision's reference training recipe).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MetadataError(ValueError):
    """The model file's svertka metadata is missing or malformed."""


@dataclasses.dataclass(frozen=True)
class ModelMeta:
    """Everything the server needs to serve a model, validated on construction.

    Preprocessing is: decode, convert to ``color_order``, resize the shorter
    side to ``resize`` (keeping aspect ratio) with ``interpolation``, centre
    crop to ``crop`` (height, width), scale to [0, 1], subtract ``mean`` and
    divide by ``std`` per channel, lay out as ``layout``. With ``input_dtype``
    uint8 the server stops after the crop (and the layout): scaling and
    normalisation are in the graph, ``mean`` and ``std`` say which.
    """

    labels: tuple[str, ...]
    crop: tuple[int, int]
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    arch: str
    color_order: str = "RGB"
    layout: str = "NCHW"
    interpolation: str = "bilinear"
    precision: str = "fp32"
    dataset: str = ""
    val_top1: float | None = None
    svertka_version: str = ""
    exported_at: str = ""
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    input_dtype: str = "float32"
    output: str = "logits"
    #: False for a model file without svertka metadata (:func:`from_graph`): its input and output
    #: come from the graph, its preprocessing is unknown, so it serves tensors only. Never written.
    preprocessing_known: bool = True
    #: True when the graph's batch dimension is fixed at 1 (``torch.onnx.export`` without
    #: ``dynamic_axes``): served as Triton serves ``max_batch_size: 0`` (each request's input is
    #: exactly ``[1, ...]``, nothing batched). Read from the graph, never written.
    fixed_batch: bool = False
    #: The graph's other outputs, served as Triton serves them (tensor API; ``(name, numpy dtype,
    #: dims after the batch)`` each, in graph order). Read from the graph, never written.
    extra_outputs: tuple[tuple[str, str, tuple[int, ...]], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(str(x) for x in self.labels))
        object.__setattr__(self, "crop", tuple(int(x) for x in self.crop))
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))
        object.__setattr__(
            self,
            "extra_outputs",
            tuple((str(n), str(d), tuple(int(x) for x in dims)) for n, d, dims in self.extra_outputs),
        )
        if len(self.labels) < 2:
            raise MetadataError(f"labels: need at least 2 classes, got {len(self.labels)}")
        if len(set(self.labels)) != len(self.labels):
            raise MetadataError("labels: class labels must be unique")
        if len(self.crop) != 2 or min(self.crop) < 1:
            raise MetadataError(f"crop: expected [height, width] >= 1, got {list(self.crop)}")
        if int(self.resize) < min(self.crop):
            raise MetadataError(
                f"resize: shorter side {self.resize} is smaller than the crop {list(self.crop)}"
            )
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != 3 or not all(math.isfinite(v) for v in values):
                raise MetadataError(f"{name}: expected 3 finite floats, got {list(values)}")
        if min(self.std) <= 0:
            raise MetadataError(f"std: values must be > 0, got {list(self.std)}")
        for name, allowed in (
            ("color_order", COLOR_ORDERS),
            ("layout", LAYOUTS),
            ("interpolation", INTERPOLATIONS),
            ("precision", PRECISIONS),
            ("input_dtype", INPUT_DTYPES),
            ("output", OUTPUT_KINDS),
        ):
            if getattr(self, name) not in allowed:
                raise MetadataError(f"{name}: expected one of {list(allowed)}, got {getattr(self, name)!r}")
        if self.val_top1 is not None and not 0.0 <= float(self.val_top1) <= 1.0:
            raise MetadataError(f"val_top1: expected a fraction in [0, 1], got {self.val_top1}")
        if not self.arch:
            raise MetadataError("arch: must not be empty")

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one image tensor without the batch dimension: (C, H, W), or (H, W, C) for NHWC."""
        if self.layout == "NHWC":
            return (self.crop[0], self.crop[1], 3)
        return (3, self.crop[0], self.crop[1])

    @property
    def row_width(self) -> int:
        """Float32 columns of one row of the engine's output: the classes, then each extra output's
        bytes padded to 4 (:func:`pack_outputs`)."""
        return self.num_classes + sum(-(-_row_bytes(d, dims) // 4) for _, d, dims in self.extra_outputs)

    @property
    def input_datatype(self) -> str:
        """The input's KServe v2 datatype: FP32, FP16 or UINT8."""
        return KSERVE_DATATYPES[self.input_dtype]

    @property
    def input_itemsize(self) -> int:
        """Bytes per input element."""
        return {"float32": 4, "float16": 2, "uint8": 1}[self.input_dtype]

    @property
    def normalized_in_graph(self) -> bool:
        """Whether the model takes pixels as decoded (uint8) and normalises them itself."""
        return self.input_dtype == "uint8"

    @property
    def schema_version(self) -> int:
        """The schema version this file's metadata is written with."""
        default_input = self.input_dtype == "float32" and self.layout == "NCHW"
        return SCHEMA_VERSION if default_input else INPUT_FORMAT_SCHEMA_VERSION

    def replace(self, **changes: Any) -> ModelMeta:
        return dataclasses.replace(self, **changes)

    def to_props(self) -> dict[str, str]:
        """Serialise to ONNX metadata_props (every value a string)."""
        values: dict[str, Any] = {
            "schema_version": self.schema_version,
            "labels": list(self.labels),
            "crop": list(self.crop),
            "resize": int(self.resize),
            "mean": list(self.mean),
            "std": list(self.std),
            "arch": self.arch,
            "color_order": self.color_order,
            "layout": self.layout,
            "interpolation": self.interpolation,
            "precision": self.precision,
            "dataset": self.dataset,
            "val_top1": self.val_top1,
            "svertka_version": self.svertka_version,
            "exported_at": self.exported_at,
            "input_name": self.input_name,
            "output_name": self.output_name,
        }
        if self.input_dtype != "float32":  # version 1 files stay as they were
            values["input_dtype"] = self.input_dtype
        if self.output != "logits":
            values["output"] = self.output
        if not self.preprocessing_known:
            raise MetadataError("a model without known preprocessing has no svertka metadata to write")
        return {PREFIX + k: json.dumps(v) for k, v in values.items()}

    def describe(self) -> dict[str, Any]:
        """A plain dict for people and JSON output (``svertka inspect``)."""
        out = dataclasses.asdict(self)
        out["labels"] = list(self.labels)
        out["num_classes"] = self.num_classes
        return out


#: The KServe datatype of each dtype an extra output may have.
OUTPUT_DATATYPES = {
    "float32": "FP32", "float16": "FP16", "float64": "FP64", "int64": "INT64", "int32": "INT32",
    "int8": "INT8", "uint8": "UINT8", "bool": "BOOL",
}  # fmt: skip


def _row_bytes(dtype: str, dims: tuple[int, ...]) -> int:
    return int(np.dtype(dtype).itemsize * int(np.prod(dims, dtype=np.int64)))


def pack_outputs(meta: ModelMeta, arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The outputs of one run as one float32 ``(rows, meta.row_width)`` array: the classifier's
    columns as they are, then each extra output's bytes. Batches are split and requests answered
    by rows, so every output travels the engine's one-array path; :func:`extra_output` reads one
    back. A model without extra outputs gives its logits unchanged."""
    logits = arrays[0]
    if not meta.extra_outputs:
        return logits
    rows = logits.shape[0]
    packed = np.zeros((rows, meta.row_width), np.float32)
    packed[:, : meta.num_classes] = logits
    raw = packed.view(np.uint8)
    column = meta.num_classes * 4
    for (name, dtype, dims), array in zip(meta.extra_outputs, arrays[1:], strict=True):
        if array.shape != (rows, *dims):
            raise ValueError(f"output '{name}' has shape {array.shape}, expected {(rows, *dims)}")
        data = np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<")).reshape(rows, -1)
        width = data.view(np.uint8).shape[1]
        raw[:, column : column + width] = data.view(np.uint8)
        column += -(-width // 4) * 4
    return packed


def extra_output(meta: ModelMeta, packed: np.ndarray, index: int) -> np.ndarray:
    """Extra output ``index`` of ``packed`` rows (:func:`pack_outputs`), little-endian, ``(rows, *dims)``."""
    column = meta.num_classes * 4
    for _, dtype, dims in meta.extra_outputs[:index]:
        column += -(-_row_bytes(dtype, dims) // 4) * 4
    _, dtype, dims = meta.extra_outputs[index]
    raw = np.ascontiguousarray(packed, np.float32).view(np.uint8)
    width = _row_bytes(dtype, dims)
    block = np.ascontiguousarray(raw[:, column : column + width])
    return block.view(np.dtype(dtype).newbyteorder("<")).reshape(packed.shape[0], *dims)


_REQUIRED = ("labels", "crop", "resize", "mean", "std", "arch")


def from_props(props: Mapping[str, str]) -> ModelMeta:
    """Parse ONNX metadata_props (or onnxruntime's custom_metadata_map).

    Raises :class:`MetadataError` naming the first missing or bad key; a file
    exported by something other than svertka fails here with a clear message.
    """
    values: dict[str, Any] = {}
    for key, raw in props.items():
        if not key.startswith(PREFIX):
            continue
        name = key[len(PREFIX) :]
        try:
            values[name] = json.loads(raw)
        except (TypeError, ValueError) as exc:
            raise MetadataError(f"metadata {key!r}: not valid JSON ({exc})") from None
    if not values:
        raise MetadataError("model has no svertka metadata (was it exported with 'svertka export'?)")
    version = values.pop("schema_version", None)
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise MetadataError(
            f"metadata schema version {version!r} is not supported (expected one of "
            f"{list(SUPPORTED_SCHEMA_VERSIONS)})"
        )
    missing = [k for k in _REQUIRED if k not in values]
    if missing:
        raise MetadataError(f"metadata is missing {', '.join(PREFIX + k for k in missing)}")
    known = {f.name for f in dataclasses.fields(ModelMeta)} - {"preprocessing_known"}
    kwargs = {k: v for k, v in values.items() if k in known}
    try:
        meta = ModelMeta(**kwargs)
    except MetadataError:
        raise
    except (TypeError, ValueError) as exc:
        raise MetadataError(f"metadata is malformed: {exc}") from None
    if meta.schema_version > version:
        raise MetadataError(
            f"metadata schema version {version} cannot describe a {meta.input_dtype} {meta.layout} input "
            f"(version {meta.schema_version} does)"
        )
    return meta


def from_graph(
    input_name: str,
    input_dtype: str,
    layout: str,
    size: tuple[int, int],
    output_name: str,
    classes: int,
    output: str = "logits",
) -> ModelMeta:
    """What the server knows of an ONNX classifier without svertka metadata: its input and output as
    the graph declares them, classes named by index ("0", "1", ...), preprocessing unknown."""
    return ModelMeta(
        labels=tuple(str(i) for i in range(classes)),
        crop=size,
        resize=min(size),
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        arch="unknown",
        layout=layout,
        precision="fp16" if input_dtype == "float16" else "fp32",  # as its input suggests
        input_name=input_name,
        output_name=output_name,
        input_dtype=input_dtype,
        output=output,
        preprocessing_known=False,
    )


def has_metadata(props: Mapping[str, str]) -> bool:
    """Whether metadata_props hold any svertka key."""
    return any(key.startswith(PREFIX) for key in props)


def attach(model: Any, meta: ModelMeta) -> None:
    """Write ``meta`` into an ``onnx.ModelProto``'s metadata_props in place.

    Keys of this schema already present are replaced; foreign keys are kept.
    """
    props = meta.to_props()
    kept = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(PREFIX)]
    del model.metadata_props[:]
    for key, value in kept + sorted(props.items()):
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = value


def read_model_file(path: str) -> ModelMeta:
    """Read the metadata of an ONNX file on disk (needs the ``onnx`` package)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ...
        raise MetadataError(f"{path}: not a readable ONNX model ({exc})") from None
    return from_props({p.key: p.value for p in model.metadata_props})
