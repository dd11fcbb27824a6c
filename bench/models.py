"""The benchmarked models, made in a repository of the benchmark's own (``.bench/models``).

resnet18 fp32 and int8 at 224x224 come from svertka's own exporter
(``svertka export --weights random``, then ``svertka quantize``): the benchmark
measures the files a user gets. Speed does not depend on the weights, so random
ones are fine. The default digits models come from ``make model``. Made once
in ``.bench/`` and kept: delete ``.bench/models`` to rebuild them.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class BenchModel:
    """One model under test: its repository name and ONNX file."""

    name: str
    path: Path
    label: str  # how the report names it


def _svertka(*args: str) -> None:
    cmd = [sys.executable, "-m", "service", *args]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")


def calibration_folder(
    root: Path, photos_dir: Path, classes: int = 1000, size: int = 160
) -> tuple[Path, Path]:
    """An ImageFolder (``train/`` + ``val/``, one image per class each) and its labels file.

    ``svertka quantize`` calibrates on a dataset whose classes match the
    model's labels. For a 1000-class resnet18 with random weights the classes
    mean nothing, but the calibration images must look like what the server
    will see: seeded crops of the benchmark photographs, at random scales.
    Returns (dataset root, labels file). Made once.
    """
    from PIL import Image

    labels_file = root / "labels.txt"
    names = [f"c{i:03d}" for i in range(classes)]
    if labels_file.is_file() and labels_file.read_text().split() == names:
        return root, labels_file
    shutil.rmtree(root, ignore_errors=True)
    photos = [Image.open(p).convert("RGB") for p in sorted(Path(photos_dir).glob("*.jpg"))]
    rng = random.Random(0)
    for split in ("train", "val"):
        for name in names:
            photo = photos[rng.randrange(len(photos))]
            side = rng.randint(size, min(photo.size))
            left, top = rng.randint(0, photo.width - side), rng.randint(0, photo.height - side)
            crop = photo.crop((left, top, left + side, top + side)).resize(
                (size, size), Image.Resampling.BILINEAR
            )
            path = root / split / name / "0.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            crop.save(path, "JPEG", quality=90)
    labels_file.write_text("\n".join(names) + "\n")
    return root, labels_file


def resnet18_models(repository: Path, photos_dir: Path, image_size: int = 224) -> list[BenchModel]:
    """resnet18 fp32 (1000 classes, random weights) and its int8 QDQ model, made once in ``repository``."""
    repository = Path(repository)
    fp32 = repository / "resnet18" / "1" / "model.onnx"
    int8 = repository / "resnet18-int8" / "1" / "model.onnx"
    data, labels = calibration_folder(repository.parent / "calibration", photos_dir)
    if not fp32.is_file():
        shutil.rmtree(fp32.parent.parent, ignore_errors=True)
        _svertka(
            "export", "--weights", "random", "--arch", "resnet18", "--labels", str(labels),
            "--image-size", str(image_size), "--dataset", "random weights (benchmark)",
            "--repository", str(repository), "--name", "resnet18", "--version", "1",
        )  # fmt: skip
    if not int8.is_file():
        shutil.rmtree(int8.parent.parent, ignore_errors=True)
        # --force: with random weights top-1 is chance level for both precisions, so the accuracy gate
        # measures noise; the benchmark only needs the int8 graph.
        _svertka(
            "quantize", str(fp32), "--data", str(data), "--repository", str(repository),
            "--name", "resnet18-int8", "--version", "1", "--force",
        )  # fmt: skip
    return [
        BenchModel("resnet18", fp32, f"resnet18 fp32 {image_size}x{image_size}"),
        BenchModel("resnet18-int8", int8, f"resnet18 int8 {image_size}x{image_size}"),
    ]


def digits_models(repository: Path = REPO_ROOT / "models") -> list[BenchModel]:
    """The bundled default models (``make model``): resnet20 on the digits, fp32 and int8 if present."""
    out = []
    for name, label in (
        ("digits", "digits resnet20 fp32 32x32"),
        ("digits-int8", "digits resnet20 int8 32x32"),
    ):
        versions = sorted(
            (int(d.name) for d in (Path(repository) / name).glob("[0-9]*") if d.name.isdigit()), reverse=True
        )
        for version in versions:  # the newest version, as the server picks it
            path = Path(repository) / name / str(version) / "model.onnx"
            if path.is_file():
                out.append(BenchModel(name, path, label))
                break
    return out


def null_model(repository: Path, *, image_size: int = 224, classes: int = 1000) -> BenchModel:
    """A model that computes (almost) nothing: the frontend alone, on a resnet18-sized request.

    Same input ([N, 3, 224, 224] float32, 588 KiB per image) and output ([N, 1000])
    as the resnet18 models, but the graph only reshapes the input and slices its
    first 1000 values as the logits, so a request's latency is the server's
    frontend (gRPC, parsing, checks, batching, answer) and the transport, with
    onnxruntime's part reduced to microseconds. Served by both servers like the
    real models; made once.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from service import modelmeta

    path = Path(repository) / "null" / "1" / "model.onnx"
    if path.is_file():
        return BenchModel("null", path, f"null model {image_size}x{image_size} (frontend alone)")
    meta = modelmeta.ModelMeta(
        labels=[f"c{i:03d}" for i in range(classes)], crop=(image_size, image_size), resize=image_size,
        mean=modelmeta.IMAGENET_MEAN, std=modelmeta.IMAGENET_STD, arch="null",
        dataset="none: the benchmark's frontend measurement",
    )  # fmt: skip
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", [meta.input_name, "flat_shape"], ["flat"]),
            helper.make_node("Slice", ["flat", "starts", "ends", "axes"], [meta.output_name]),
        ],
        "null",
        [
            helper.make_tensor_value_info(
                meta.input_name, TensorProto.FLOAT, ["batch", 3, image_size, image_size]
            )
        ],
        [helper.make_tensor_value_info(meta.output_name, TensorProto.FLOAT, ["batch", classes])],
        initializer=[
            numpy_helper.from_array(np.array([0, -1], np.int64), "flat_shape"),
            numpy_helper.from_array(np.array([0], np.int64), "starts"),
            numpy_helper.from_array(np.array([classes], np.int64), "ends"),
            numpy_helper.from_array(np.array([1], np.int64), "axes"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    modelmeta.attach(model, meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    onnx.save(model, str(tmp))
    tmp.rename(path)
    return BenchModel("null", path, f"null model {image_size}x{image_size} (frontend alone)")
