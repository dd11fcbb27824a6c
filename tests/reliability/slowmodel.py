"""Tiny classifiers that take a chosen, real amount of compute per batch.

Reliability tests need a batch to be *running* while they queue, cancel,
expire or swap other requests. The tiny model computes in microseconds, so
here a side branch of chained 2-D MatMuls is added to its graph: it depends on
the input (so onnxruntime cannot fold it into a constant at load time), costs
about the same whatever the batch size, and contributes exactly zero to the
logits (so the answers stay the tiny model's). Nothing is faked: onnxruntime
really computes for that long, in the model instance's thread.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from service import modelmeta
from tests.helpers.tinymodel import build_tiny_model, tiny_meta

#: Side of the square matrices multiplied in the busy branch.
BUSY_DIM = 512


def add_busy_work(model: onnx.ModelProto, matmuls: int, *, dim: int = BUSY_DIM) -> onnx.ModelProto:
    """Append ``matmuls`` chained (dim x dim) MatMuls that the output depends on (times zero).

    The matrix is uniform 1/dim, so its powers stay equal to it: no overflow,
    no NaN, however long the chain (a NaN would survive the multiplication
    by zero and fail the server's warm-up check).
    """
    graph = model.graph
    (output,) = graph.output
    out_name = output.name
    pre = out_name + "_before_busy"
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == out_name:
                node.output[i] = pre
    input_name = graph.input[0].name
    w = np.full((dim, dim), 1.0 / dim, np.float32)
    graph.initializer.extend(
        [
            numpy_helper.from_array(w, "busy_w"),
            numpy_helper.from_array(np.array(0.0, np.float32), "busy_zero"),
        ]
    )
    nodes = [
        helper.make_node("ReduceSum", [input_name], ["busy_in_sum"], keepdims=0),
        helper.make_node("Mul", ["busy_in_sum", "busy_zero"], ["busy_in_zero"]),
        helper.make_node("Add", ["busy_w", "busy_in_zero"], ["busy_m0"]),
    ]
    for i in range(matmuls):
        nodes.append(helper.make_node("MatMul", [f"busy_m{i}", "busy_w"], [f"busy_m{i + 1}"]))
    nodes += [
        helper.make_node("ReduceSum", [f"busy_m{matmuls}"], ["busy_sum"], keepdims=0),
        helper.make_node("Mul", ["busy_sum", "busy_zero"], ["busy_out_zero"]),
        helper.make_node("Add", [pre, "busy_out_zero"], [out_name]),
    ]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return model


def make_slow_model(
    path: str | Path,
    *,
    matmuls: int,
    seed: int = 0,
    num_classes: int = 10,
    size: int = 32,
    fail_above: float | None = None,
) -> modelmeta.ModelMeta:
    """Write a tiny classifier with ``matmuls`` busy MatMuls per batch to ``path``."""
    meta = tiny_meta(num_classes=num_classes, size=size)
    model = add_busy_work(build_tiny_model(meta, seed=seed, fail_above=fail_above), matmuls)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return meta


def busy_tensor(value: float = 0.5, *, rows: int = 1, size: int = 32) -> np.ndarray:
    """A valid FP32 request tensor filled with ``value``."""
    return np.full((rows, 3, size, size), value, np.float32)
