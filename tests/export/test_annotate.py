"""``svertka annotate``: svertka's metadata written into ONNX classifiers made elsewhere.

The round trip is the proof: a torchvision resnet18 exported with plain
``torch.onnx.export``, annotated with ``--preset imagenet``, served by a real
server, classifies a real photograph as torchvision's own transform and
onnxruntime do. The tiny models' own metadata (``tests/helpers/tinymodel.py``)
is the reference for what annotating the same graph without it must give back.
Every refusal is one line, exit status 2, and leaves the directory as it was:
the original bytes, no temporary file.
"""

from __future__ import annotations

import io
import json
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from export import annotate
from export.errors import ExportError
from service import __version__, modelmeta
from tests.helpers.tinymodel import make_tiny_model

from .conftest import main_in_process, run_cli


def _strip(path: Path) -> Path:
    """The file without its svertka metadata: what a model from elsewhere looks like."""
    model = onnx.load(str(path))
    kept = [p for p in model.metadata_props if not p.key.startswith(modelmeta.PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, str(path))
    return path


def _labels(path: Path, n: int, prefix: str = "class") -> Path:
    path.write_text("".join(f"{prefix}{i}\n" for i in range(n)))
    return path


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _props(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def export_resnet18(path: Path, *, num_classes: int = 10, size: int = 224) -> Path:
    """torchvision resnet18 (random weights, seed 0) exported as its users export it: plain
    ``torch.onnx.export``, named input and output, a dynamic batch (tests/triton/test_plain_onnx.py)."""
    import torch
    import torchvision

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=num_classes).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.randn(2, 3, size, size),), str(path), input_names=["x"], output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False,
        )  # fmt: skip
    return path


#: The imagenet preset on the tiny 32x32 graphs: its normalisation, their size.
IMAGENET_AT_32 = ("--preset", "imagenet", "--crop", "32", "--resize", "32")


@pytest.fixture
def plain_tiny(tmp_path) -> Path:
    """tiny's float32 NCHW graph (input ``input`` [N, 3, 32, 32], 10 classes) without metadata."""
    path = tmp_path / "plain.onnx"
    make_tiny_model(path)
    return _strip(path)


# --- what it writes -------------------------------------------------------------------------------


def test_annotating_a_plain_graph_gives_back_what_svertka_export_wrote(tmp_path, capsys):
    """The same graph, annotated with the same labels and preprocessing, is the model svertka wrote:
    every field the server uses, as the server reads it."""
    original = make_tiny_model(tmp_path / "orig.onnx")
    plain = tmp_path / "plain.onnx"
    plain.write_bytes((tmp_path / "orig.onnx").read_bytes())
    _strip(plain)
    labels = _labels(tmp_path / "labels.txt", 10)
    mean, std = ",".join(map(str, original.mean)), ",".join(map(str, original.std))
    code, out, err = main_in_process(
        capsys, "annotate", plain, "--labels", labels, "--resize", "32", "--mean", mean, "--std", std
    )
    assert code == 0, err
    assert out.startswith(f"wrote {plain}: 10 labels; resize 32 (bilinear), crop 32x32") and "RGB" in out
    from service.engine.signature import read_metadata

    served = read_metadata(ort.InferenceSession(str(plain)), plain)
    assert served.preprocessing_known
    for field in (*annotate.SUPPLIED_FIELDS, *annotate.GRAPH_FIELDS, "schema_version"):
        assert getattr(served, field) == getattr(original, field), field
    assert (served.arch, served.val_top1, served.svertka_version) == ("unknown", None, __version__)


def test_a_uint8_nhwc_graph_keeps_its_input_as_the_graph_declares_it(tmp_path, capsys):
    """A graph that takes pixels (``export/pixel_input.py``'s, without its metadata): UINT8
    [N, 32, 32, 3] is annotated as such (schema version 2); mean and std may be left out, since
    the server hands such a model the pixels unchanged."""
    pixel = make_tiny_model(tmp_path / "pix.onnx", pixel_input=True)
    plain = _strip(tmp_path / "pix.onnx")
    labels = _labels(tmp_path / "labels.txt", 10)
    before = _snapshot(tmp_path)
    code, _, err = main_in_process(
        capsys, "annotate", plain, "--labels", labels, "--resize", "32", "--layout", "NCHW"
    )
    assert (
        code == 2 and "--layout NCHW: the graph's input 'input' (UINT8 [batch, 32, 32, 3]) is NHWC" in err
    ), err
    assert _snapshot(tmp_path) == before
    code, _, err = main_in_process(capsys, "annotate", plain, "--labels", labels, "--resize", "32")
    assert code == 0, err
    props = _props(plain)
    assert json.loads(props["svertka.schema_version"]) == modelmeta.INPUT_FORMAT_SCHEMA_VERSION
    meta = modelmeta.from_props(props)
    assert (meta.input_dtype, meta.layout, meta.crop, meta.input_name) == ("uint8", "NHWC", (32, 32), "input")
    assert (meta.input_dtype, meta.layout) == (pixel.input_dtype, pixel.layout)
    assert (meta.mean, meta.std) == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def test_explicit_flags_override_the_preset(plain_tiny, tmp_path, capsys):
    labels = _labels(tmp_path / "labels.txt", 10)
    args = ("annotate", plain_tiny, "--labels", labels, "--preset", "imagenet", "--crop", "32", "--resize", "36",
            "--interpolation", "bicubic", "--color-order", "BGR", "--std", "0.5,0.5,0.5")  # fmt: skip
    code, _, err = main_in_process(capsys, *args)
    assert code == 0, err
    meta = modelmeta.read_model_file(str(plain_tiny))
    assert (meta.resize, meta.crop, meta.interpolation, meta.color_order) == (36, (32, 32), "bicubic", "BGR")
    assert (meta.mean, meta.std) == (modelmeta.IMAGENET_MEAN, (0.5, 0.5, 0.5))  # the preset's mean


def test_labels_file_blank_lines_are_skipped_and_duplicates_named(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("  cat \r\n\ndog\n\n\n")
    assert annotate.read_labels(path) == ("cat", "dog")
    path.write_bytes("\ufeffcat\nmouse\n".encode())  # a byte order mark (Windows editors)
    assert annotate.read_labels(path) == ("cat", "mouse")
    path.write_text("crane\nheron\ncrane\n")
    with pytest.raises(ExportError, match="label 'crane' on line 3 is also on line 1"):
        annotate.read_labels(path)


def test_out_writes_a_copy_and_leaves_the_input_as_it_was(plain_tiny, tmp_path, capsys):
    labels = _labels(tmp_path / "labels.txt", 10)
    original = plain_tiny.read_bytes()
    out = tmp_path / "annotated" / "model.onnx"
    out.parent.mkdir()
    args = ("annotate", plain_tiny, "--labels", labels, *IMAGENET_AT_32)
    code, _, err = main_in_process(capsys, *args, "--out", out)
    assert code == 0, err
    assert plain_tiny.read_bytes() == original
    assert modelmeta.read_model_file(str(out)).labels == tuple(f"class{i}" for i in range(10))
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]  # no temporary file left
    # An existing --out is replaced only with --force (and keeps its permissions).
    before = out.read_bytes()
    code, _, err = main_in_process(capsys, *args, "--out", out)
    assert code == 2 and "already exists (pass --force to replace it)" in err and out.read_bytes() == before
    out.chmod(0o640)
    code, _, err = main_in_process(capsys, *args, "--out", out, "--force", "--resize", "40")
    assert code == 0, err
    assert modelmeta.read_model_file(str(out)).resize == 40 and stat.S_IMODE(out.stat().st_mode) == 0o640


def test_force_replaces_metadata_and_keeps_what_describes_the_graph(tmp_path, capsys):
    path = tmp_path / "model.onnx"
    make_tiny_model(path, precision="int8")
    labels = _labels(tmp_path / "labels.txt", 10, prefix="kind")
    args = ("annotate", path, "--labels", labels, "--resize", "32", "--mean", ".5,.5,.5", "--std", ".25,.25,.25")  # fmt: skip
    before = path.read_bytes()
    code, _, err = main_in_process(capsys, *args)
    assert code == 2 and "already has svertka metadata" in err and "--force" in err
    assert path.read_bytes() == before
    code, _, err = main_in_process(capsys, *args, "--force")
    assert code == 0, err
    meta = modelmeta.read_model_file(str(path))
    assert meta.labels[0] == "kind0" and (meta.mean, meta.std) == ((0.5,) * 3, (0.25,) * 3)
    assert (meta.precision, meta.arch) == ("int8", "tinycnn")


def test_weights_in_external_data_are_found_in_place_and_carried_by_a_copy(tmp_path, capsys):
    """torch.onnx.export's default writes the weights to a data file next to the model: annotated in
    place, the model keeps reading them there; a copy elsewhere carries them inside."""
    source = tmp_path / "src"
    source.mkdir()
    path = source / "m.onnx"
    onnx.save(
        onnx.load(str(_plain_tiny(source))), str(path), save_as_external_data=True, location="m.data",
        size_threshold=0,
    )  # fmt: skip
    labels = _labels(tmp_path / "labels.txt", 10)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
    expected = ort.InferenceSession(str(path)).run(None, {"input": x})[0]
    args = ("annotate", path, "--labels", labels, *IMAGENET_AT_32)
    copy = tmp_path / "elsewhere" / "m.onnx"
    copy.parent.mkdir()
    before = _snapshot(source)
    assert main_in_process(capsys, *args, "--out", copy)[0] == 0
    assert _snapshot(source) == before and [p.name for p in copy.parent.iterdir()] == ["m.onnx"]
    assert main_in_process(capsys, *args)[0] == 0
    assert sorted(p.name for p in source.iterdir()) == ["m.data", "m.onnx"]
    assert len(path.read_bytes()) < len(copy.read_bytes())  # the weights stay in m.data
    for annotated in (path, copy):
        got = ort.InferenceSession(str(annotated)).run(None, {"input": x})[0]
        np.testing.assert_array_equal(got, expected)
        assert modelmeta.read_model_file(str(annotated)).preprocessing_known


def test_annotate_needs_no_torch(plain_tiny, tmp_path):
    """Serving installs have no torch; annotating a file made elsewhere must not need it."""
    import subprocess
    import sys

    labels = _labels(tmp_path / "labels.txt", 10)
    argv = ["annotate", str(plain_tiny), "--labels", str(labels), *IMAGENET_AT_32]
    code = (
        f"import sys; from service.cli import main; rc = main({argv!r}); "
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')); "
        "print(heavy); sys.exit(rc or (1 if heavy else 0))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2]
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert modelmeta.read_model_file(str(plain_tiny)).preprocessing_known


# --- refusals -------------------------------------------------------------------------------------


def _plain_tiny(directory: Path) -> Path:
    make_tiny_model(directory / "m.onnx")
    return _strip(directory / "m.onnx")


def _junk(directory: Path, data: bytes) -> Path:
    (directory / "m.onnx").write_bytes(data)
    return directory / "m.onnx"


def _two_inputs(directory: Path) -> Path:
    from onnx import TensorProto, helper

    v = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("Add", ["left", "right"], ["sum"]), helper.make_node("GlobalAveragePool", ["sum"], ["p"]),
         helper.make_node("Flatten", ["p"], ["y"])],
        "two", [v("left", TensorProto.FLOAT, ["n", 3, 8, 8]), v("right", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [v("y", TensorProto.FLOAT, ["n", 3])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(directory / "m.onnx"))
    return directory / "m.onnx"


def _fixed_batch(directory: Path) -> Path:
    from onnx import TensorProto, helper

    v = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Flatten", ["p"], ["y"])],
        "fixed", [v("x", TensorProto.FLOAT, [2, 3, 8, 8])], [v("y", TensorProto.FLOAT, [2, 3])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(directory / "m.onnx"))
    return directory / "m.onnx"


REFUSALS = {
    "label count": (_plain_tiny, 3, (), "--labels", "3 labels, but the graph's output 'logits' has 10 classes"),
    "crop": (_plain_tiny, 10, ("--crop", "28", "--resize", "32"),
             "--crop 28x28 does not fit the graph's input 'input' (FP32 [batch, 3, 32, 32])", "pass --crop 32,32"),
    "preset crop": (_plain_tiny, 10, (), "--preset imagenet crops 224x224 does not fit", "32x32"),
    "not onnx": (lambda d: _junk(d, b"\x89PNG\r\n\x1a\n not a model"), 10, (), "not a readable ONNX model"),
    "text, not onnx": (lambda d: _junk(d, b"name: resnet\n"), 10, (), "m.onnx: not"),
    "unsupported graph": (_two_inputs, 3, (),
                          "svertka cannot serve this graph: the graph has 2 inputs ['left', 'right']",
                          "svertka serves classifiers with one image input"),
    "fixed batch": (_fixed_batch, 3, ("--crop", "8", "--resize", "8"), "the server would refuse this metadata", "fixed batch dimension of 2"),
    "no resize": (_plain_tiny, 10, ("--preset", None), "--resize N is needed"),
    "no mean for a float input": (_plain_tiny, 10, ("--preset", None, "--resize", "32"),
                                  "--mean a,b,c and --std a,b,c are needed"),
}  # fmt: skip


@pytest.mark.parametrize("case", REFUSALS)
def test_each_refusal_is_one_line_and_writes_nothing(case, tmp_path, capsys):
    make, classes, extra, *needles = REFUSALS[case]
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    path = make(model_dir)
    labels = _labels(tmp_path / "labels.txt", classes)
    preset = () if extra[:2] == ("--preset", None) else ("--preset", "imagenet")  # (--preset, None): none
    args = ["annotate", path, "--labels", labels, *preset, *extra[2 if not preset else 0 :]]
    before = _snapshot(model_dir)
    code, out, err = main_in_process(capsys, *args)
    assert code == 2 and out == "", (code, out, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("svertka annotate: error: "), err
    for needle in needles:
        assert needle in err, err
    assert _snapshot(model_dir) == before  # the original bytes, and no temporary file


def test_a_read_only_file_is_refused_before_any_work(plain_tiny, tmp_path):
    """Through the real entry point. Refused up front (the labels file is not even read): without
    --out the file itself must be writable, even where access(2) would let root write it."""
    plain_tiny.chmod(0o444)
    before = _snapshot(plain_tiny.parent)
    r = run_cli("annotate", plain_tiny, "--labels", tmp_path / "absent.txt", "--preset", "imagenet")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == (
        f"svertka annotate: error: {plain_tiny}: the file is read-only; pass --out FILE to write an annotated copy"
    )
    assert _snapshot(plain_tiny.parent) == before and stat.S_IMODE(plain_tiny.stat().st_mode) == 0o444


def test_a_failed_write_leaves_the_file_and_no_temporary_file(plain_tiny, tmp_path, monkeypatch):
    labels = _labels(tmp_path / "labels.txt", 10)
    before = _snapshot(plain_tiny.parent)

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    request = annotate.Request(
        plain_tiny, labels, annotate.Preprocessing(resize=32, crop=(32, 32)), preset="imagenet"
    )
    with pytest.raises(ExportError, match="cannot write the model \\(No space left on device\\)"):
        annotate.annotate(request)
    assert _snapshot(plain_tiny.parent) == before


# --- inspect --------------------------------------------------------------------------------------


def test_inspect_says_what_a_plain_file_lacks_then_shows_the_annotation(plain_tiny, tmp_path, capsys):
    code, out, err = main_in_process(capsys, "inspect", plain_tiny, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert (info["input_name"], info["input_dtype"], info["layout"], info["crop"]) == (
        "input",
        "float32",
        "NCHW",
        [32, 32],
    )
    assert (info["output_name"], info["output"], info["num_classes"]) == ("logits", "logits", 10)
    assert info["missing"] == ["labels", "resize", "interpolation", "mean", "std", "color_order"]
    assert "labels" not in info and "mean" not in info  # no placeholders shown as if they were known
    assert info["preprocessing_known"] is False and "svertka annotate" in info["image_api"]
    labels = _labels(tmp_path / "labels.txt", 10)
    args = ("annotate", plain_tiny, "--labels", labels, *IMAGENET_AT_32)
    assert main_in_process(capsys, *args)[0] == 0
    info = json.loads(main_in_process(capsys, "inspect", plain_tiny, "--json")[1])
    assert info["preprocessing_known"] is True and "missing" not in info and "image_api" not in info
    assert (info["labels"][:2], info["resize"], info["mean"]) == (
        ["class0", "class1"],
        32,
        list(modelmeta.IMAGENET_MEAN),
    )


# --- the round trip through a server --------------------------------------------------------------


def _photograph() -> bytes:
    """scikit-image's chelsea (a real 451x300 photograph) as a PNG: lossless, so the server and
    torchvision start from the same pixels."""
    from skimage import data as skdata

    buf = io.BytesIO()
    Image.fromarray(skdata.chelsea()).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def annotated_repository(tmp_path_factory) -> Path:
    """resnet18 from plain torch.onnx.export, annotated with --preset imagenet; the pixel-input tiny
    graph without metadata, annotated; and the same pixel graph with svertka's own metadata."""
    from service.cli import main

    root = tmp_path_factory.mktemp("annotated")
    labels = _labels(root / "labels.txt", 10, prefix="thing")
    resnet = export_resnet18(root / "resnet18" / "1" / "model.onnx")
    (root / "resnet18" / "config.yaml").write_text("max_batch_size: 2\n")  # warm-up at 1 and 2 only
    assert main(["annotate", str(resnet), "--labels", str(labels), "--preset", "imagenet"]) == 0
    make_tiny_model(root / "tinypix" / "1" / "model.onnx", seed=3, pixel_input=True)
    plain = root / "plainpix" / "1" / "model.onnx"
    make_tiny_model(plain, seed=3, pixel_input=True)
    _strip(plain)
    assert (
        main(["annotate", str(plain), "--labels", str(_labels(root / "l10.txt", 10)), "--resize", "32"]) == 0
    )
    return root


@pytest.fixture(scope="module")
def srv(annotated_repository):
    from tests.api.conftest import InProcessServer

    server = InProcessServer(annotated_repository)
    yield server
    server.close()


def _classify(srv, model: str, image: bytes) -> dict[int, float]:
    from service.gen.svertka.v1 import classifier_pb2 as cpb
    from service.gen.svertka.v1 import classifier_pb2_grpc as cpb_grpc

    with srv.channel() as channel:
        response = cpb_grpc.ImageClassifierStub(channel).Classify(
            cpb.ClassifyRequest(model=model, image=image, top_k=10), timeout=60
        )
    return {p.index: p.score for p in response.predictions}


#: Largest probability difference allowed between the server's preprocessing and torchvision's on
#: the same PNG. Both resize with Pillow's antialiased bilinear filter and crop the same box; the
#: server resamples only the crop (service/preprocess.py), so a pixel may differ by one level
#: (tests/engine/test_preprocess.py). Measured on this photograph and model: 5.0e-6. A wrong
#: preprocessing is far outside it (measured with torchvision's transform changed: resize 224
#: instead of 256 4.8e-3, bicubic 7.1e-3, BGR 1.5e-2, no normalisation 0.15); the top-2 margin is 0.14.
PROBABILITY_TOLERANCE = 1e-3


def test_classify_on_an_annotated_torchvision_export_matches_torchvision(srv, annotated_repository):
    import torch
    from torchvision import transforms

    image = _photograph()
    reference = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize(modelmeta.IMAGENET_MEAN, modelmeta.IMAGENET_STD),
    ])  # fmt: skip
    with torch.no_grad():
        x = reference(Image.open(io.BytesIO(image)).convert("RGB")).unsqueeze(0).numpy()
    session = ort.InferenceSession(str(annotated_repository / "resnet18" / "1" / "model.onnx"))
    logits = session.run(None, {"x": x})[0][0].astype(np.float64)
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    served = _classify(srv, "resnet18", image)
    got = np.asarray([served[i] for i in range(10)])
    np.testing.assert_allclose(got, expected, atol=PROBABILITY_TOLERANCE, rtol=0)
    # The top-1 is what torchvision gives because the lead is far beyond any preprocessing difference.
    top2 = np.sort(expected)[-2:]
    assert top2[1] - top2[0] > 20 * PROBABILITY_TOLERANCE, top2
    assert max(served, key=served.get) == int(expected.argmax())


def test_an_annotated_pixel_graph_classifies_as_svertkas_own(srv):
    """The pixel-input graph annotated from its graph alone gives the scores of the same graph
    with the metadata svertka export wrote."""
    from tests.api import images

    for seed in range(3):
        image = images.png(seed, size=48)
        assert _classify(srv, "plainpix", image) == pytest.approx(_classify(srv, "tinypix", image), abs=1e-6)
