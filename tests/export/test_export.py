"""Export: the graph contract, the metadata round trip, parity and batch invariance.

Uses the resnet20 trained on the tiny digits (conftest ``trained``), so the
BatchNorm layers carry real running statistics.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from export import data as datamod
from export import models, onnx_export, pipeline, verify
from export.errors import VerificationError
from export.repository import publish
from service import modelmeta

from .conftest import run_cli


@pytest.fixture(scope="module")
def exported(tiny_export):
    return tiny_export


def test_graph_contract(exported):
    _, _, prepared = exported
    proto = onnx.load_from_string(prepared.model_bytes)
    onnx.checker.check_model(proto, full_check=True)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert (inp.name, out.name) == ("input", "logits")
    assert inp.type.tensor_type.elem_type == out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert isinstance(in_dims[0], str) and in_dims[1:] == [3, 32, 32]
    assert out_dims[0] == in_dims[0] and out_dims[1:] == [3]
    # BatchNorm in inference form: folded into the convolutions.
    assert "BatchNormalization" not in {n.op_type for n in proto.graph.node}
    session = ort.InferenceSession(prepared.model_bytes, providers=["CPUExecutionProvider"])
    for batch in (1, 5, 33):
        assert session.run(None, {"input": np.zeros((batch, 3, 32, 32), np.float32)})[0].shape == (batch, 3)


def test_metadata_round_trip(exported, trained, tiny_digits):
    _, _, prepared = exported
    meta = modelmeta.from_props(
        {p.key: p.value for p in onnx.load_from_string(prepared.model_bytes).metadata_props}
    )
    assert meta == prepared.meta
    assert meta.labels == ("0", "1", "7") and meta.arch == "resnet20" and meta.precision == "fp32"
    assert meta.crop == (32, 32) and meta.resize == 32 and meta.color_order == "RGB" and meta.layout == "NCHW"
    assert meta.dataset == "digits" and meta.svertka_version and meta.exported_at
    # The mean/std training computed are exactly the ones in the file.
    state = torch.load(trained.checkpoint, weights_only=True)
    assert list(meta.mean) == list(state["config"]["mean"]) == list(state["meta"]["mean"])
    # val top-1 is measured with onnxruntime on the whole val split.
    val = datamod.scan_image_folder(tiny_digits / "val")
    images, targets = verify.load_images(val, meta)
    session = ort.InferenceSession(prepared.model_bytes, providers=["CPUExecutionProvider"])
    assert meta.val_top1 == pytest.approx(float((verify.run(session, images).argmax(1) == targets).mean()))
    # onnxruntime's view of the same properties (what the server reads).
    assert modelmeta.from_props(session.get_modelmeta().custom_metadata_map) == meta


def test_inspect_prints_the_metadata(exported, tmp_path):
    _, _, prepared = exported
    path = publish(tmp_path, "tiny", prepared.model_bytes)
    result = run_cli("inspect", tmp_path / "tiny", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["path"] == str(path)
    assert info["labels"] == ["0", "1", "7"] and info["num_classes"] == 3 and info["precision"] == "fp32"
    text = run_cli("inspect", path)
    assert text.returncode == 0
    assert "labels" in text.stdout and "0, 1, 7" in text.stdout and "resnet20" in text.stdout


def test_parity_and_batch_invariance_on_real_images(exported):
    model, dataset, prepared = exported
    report = prepared.report
    assert report.images == len(dataset.val_images) and report.source == "val images"
    assert report.max_abs_diff <= 1e-4 and report.top1_agree == report.images
    assert report.batch_max_abs_diff <= 1e-4
    # Independently: each image alone vs in a batch of 8, through onnxruntime.
    session = ort.InferenceSession(prepared.model_bytes, providers=["CPUExecutionProvider"])
    batch = dataset.val_images[8:16]
    together = session.run(None, {"input": batch})[0]
    alone = np.concatenate([session.run(None, {"input": batch[i : i + 1]})[0] for i in range(8)])
    np.testing.assert_allclose(alone, together, atol=1e-4, rtol=0)
    with torch.inference_mode():
        np.testing.assert_allclose(model.eval()(torch.from_numpy(batch)).numpy(), together, atol=1e-4, rtol=0)


def _training_mode_onnx(model: nn.Module) -> bytes:
    """What a careless export produces: BatchNorm left in training mode (TorchScript exporter)."""
    import io
    import warnings

    model.train()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(2, 3, 32, 32),),
            buf,
            input_names=["input"],
            output_names=["logits"],
            opset_version=18,
            dynamo=False,
            training=torch.onnx.TrainingMode.TRAINING,
            do_constant_folding=False,
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    model.eval()
    return buf.getvalue()


def test_batchnorm_exported_in_training_mode_is_caught(exported):
    model, dataset, prepared = exported
    bad = _training_mode_onnx(model)
    with pytest.raises(VerificationError, match="training mode"):
        onnx_export.check_graph(onnx.load_from_string(bad), (32, 32), 3)
    # ... and numerically, even without looking at the graph.
    with pytest.raises(VerificationError, match="depend on the batch"):
        verify.verify(bad, model, dataset.val_images[:16], "val images")


class _BatchStatNorm(nn.Module):
    """Normalises with the statistics of the batch: the effect of BN in training mode, in plain ops."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.base(x)
        return (logits - logits.mean(0, keepdim=True)) / (logits.std(0, keepdim=True) + 1e-3)


def test_export_refuses_a_model_whose_output_depends_on_the_batch(exported, tmp_path):
    model, dataset, prepared = exported
    evaluation = pipeline._evaluation(dataset, prepared.meta)
    with pytest.raises(VerificationError, match="depend on the batch"):
        onnx_export.prepare_export(_BatchStatNorm(model), prepared.meta, evaluation)


def test_parity_failure_is_loud(exported):
    model, dataset, prepared = exported
    other = models.build_model("resnet20", 3).eval()
    with pytest.raises(VerificationError, match=r"onnxruntime vs torch"):
        verify.verify(prepared.model_bytes, other, dataset.val_images[:16], "val images")
