"""The benchmarked models, made in a repository of the benchmark's own (``.bench/models``).

resnet18 fp32 and int8 at 224x224 come from svertka's own exporter
(``svertka export --weights random``, then ``svertka quantize``): the benchmark
measures the files a user gets. Speed does not depend on the weights, so random
ones are fine. The default digits models come from ``make model``.
"""

from __future__ import annotations

import dataclasses
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

    @property
    def repository(self) -> Path:
        return self.path.parent.parent.parent


def _svertka(*args: str) -> None:
    cmd = [sys.executable, "-m", "service", *args]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")


def resnet18_models(repository: Path, image_size: int = 224) -> list[BenchModel]:
    """resnet18 fp32 and int8 in ``repository`` (made once; kept between runs)."""
    repository = Path(repository)
    fp32 = repository / "resnet18" / "1" / "model.onnx"
    int8 = repository / "resnet18-int8" / "1" / "model.onnx"
    if not fp32.is_file():
        shutil.rmtree(fp32.parent.parent, ignore_errors=True)
        _svertka(
            "export",
            "--arch",
            "resnet18",
            "--weights",
            "random",
            "--image-size",
            str(image_size),
            "--repository",
            str(repository),
            "--name",
            "resnet18",
            "--version",
            "1",
        )
    if not int8.is_file():
        shutil.rmtree(int8.parent.parent, ignore_errors=True)
        _svertka(
            "quantize",
            str(fp32),
            "--repository",
            str(repository),
            "--name",
            "resnet18-int8",
            "--version",
            "1",
            "--force",
        )
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
