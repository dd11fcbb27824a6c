"""``--image-decoder gpu``: which images nvImageCodec decodes, the CPU fallback, and refusing to start
where it cannot work.

No GPU here: the decoder's calls run on nvImageCodec's own CPU backend (``cpu_backend=True``),
the same code path up to where nvImageCodec places the work.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service import config, errors, gpu_decode
from service.preprocess import Preprocessor
from tests.helpers.tinymodel import tiny_meta

REPO = Path(__file__).resolve().parents[2]


class _Counting:
    """The real decoder, counting the images it was asked to decode."""

    def __init__(self) -> None:
        self.decoder = gpu_decode.JpegDecoder(cpu_backend=True)
        self.calls = 0

    def __call__(self, data: bytes):
        self.calls += 1
        return self.decoder(data)


def _photo(size=(320, 240)) -> Image.Image:
    import skimage.data

    return Image.fromarray(skimage.data.chelsea()).resize(size)


def _encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def meta():
    return tiny_meta(size=64).replace(resize=72)


def test_a_baseline_jpeg_is_decoded_by_nvimagecodec_at_full_size_and_matches_the_cpu_path(meta):
    decoder = _Counting()
    gpu = Preprocessor(meta, max_pixels=10**7, jpeg_decoder=decoder)
    cpu = Preprocessor(meta, max_pixels=10**7, jpeg_decoder=None)
    for image in (_photo(), _photo().convert("L")):  # colour and grey
        data = _encode(image, quality=92)
        a, b = gpu.decode(data), cpu.decode(data)
        assert a.shape == b.shape == (64, 64, 3)
        # full-size decode + resize against libjpeg-turbo's DCT downscaling: close, not equal
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 4.0
    assert decoder.calls == 2


def test_other_images_stay_on_the_cpu_path(meta):
    decoder = _Counting()
    pre = Preprocessor(meta, max_pixels=10**7, max_decoded_pixels=200 * 200, jpeg_decoder=decoder)
    cpu = Preprocessor(meta, max_pixels=10**7, max_decoded_pixels=200 * 200, jpeg_decoder=None)
    photo = _photo()
    for data in (
        _encode(photo.resize((160, 120)), "PNG"),
        _encode(photo.resize((160, 120)).convert("CMYK"), quality=90),  # Pillow converts CMYK
    ):
        np.testing.assert_array_equal(pre.decode(data), cpu.decode(data))
    assert decoder.calls == 0
    # a baseline JPEG above max_decoded_pixels: decoded downscaled on the CPU, as without the decoder
    big = _encode(photo, quality=90)  # 320 x 240 > 200 x 200
    np.testing.assert_array_equal(pre.decode(big), cpu.decode(big))
    assert decoder.calls == 0


def test_a_jpeg_nvimagecodec_cannot_decode_gets_the_cpu_decoders_answer(meta):
    decoder = _Counting()
    pre = Preprocessor(meta, max_pixels=10**7, jpeg_decoder=decoder)
    cpu = Preprocessor(meta, max_pixels=10**7, jpeg_decoder=None)
    data = _encode(_photo(), quality=90)
    broken = data[:600] + bytes(64) + data[-2000:]  # a valid header, a corrupt entropy-coded stream
    try:
        expected = cpu.decode(broken)
    except errors.InvalidInput as exc:
        with pytest.raises(errors.InvalidInput, match=str(exc).split(":")[0]):
            pre.decode(broken)
    else:  # libjpeg-turbo recovers some corrupt streams: then both paths answer with pixels
        assert pre.decode(broken).shape == expected.shape
    assert decoder.calls == 1
    assert decoder.decoder(b"\xff\xd8\xff\xe0 not really a jpeg") is None


def test_configured_per_process_and_cpu_by_default(meta):
    assert config.ServerConfig(model_repository=Path(".")).image_decoder == "cpu"
    with pytest.raises(config.ConfigError, match="image_decoder: expected cpu or gpu, got 'tpu'"):
        config.ServerConfig(model_repository=Path("."), image_decoder="tpu")
    gpu_decode.configure("cpu")
    assert gpu_decode.current() is None and Preprocessor(meta, max_pixels=100).jpeg_decoder is None


@pytest.mark.parametrize("frontends", ["1", "2"])
def test_a_server_asked_to_decode_on_a_gpu_it_has_not_got_refuses_to_start(frontends, tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--model-repository", str(REPO / "models"),
         "--grpc-port", "0", "--metrics-port", "0", "--image-decoder", "gpu", "--frontends", frontends],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "svertka serve: error: image_decoder gpu: nvImageCodec cannot make a decoder here"
    ), last
    assert last.endswith("(or serve with --image-decoder cpu)")
