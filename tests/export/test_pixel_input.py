"""``svertka export --input uint8-nhwc``: models that take pixels and normalise them in the graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from export import pixel_input
from service import config, modelmeta
from service.engine import runtime
from service.preprocess import Preprocessor

from .conftest import TINY_MAX_DROP, main_in_process

pytestmark = pytest.mark.slow


def test_uint8_nhwc_export_serves_what_the_float32_model_computes(trained, tiny_digits, tmp_path, capsys):
    code, out, err = main_in_process(
        capsys, "export", "--checkpoint", trained.checkpoint, "--repository", tmp_path / "f", "--name", "tiny",
        "--fp16", "--max-drop", TINY_MAX_DROP,
    )  # fmt: skip
    assert code == 0, err
    code, out, err = main_in_process(
        capsys, "export", "--checkpoint", trained.checkpoint, "--repository", tmp_path / "u", "--name", "tiny",
        "--fp16", "--max-drop", TINY_MAX_DROP, "--input", "uint8-nhwc",
    )  # fmt: skip
    assert code == 0, err
    assert out.count("uint8 NHWC input vs float32 input on") == 2  # fp32 and fp16, each proven
    for name in ("tiny", "tiny-fp16"):
        float_path, pixel_path = (tmp_path / d / name / "1" / "model.onnx" for d in ("f", "u"))
        meta = modelmeta.read_model_file(str(pixel_path))
        assert (meta.input_dtype, meta.layout, meta.input_shape) == ("uint8", "NHWC", (32, 32, 3))
        props = {p.key: p.value for p in onnx.load(str(pixel_path)).metadata_props}
        assert props["svertka.schema_version"] == "2"  # a server that knows only version 1 refuses it
        (inp,) = onnx.load(str(pixel_path)).graph.input
        assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
        # The server's sessions: the pixels' logits equal the float model's on the pixels as the server
        # normalises them (its own Preprocessor), on a real digit image.
        settings = config.ModelSettings()
        float_session, pixel_session = (
            runtime.Session(p, settings, threads=1) for p in (float_path, pixel_path)
        )
        image = next(tiny_digits.glob("val/*/*.png")).read_bytes()
        float_pre, pixel_pre = (
            Preprocessor(float_session.meta, max_pixels=1 << 20),
            Preprocessor(meta, max_pixels=1 << 20),
        )
        pixels = pixel_pre(image)
        assert pixels.dtype == np.uint8 and pixels.shape == (32, 32, 3)
        got = pixel_session.run(pixels[None])
        expected = float_session.run(float_pre(image)[None])
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
        # a request is a quarter of the bytes
        assert pixels.nbytes * 4 == float_pre(image).nbytes


def test_uint8_input_with_int8_is_refused_before_anything_is_written(trained, tmp_path, capsys):
    code, out, err = main_in_process(
        capsys, "export", "--checkpoint", trained.checkpoint, "--repository", tmp_path, "--name", "tiny",
        "--int8", "--input", "uint8-nhwc",
    )  # fmt: skip
    assert code != 0 and "--int8 with --input uint8-nhwc is not supported" in err
    assert not tmp_path.exists() or not any(tmp_path.rglob("*.onnx"))


def test_only_a_float32_nchw_graph_gets_a_pixel_input(tmp_path):
    from tests.helpers.tinymodel import make_tiny_model

    meta = make_tiny_model(tmp_path / "m.onnx", pixel_input=True)
    with pytest.raises(Exception, match="expected a float32 NCHW model"):
        pixel_input.with_pixel_input((tmp_path / "m.onnx").read_bytes(), meta)
