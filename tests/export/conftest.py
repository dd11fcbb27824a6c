"""Fixtures for the export stage: a tiny ImageFolder of real digits and a model trained on it.

The tiny dataset is three classes of scikit-learn's real handwritten digits
written as PNGs exactly like the bundled dataset (``export.data``), so the
tests exercise the real loading path at a fraction of the cost: 150 training
and 45 validation images.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# As the CLI does (export/cli.py): idle OpenMP threads sleep rather than spin, which keeps
# in-process training usable on a busy 2-core machine. Before anything imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[2]
SVERTKA = ROOT / ".venv" / "bin" / "svertka"
TINY_CLASSES = ("0", "1", "7")
TINY_TRAIN_PER_CLASS = 50
TINY_VAL_PER_CLASS = 15
#: --max-drop for the int8/fp16 gates where a test needs them passed: one of the 45 val images is
#: 2.2 points, so the default (1.0) refuses on the first image that flips, and whether the model
#: ``trained`` gives has an image close enough to a tie to flip depends on the machine that trained
#: it. Three images (6.7 points) may flip.
TINY_MAX_DROP = "7"


def write_tiny_digits(root: Path) -> Path:
    from sklearn.datasets import load_digits

    from export.data import digits_to_image

    digits = load_digits()
    for label in TINY_CLASSES:
        indices = [i for i, t in enumerate(digits.target) if str(t) == label]
        for split, chosen in (
            ("train", indices[:TINY_TRAIN_PER_CLASS]),
            ("val", indices[TINY_TRAIN_PER_CLASS : TINY_TRAIN_PER_CLASS + TINY_VAL_PER_CLASS]),
        ):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                digits_to_image(digits.images[i]).save(folder / f"{i:04d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory) -> Path:
    return write_tiny_digits(tmp_path_factory.mktemp("tiny") / "digits")


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_digits):
    """resnet20 trained in-process on the tiny digits until it separates them.

    Which weights (and so which val top-1) come out is reproducible on one machine
    but not across machines (docs/training.md, reproducibility): tests assert nothing
    that depends on it. 8 epochs of batch 8 with the default model's augmentation
    reached 100 % on the 45 val images for seeds 0-8 here but seed 7 (97.8 %), the
    smallest top-1 lead 6 % of the largest logit (batch 16: 73-100 %, leads down to
    0.3 %), so int8 and fp16 twins do not flip images in practice; the tests allow a
    few anyway (``TINY_MAX_DROP``).
    """
    from export import train

    cfg = train.TrainConfig(
        data=tiny_digits,
        arch="resnet20",
        output=tmp_path_factory.mktemp("run"),
        epochs=8,
        batch_size=8,
        augment="affine",
        label_smoothing=0.1,
        hflip=False,
        progress=False,
    )
    return train.main(cfg)


@pytest.fixture(scope="session")
def tiny_export(trained, tiny_digits):
    """(torch model, dataset arrays, verified Prepared export) of the tiny model, made once."""
    from export import onnx_export, pipeline

    model, meta, _ = pipeline._model_from_checkpoint(trained.checkpoint)
    dataset = pipeline._load_dataset(tiny_digits, None, meta)
    prepared = onnx_export.prepare_export(model, meta, pipeline._evaluation(dataset, meta))
    return model, dataset, prepared


def main_in_process(capsys, *args: str | os.PathLike[str]) -> tuple[int, str, str]:
    """``svertka ARGS`` through ``service.cli.main`` in this process: the same parser, handlers and
    error mapping as the subprocess, without paying for a torch import per case."""
    from service.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def run_cli(
    *args: str | os.PathLike[str], cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """``.venv/bin/svertka ARGS`` in a subprocess (the way users run it)."""
    exe = str(SVERTKA) if SVERTKA.exists() else None
    cmd = [exe] if exe else [sys.executable, "-m", "service"]
    return subprocess.run(
        [*cmd, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT
    )
