"""The commands as users run them (``.venv/bin/svertka ...`` in a subprocess).

Bad inputs to every subcommand: a one-line error naming the problem, a
non-zero exit, no traceback, and nothing written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from export.repository import publish

from .conftest import run_cli


def _assert_one_line_error(result, *needles: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_train_missing_data_dir(tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", "--data", tmp_path / "absent", "--output", out)
    _assert_one_line_error(r, "svertka train: error:", "absent", "no such dataset directory")
    assert not out.exists()


def test_train_bad_arch_name(tiny_digits, tmp_path):
    r = run_cli("train", "--data", tiny_digits, "--arch", "resnet21", "--output", tmp_path / "run")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "unknown architecture 'resnet21'" in r.stderr and "resnet20" in r.stderr
    assert not (tmp_path / "run").exists()


def test_train_unreadable_weights_file(tiny_digits, tmp_path):
    bad = tmp_path / "resnet18.pth"
    bad.write_bytes(b"\x00garbage, not a torch file")
    r = run_cli("train", "--data", tiny_digits, "--weights", bad, "--output", tmp_path / "run")
    _assert_one_line_error(r, str(bad), "not a readable PyTorch weights file")
    r = run_cli(
        "train", "--data", tiny_digits, "--weights", tmp_path / "missing.pth", "--output", tmp_path / "run"
    )
    _assert_one_line_error(r, "no such weights file", "nothing is downloaded at run time")
    assert not (tmp_path / "run").exists()


def test_train_dataset_with_one_class(tmp_path):
    (tmp_path / "data" / "only").mkdir(parents=True)
    shutil.copy(Path(__file__), tmp_path / "data" / "only" / "notes.txt")
    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "data" / "only" / "a.png")
    r = run_cli("train", "--data", tmp_path / "data", "--val-split", "0.5", "--output", tmp_path / "run")
    _assert_one_line_error(r, "found one class")


def test_export_labels_count_differs_from_classes(tmp_path):
    weights = tmp_path / "resnet20.pth"
    from export.models import build_model

    torch.save(build_model("resnet20", 10).state_dict(), weights)
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\n")
    repo = tmp_path / "repo"
    r = run_cli(
        "export",
        "--weights",
        weights,
        "--arch",
        "resnet20",
        "--labels",
        labels,
        "--repository",
        repo,
        "--name",
        "m",
    )
    _assert_one_line_error(r, "3 labels", "10 classes")
    assert _files(repo) == []


def test_export_unreadable_weights_and_missing_checkpoint(tmp_path):
    bad = tmp_path / "w.pth"
    bad.write_text("not a state dict")
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    repo = tmp_path / "repo"
    common = ("--repository", repo, "--name", "m")
    r = run_cli("export", "--weights", bad, "--arch", "resnet18", "--labels", labels, *common)
    _assert_one_line_error(r, "not a readable PyTorch weights file")
    r = run_cli("export", "--checkpoint", tmp_path / "nope.pt", *common)
    _assert_one_line_error(r, "no such checkpoint file")
    r = run_cli("export", "--checkpoint", bad, *common)
    _assert_one_line_error(r, "not a readable checkpoint")
    r = run_cli("export", "--weights", "random", "--arch", "resnet20", "--num-classes", "4", "--repository", repo,
                "--name", "../escape")  # fmt: skip
    _assert_one_line_error(r, "not a valid model name")
    assert _files(repo) == []


def test_export_weights_for_another_arch(tmp_path):
    from export.models import build_model

    weights = tmp_path / "resnet20.pth"
    torch.save(build_model("resnet20", 2).state_dict(), weights)
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    r = run_cli("export", "--weights", weights, "--arch", "resnet32", "--labels", labels, "--repository", tmp_path / "r",
                "--name", "m")  # fmt: skip
    _assert_one_line_error(r, "does not fit resnet32", "missing")


def test_quantize_bad_inputs(tmp_path, tiny_digits):
    r = run_cli("quantize", tmp_path / "none.onnx", "--data", tiny_digits)
    _assert_one_line_error(r, "no such model file")
    junk = tmp_path / "repo" / "junk" / "1" / "model.onnx"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"not onnx")
    r = run_cli("quantize", junk, "--data", tiny_digits)
    _assert_one_line_error(r, "not a readable ONNX model")
    assert [p.name for p in (tmp_path / "repo").iterdir()] == ["junk"]


def test_inspect_bad_inputs(tmp_path):
    _assert_one_line_error(run_cli("inspect", tmp_path / "missing.onnx"), "no such model file")
    foreign = tmp_path / "foreign.onnx"
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph), foreign)
    _assert_one_line_error(run_cli("inspect", foreign), "no svertka metadata")


def test_build_default_into_a_file_path(tmp_path):
    target = tmp_path / "models"
    target.write_text("a file, not a directory")
    r = run_cli("build-default", "--repository", target, "--data", tmp_path / "digits")
    _assert_one_line_error(r, "cannot use it as a model repository")
    assert target.read_text() == "a file, not a directory" and not (tmp_path / "digits").exists()


@pytest.mark.slow
def test_train_smoke_one_epoch_then_resume(tiny_digits, tmp_path):
    out = tmp_path / "run"
    r = run_cli(
        "train", "--data", tiny_digits, "--epochs", "1", "--batch-size", "32", "--output", out, "--no-hflip"
    )
    assert r.returncode == 0, r.stderr
    assert "epoch 1/1" in r.stderr and "top-1" in r.stderr and "top-5" in r.stderr
    assert "per-class recall" in r.stderr and ("most confused" in r.stderr or "no confusions" in r.stderr)
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and state["meta"]["labels"] == ["0", "1", "7"]
    first_fc = state["model"]["fc.weight"].clone()
    r = run_cli("train", "--resume", out / "last.pt", "--epochs", "2")
    assert r.returncode == 0, r.stderr
    assert "resuming resnet20" in r.stderr and "epoch 2/2" in r.stderr and "epoch 1/2" not in r.stderr
    resumed = torch.load(out / "last.pt", weights_only=True)
    assert resumed["epoch"] == 2 and len(resumed["history"]) == 2
    assert not torch.equal(resumed["model"]["fc.weight"], first_fc)
    assert [p.name for p in out.iterdir()] == ["last.pt"]
    r = run_cli("train", "--resume", out / "last.pt", "--epochs", "2")
    _assert_one_line_error(r, "already trained 2 of 2 epochs")


@pytest.mark.slow
def test_export_from_checkpoint_numbers_versions(trained, tmp_path):
    repo = tmp_path / "repo"
    for expected in (1, 2):
        r = run_cli("export", "--checkpoint", trained.checkpoint, "--repository", repo, "--name", "tiny")
        assert r.returncode == 0, r.stderr
        assert f"wrote {repo / 'tiny' / str(expected) / 'model.onnx'}" in r.stdout
        assert "parity on" in r.stdout and "top-1 identical" in r.stdout
    r = run_cli(
        "export", "--checkpoint", trained.checkpoint, "--repository", repo, "--name", "tiny", "--version", "1"
    )
    _assert_one_line_error(r, "already exists", "--overwrite")


@pytest.mark.slow
def test_export_random_weights_for_benchmarks(tmp_path):
    r = run_cli("export", "--weights", "random", "--arch", "resnet20", "--num-classes", "4",
                "--repository", tmp_path, "--name", "rand")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "random inputs" in r.stdout
    info = json.loads(run_cli("inspect", tmp_path / "rand", "--json").stdout)
    assert info["labels"] == ["class_0", "class_1", "class_2", "class_3"] and info["val_top1"] is None


def test_build_default_does_nothing_when_both_models_are_present(trained, tmp_path):
    from export import onnx_export, pipeline

    model, meta, _ = pipeline._model_from_checkpoint(trained.checkpoint)
    prepared = onnx_export.prepare_export(model, meta, pipeline._evaluation(None, meta))
    fp32 = publish(tmp_path, "digits", prepared.model_bytes)
    int8 = publish(tmp_path, "digits-int8", prepared.model_bytes)
    before = [(p, p.stat().st_mtime_ns) for p in (fp32, int8)]
    r = run_cli("build-default", "--repository", tmp_path, "--data", tmp_path / "never-written")
    assert r.returncode == 0, r.stderr
    assert "nothing to do" in r.stdout
    assert [(p, p.stat().st_mtime_ns) for p in (fp32, int8)] == before
    assert not (tmp_path / "never-written").exists()
