"""A tiny but real ONNX image classifier for tests (no torch needed).

The graph is conv(3x3) -> relu -> global average pool -> flatten -> gemm, with
an input ``input`` float32 ``[batch, 3, size, size]`` (dynamic batch) and an
output ``logits`` ``[batch, num_classes]``. Weights come from a seeded RNG, so
two versions built with different seeds give different answers (tests of
version swaps rely on that) while one seed always gives the same file.

``precision`` builds a genuinely different graph, not just a label:
``fp16`` computes in float16 between two Casts, ``int8`` quantizes the
activations and conv weights with QuantizeLinear/DequantizeLinear (QDQ).
The public input and output stay float32 in every case, as for real exports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service import modelmeta

#: Opset and IR version onnxruntime 1.20+ all load.
OPSET = 17
IR_VERSION = 8
HIDDEN_CHANNELS = 8


def tiny_meta(
    *, num_classes: int = 10, size: int = 32, labels: Sequence[str] | None = None, precision: str = "fp32"
) -> modelmeta.ModelMeta:
    """The metadata :func:`make_tiny_model` attaches (useful without writing a file)."""
    if labels is None:
        labels = [f"class{i}" for i in range(num_classes)]
    return modelmeta.ModelMeta(
        labels=tuple(labels),
        crop=(size, size),
        resize=size,
        mean=modelmeta.IMAGENET_MEAN,
        std=modelmeta.IMAGENET_STD,
        arch="tinycnn",
        precision=precision,
        dataset="synthetic",
        svertka_version="test",
    )


def build_tiny_model(
    meta: modelmeta.ModelMeta, *, seed: int = 0, fail_above: float | None = None
) -> onnx.ModelProto:
    """Build the ONNX graph for ``meta`` (input/output names and sizes taken from it).

    ``fail_above``: a real runtime failure for fault tests. When any input
    value in a batch exceeds it, a Reshape inside the graph gets an impossible
    shape and onnxruntime raises while running that batch (and only that one).
    """
    rng = np.random.default_rng(seed)
    classes = meta.num_classes
    conv_w = rng.normal(0.0, 0.5, size=(HIDDEN_CHANNELS, 3, 3, 3)).astype(np.float32)
    conv_b = rng.normal(0.0, 0.1, size=(HIDDEN_CHANNELS,)).astype(np.float32)
    fc_w = rng.normal(0.0, 1.0, size=(classes, HIDDEN_CHANNELS)).astype(np.float32)
    fc_b = rng.normal(0.0, 0.1, size=(classes,)).astype(np.float32)

    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []
    x = meta.input_name
    float_type = np.float32
    if meta.precision == "fp16":
        float_type = np.float16
        nodes.append(helper.make_node("Cast", [x], ["x_half"], to=TensorProto.FLOAT16))
        x = "x_half"
    elif meta.precision == "int8":
        # QDQ on the activations; the conv weights are stored as int8 and dequantized.
        inits += [
            numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
            numpy_helper.from_array(np.array(0, np.int8), "x_zero"),
        ]
        nodes.append(helper.make_node("QuantizeLinear", [x, "x_scale", "x_zero"], ["x_q"]))
        nodes.append(helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"]))
        x = "x_dq"
        w_scale = np.float32(np.abs(conv_w).max() / 127.0)
        w_q = np.clip(np.round(conv_w / w_scale), -127, 127).astype(np.int8)
        inits += [
            numpy_helper.from_array(w_q, "conv_w_q"),
            numpy_helper.from_array(np.array(w_scale, np.float32), "w_scale"),
            numpy_helper.from_array(np.array(0, np.int8), "w_zero"),
        ]
        nodes.append(helper.make_node("DequantizeLinear", ["conv_w_q", "w_scale", "w_zero"], ["conv_w"]))

    if meta.precision != "int8":
        inits.append(numpy_helper.from_array(conv_w.astype(float_type), "conv_w"))
    inits += [
        numpy_helper.from_array(conv_b.astype(float_type), "conv_b"),
        numpy_helper.from_array(fc_w.astype(float_type), "fc_w"),
        numpy_helper.from_array(fc_b.astype(float_type), "fc_b"),
    ]
    nodes += [
        helper.make_node("Conv", [x, "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"], axis=1),
    ]
    logits = meta.output_name if fail_above is None else "logits_pre"
    if meta.precision == "fp16":
        nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits_half"], transB=1))
        nodes.append(helper.make_node("Cast", ["logits_half"], [logits], to=TensorProto.FLOAT))
    else:
        nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], [logits], transB=1))
    if fail_above is not None:
        inits += [
            numpy_helper.from_array(np.array(fail_above, np.float32), "fail_above"),
            numpy_helper.from_array(np.array([1], np.int64), "one_i64"),
            numpy_helper.from_array(np.array([0], np.int64), "axis0"),
            numpy_helper.from_array(np.array([1.0], np.float32), "one_elem"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero_f"),
        ]
        nodes += [
            helper.make_node("ReduceMax", [meta.input_name], ["x_max"], keepdims=0),
            helper.make_node("Greater", ["x_max", "fail_above"], ["too_big"]),
            helper.make_node("Cast", ["too_big"], ["too_big_i64"], to=TensorProto.INT64),
            helper.make_node("Unsqueeze", ["too_big_i64", "axis0"], ["too_big_1d"]),
            helper.make_node("Add", ["too_big_1d", "one_i64"], ["poison_shape"]),  # [1] or [2]
            helper.make_node("Reshape", ["one_elem", "poison_shape"], ["poison"]),  # fails for [2]
            helper.make_node("ReduceSum", ["poison"], ["poison_sum"], keepdims=0),
            helper.make_node("Mul", ["poison_sum", "zero_f"], ["poison_zero"]),
            helper.make_node("Add", [logits, "poison_zero"], [meta.output_name]),
        ]
        logits = meta.output_name

    height, width = meta.crop
    graph = helper.make_graph(
        nodes,
        f"tiny_{meta.precision}",
        [helper.make_tensor_value_info(meta.input_name, TensorProto.FLOAT, ["batch", 3, height, width])],
        [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["batch", classes])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="svertka-tests"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    modelmeta.attach(model, meta)
    return model


def make_tiny_model(
    path: str | Path,
    *,
    num_classes: int = 10,
    size: int = 32,
    labels: Sequence[str] | None = None,
    seed: int = 0,
    precision: str = "fp32",
    fail_above: float | None = None,
    pixel_input: bool = False,
) -> modelmeta.ModelMeta:
    """Write a tiny classifier with svertka metadata to ``path``; returns its metadata.

    ``fail_above`` makes onnxruntime raise on any batch with an input value
    above it (see :func:`build_tiny_model`). ``pixel_input``: the same graph behind a uint8
    NHWC input that normalises the pixels itself (``svertka export --input uint8-nhwc``).
    """
    meta = tiny_meta(num_classes=num_classes, size=size, labels=labels, precision=precision)
    model = build_tiny_model(meta, seed=seed, fail_above=fail_above)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if pixel_input:
        from export.pixel_input import with_pixel_input

        data, meta = with_pixel_input(model.SerializeToString(), meta)
        path.write_bytes(data)
        return meta
    onnx.save(model, str(path))
    return meta


def save_graph(path: str | Path, nodes, inputs, outputs, initializers=(), name: str = "graph") -> Path:
    """A graph made with onnx.helper, saved as a plain model file (no svertka metadata) at ``path``."""
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def make_repository(
    root: str | Path,
    models: Mapping[str, Sequence[int]] | None = None,
    **model_kwargs,
) -> Path:
    """Lay out ``<root>/<name>/<version>/model.onnx`` for each model and version.

    Each version gets its own seed (the version number) so versions differ in
    their outputs; ``model_kwargs`` (num_classes, size, precision, ...) go to
    :func:`make_tiny_model` for every model.
    """
    root = Path(root)
    if models is None:
        models = {"tiny": [1]}
    for name, versions in models.items():
        for version in versions:
            kwargs = {"seed": int(version), **model_kwargs}
            make_tiny_model(root / name / str(int(version)) / "model.onnx", **kwargs)
    return root


def write_corrupt_model(path: str | Path, kind: str = "garbage") -> Path:
    """Write a model file that must fail to load, for fault tests.

    ``kind``: ``garbage`` (not ONNX at all), ``truncated`` (a valid tiny model
    cut in half), ``bad_metadata`` (valid ONNX whose svertka metadata lacks the required keys;
    a file with none at all is served as its graph says, tensors only),
    ``wrong_classes`` (metadata names 3 labels but the graph outputs 10).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "garbage":
        path.write_bytes(b"this is not an onnx model\x00\xff" * 16)
    elif kind == "truncated":
        data = build_tiny_model(tiny_meta()).SerializeToString()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "bad_metadata":
        model = build_tiny_model(tiny_meta())
        del model.metadata_props[:]
        entry = model.metadata_props.add()
        entry.key, entry.value = modelmeta.PREFIX + "schema_version", "1"
        onnx.save(model, str(path))
    elif kind == "wrong_classes":
        model = build_tiny_model(tiny_meta(num_classes=10))
        modelmeta.attach(model, tiny_meta(num_classes=3))
        onnx.save(model, str(path))
    else:
        raise ValueError(f"unknown corrupt model kind {kind!r}")
    return path
