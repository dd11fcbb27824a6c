"""The load-time check that a row's answer does not depend on the other rows of its batch."""

from __future__ import annotations

import logging

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from service import config
from service.engine import loading
from tests.helpers.tinymodel import make_tiny_model, save_graph


def _batch_dependent_model(path, *, classes: int = 5, size: int = 8) -> None:
    """A plain classifier whose logits subtract the batch's mean logits: each row depends on the others,
    as with a BatchNorm exported in training mode."""
    weights = np.random.default_rng(0).standard_normal((3 * size * size, classes)).astype(np.float32)
    nodes = [
        helper.make_node("Flatten", ["x"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["y"]),
        helper.make_node("ReduceMean", ["y"], ["batch_mean"], axes=[0], keepdims=1),
        helper.make_node("Sub", ["y", "batch_mean"], ["scores"]),
    ]
    save_graph(
        path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", classes])],
        [numpy_helper.from_array(weights, "w")],
    )  # fmt: skip


def test_a_model_whose_rows_depend_on_each_other_is_served_with_a_warning(tmp_path, caplog):
    _batch_dependent_model(tmp_path / "m.onnx")
    with caplog.at_level(logging.WARNING, logger="service.engine.loading"):
        sessions, _ = loading.load_sessions(tmp_path / "m.onnx", config.ModelSettings(max_batch_size=8), 1)
    assert len(sessions) == 1
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "not batch-invariant: an input's output alone and in a batch of 8 differ by" in warning
    assert "BatchNorm exported in training mode" in warning
    assert sessions[0].batch_difference > 0.1


def test_a_batch_invariant_model_loads_quietly(tmp_path, caplog):
    make_tiny_model(tmp_path / "m.onnx")
    with caplog.at_level(logging.WARNING, logger="service.engine.loading"):
        sessions, _ = loading.load_sessions(tmp_path / "m.onnx", config.ModelSettings(max_batch_size=8), 1)
    assert caplog.records == []
    assert sessions[0].batch_difference < 1e-5


def test_with_batches_of_one_there_is_nothing_to_compare(tmp_path, caplog):
    _batch_dependent_model(tmp_path / "m.onnx")
    with caplog.at_level(logging.WARNING, logger="service.engine.loading"):
        sessions, _ = loading.load_sessions(tmp_path / "m.onnx", config.ModelSettings(max_batch_size=1), 1)
    assert caplog.records == [] and sessions[0].batch_difference == 0.0
