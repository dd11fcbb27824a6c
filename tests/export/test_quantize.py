"""Static int8 quantization and its accuracy gate, both outcomes, through the real command."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from torch import nn

from export import onnx_export, pipeline
from export.repository import publish
from service import modelmeta

from .conftest import TINY_MAX_DROP, main_in_process, run_cli

pytestmark = pytest.mark.slow


class _OutlierActivation(nn.Module):
    """The trained model plus one activation with a 1e4 outlier next to the logits.

    fp32 is unaffected (the outlier is sliced away), but per-tensor int8
    activations must span [logit range, 1e4]: one step becomes ~40, larger
    than the logits themselves, so the int8 model stops telling classes apart.
    A real failure mode of static quantization (outlier channels), built on purpose.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.base(x)
        spread = torch.cat([logits, logits[:, :1] * 0.0 + 1e4], dim=1)
        return spread[:, :-1] * 1.0


def _fp32_model(repo, name, model, meta, dataset):
    prepared = onnx_export.prepare_export(model, meta, pipeline._evaluation(dataset, meta))
    return publish(repo, name, prepared.model_bytes)


@pytest.fixture(scope="module")
def repo_models(tiny_export, tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    model, dataset, prepared = tiny_export
    good = publish(repo, "tiny", prepared.model_bytes)
    fragile = _fp32_model(
        repo, "fragile", _OutlierActivation(model), prepared.meta.replace(arch="resnet20+outlier"), dataset
    )
    return repo, good, fragile


def _meta(path) -> modelmeta.ModelMeta:
    return modelmeta.read_model_file(str(path))


def test_gate_passes_and_the_int8_model_is_written_with_its_metadata(repo_models, tiny_digits):
    repo, good, _ = repo_models
    result = run_cli("quantize", good, "--data", tiny_digits, "--max-drop", TINY_MAX_DROP)
    assert result.returncode == 0, result.stderr
    written = repo / "tiny-int8" / "1" / "model.onnx"
    assert f"wrote {written}" in result.stdout
    assert "int8 speed-up on this machine: batch 1:" in result.stdout
    fp32, int8 = _meta(good), _meta(written)
    assert int8.precision == "int8" and fp32.precision == "fp32"
    assert 100 * (fp32.val_top1 - int8.val_top1) <= float(TINY_MAX_DROP)
    for field in (
        "labels",
        "crop",
        "resize",
        "mean",
        "std",
        "arch",
        "color_order",
        "dataset",
        "interpolation",
    ):
        assert getattr(int8, field) == getattr(fp32, field), field
    proto = onnx.load(str(written))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # per-channel weights: a weight DequantizeLinear with a vector scale
    inits = {i.name: i for i in proto.graph.initializer}
    scales = [
        inits[n.input[1]] for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[1] in inits
    ]
    assert any(len(s.dims) == 1 and s.dims[0] > 1 for s in scales)


def test_gate_refuses_a_model_that_loses_accuracy_and_force_overrides(repo_models, tiny_digits):
    """The outlier leaves int8 unable to tell the classes apart: it drops to about chance (1/3) from
    whatever the fp32 model reaches (97.8-100 % over seeds 0-8 here), far past the 1.0 gate."""
    repo, _, fragile = repo_models
    refused = run_cli("quantize", fragile, "--data", tiny_digits)
    assert refused.returncode == 2
    # The gate fails after the work is done and logged: the error is the one last line.
    assert "Traceback" not in refused.stderr, refused.stderr
    errors = [line for line in refused.stderr.splitlines() if "error:" in line]
    assert errors == [refused.stderr.strip().splitlines()[-1]]
    assert "points below fp32" in errors[0] and "--force" in errors[0]
    assert not (repo / "fragile-int8").exists() or not list((repo / "fragile-int8").rglob("model.onnx"))

    forced = run_cli("quantize", fragile, "--data", tiny_digits, "--force")
    assert forced.returncode == 0, forced.stderr
    int8 = _meta(repo / "fragile-int8" / "1" / "model.onnx")
    assert int8.precision == "int8"
    assert 100 * (_meta(fragile).val_top1 - int8.val_top1) > 1.0


def test_export_int8_writes_both_and_inspect_shows_precision(trained, tmp_path, capsys):
    args = (
        "export",
        "--checkpoint",
        trained.checkpoint,
        "--repository",
        tmp_path,
        "--name",
        "both",
        "--int8",
        "--max-drop",
        TINY_MAX_DROP,
    )
    code, out, err = main_in_process(capsys, *args)
    assert code == 0, err
    assert f"wrote {tmp_path / 'both' / '1' / 'model.onnx'}" in out
    assert f"wrote {tmp_path / 'both-int8' / '1' / 'model.onnx'}" in out
    code, out, _ = main_in_process(capsys, "inspect", tmp_path / "both-int8", "--json")
    info = json.loads(out)
    assert info["precision"] == "int8" and info["labels"] == ["0", "1", "7"]
    assert (
        json.loads(main_in_process(capsys, "inspect", tmp_path / "both", "--json")[1])["precision"] == "fp32"
    )
