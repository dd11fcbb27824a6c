"""The default models that ``make model`` builds (``make test`` builds them first).

Checked independently of the numbers the build wrote into the files: the val
top-1 is recomputed here with onnxruntime on the bundled digits' val split.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from export import data as datamod
from export import verify
from service import modelmeta

ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = Path(os.environ.get("SVERTKA_TEST_REPOSITORY", ROOT / "models"))


@pytest.fixture(scope="module")
def digits_val(tmp_path_factory):
    return datamod.load_splits(datamod.write_digits(tmp_path_factory.mktemp("data") / "digits")).val


@pytest.mark.parametrize(("name", "precision"), [("digits", "fp32"), ("digits-int8", "int8")])
def test_default_model(name, precision, digits_val):
    path = REPOSITORY / name / "1" / "model.onnx"
    if not path.is_file():
        pytest.skip(f"{path} is not built: run `make model`")
    meta = modelmeta.read_model_file(str(path))
    assert meta.labels == tuple(str(d) for d in range(10))
    assert (meta.arch, meta.precision, meta.dataset) == ("resnet20", precision, "sklearn-digits")
    assert (meta.crop, meta.resize, meta.color_order, meta.layout) == ((32, 32), 32, "RGB", "NCHW")
    assert meta.val_top1 is not None and meta.val_top1 >= 0.985
    images, targets = verify.load_images(digits_val, meta)
    assert len(images) == 297
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    top1 = float((verify.run(session, images).argmax(1) == targets).mean())
    assert top1 >= 0.985
    assert top1 == pytest.approx(meta.val_top1, abs=1e-9)
    assert np.isfinite(verify.run(session, images[:3])).all()
